"""Stall benchmark (issue 10, item 1): does a stalled broker ever deliver a late unlock to the relay?

Runs the real door (`facedoor run`, subprocess) on a looping walk-up video of an enrolled person
(5-celebrity val photo; three people enrolled from 5 train/ photos each with `facedoor enroll`) against a
private Mosquitto, with an `unlock_action` (`{"state": "UNLOCK"}` / `{"state": "LOCK"}`,
`relock_after_s` 1), `policy.cooldown_s` 2 so unlocks recur, and `mqtt.ack_timeout_s` at its
default of 1 s. A separate recorder (its own MQTT client, keepalive 600 s so it never drops
during a stall) subscribes to the relay topic, the decision topic and the health topic and
notes each message's arrival (wall clock).

Each trial waits for an unlock decision, sleeps a random 0-2.5 s (one unlock cycle: the stall
starts before, during or after the next decision), pauses the broker (SIGSTOP) for the stall
length, resumes it (SIGCONT) and waits for the first decision captured after the resume.
Per stall length (0.5, 3, 12, 40 s) it prints:

- late unlocks: relay `UNLOCK` messages that arrived after their `expires_at_ms` (capture +
  TTL), target 0;
- the longest ON -> OFF the relay saw for an `UNLOCK` that arrived after the resume although
  captured before it (a stale pulse: should be milliseconds), and for any `UNLOCK` in the
  trial (a timely unlock whose relock fell into the stall is held until the broker is back);
- decisions delivered past their `expires_at_ms`;
- decisions and relay unlocks seen in the trials, stalls the daemon reported (the growth of
  `broker_stalls` in its health reports), and the recovery time (resume -> first fresh decision).

    cd /work/wt-faults
    PYTHONPATH=daemon:export:stylize nice .venv/bin/python benchmarks/stalls.py              # 30 trials
    PYTHONPATH=daemon:export:stylize nice .venv/bin/python benchmarks/stalls.py --trials 12  # shorter

The trials are spread 43/37/13/7 % over 0.5/3/12/40 s (30 trials: 13/11/4/2), about 6 minutes on 2 busy cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from tqdm import tqdm

from facedoor import sources
from facedoor.demo.broker import PrivateBroker, mosquitto_binary
from facedoor.demo.walkup import Visitor, write_walkup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_support import FACEDOOR, Daemon, write_config  # noqa: E402

ENROLLED = ("jerry_seinfeld", "mindy_kaling", "ben_afflek")
ENROL_PHOTOS = 5
DOOR = "front"
RELAY_TOPIC = "relay/front_door/set"
DECISION_TOPIC = f"facedoor/{DOOR}/decision"
HEALTH_TOPIC = f"facedoor/{DOOR}/health"
UNLOCK = '{"state": "UNLOCK"}'
LOCK = '{"state": "LOCK"}'
TTL_S = 5.0
RELOCK_S = 1.0
CYCLE_S = 2.5
STALLS_S = (0.5, 3.0, 12.0, 40.0)
SHARES = (0.43, 0.37, 0.13, 0.07)


@dataclass(frozen=True)
class Door:
    """The prepared door: models, an enrolled store, a walk-up video of one enrolled person."""

    models: Path
    store: Path
    video: Path
    person: str
    photo: Path
    work: Path


@dataclass(frozen=True)
class Message:
    """One recorded MQTT message: arrival (epoch s), topic and parsed JSON payload ({} if not JSON)."""

    recv: float
    topic: str
    body: dict[str, Any]


class Recorder:
    """Records every message on TOPICS with its arrival time; keepalive 600 s, so a paused broker never drops it."""

    def __init__(self, host: str, port: int, topics: Sequence[str]):
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"recorder-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # floats work
        self.client.connect(host, port, keepalive=600)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError(f"recorder could not subscribe to {topics} on {host}:{port}")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = {}
        with self._cond:
            self.messages.append(Message(now, msg.topic, body if isinstance(body, dict) else {}))
            self._cond.notify_all()

    def select(self, topic: str, since: float = 0.0, until: float = float("inf")) -> list[Message]:
        """Messages on TOPIC that arrived in [SINCE, UNTIL]."""
        with self._cond:
            return [m for m in self.messages if m.topic == topic and since <= m.recv <= until]

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float) -> Message | None:
        """The first message satisfying PREDICATE, waiting up to TIMEOUT seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((m for m in self.messages if predicate(m)), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                self._cond.wait(left)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def facedoor_cli(door_models: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `facedoor` CLI on MODELS and STORE (not checked; the caller reads the result)."""
    return subprocess.run([str(FACEDOOR), "--models", str(door_models), "--store", str(store), *args],
                          capture_output=True, text=True)


def train_photos(name: str) -> list[str]:
    """NAME's 5-celebrity train/ photos, sorted."""
    return sorted(str(p) for p in (sources.celebrity_faces_dir() / "train" / name).glob("*.jpg"))


def enroll(models: Path, store: Path, name: str, count: int | None = None) -> None:
    """Enrol NAME from (the first COUNT of) the 5-celebrity train/ photos (`facedoor enroll --skip-bad`)."""
    photos = train_photos(name)[:count]
    done = facedoor_cli(models, store, "enroll", "--skip-bad", name, *photos)
    if done.returncode != 0:
        raise RuntimeError(f"enrolling {name} failed: {done.stderr}")


def snapshot_models(models: Path, work: Path) -> Path:
    """A private copy of MODELS whose files match its manifest (a shared cache may be re-exported meanwhile)."""
    target = work / "models"
    for _ in range(5):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(models, target)
        entries = json.loads((target / "manifest.json").read_text())["models"].values()
        if all(hashlib.sha256((target / e["file"]).read_bytes()).hexdigest() == e["sha256"] for e in entries):
            return target
        time.sleep(5.0)
    sys.exit(f"{models} keeps changing (being re-exported?); try again later")


def prepare_door(work: Path, models: Path, visit_s: float = 8.0) -> Door:
    """Enrol ENROLLED (ENROL_PHOTOS each), pick the val photo identified closest to its own person,
    write its walk-up video; everything on a private snapshot of MODELS."""
    models = snapshot_models(models, work)
    store = work / "store.db"
    for name in ENROLLED:
        enroll(models, store, name, count=ENROL_PHOTOS)
    val = [p for name in ENROLLED for p in sorted((sources.celebrity_faces_dir() / "val" / name).glob("*.jpg"))]
    found = facedoor_cli(models, store, "identify", "--json", *map(str, val))
    hits = [(r["distance"], r["identity"], Path(r["image"])) for r in map(json.loads, found.stdout.splitlines())
            if r["identity"] is not None and r["identity"] == Path(r["image"]).parent.name]
    if not hits:
        raise RuntimeError(f"no val photo of {ENROLLED} is identified: {found.stderr}")
    _, person, photo = min(hits)
    video = work / "walkup.avi"
    write_walkup(video, [Visitor(person, photo)], fps=10.0, visit_s=visit_s, gap_s=0.5)
    return Door(models, store, video, person, photo, work)


def door_config(door: Door, port: int, name: str = "facedoor", **sections: Any) -> Path:
    """The benchmark door's config: unlock action with a relock, short cooldown, default ack timeout."""
    base: dict[str, Any] = {
        "policy": {"cooldown_s": 2.0, "unknown_interval_s": 2.0},
        "unlock_action": {"topic": RELAY_TOPIC, "payload": UNLOCK, "lock_payload": LOCK, "relock_after_s": RELOCK_S},
        "decision_ttl_s": TTL_S,
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_config(door.work / f"{name}.yaml", door.models, door.store, port, **base)


def start_door(door: Door, broker: PrivateBroker, name: str = "facedoor", *, env: dict[str, str] | None = None,
               prefix: list[str] | None = None, source: str | None = None, **sections: Any) -> tuple[Daemon, Recorder]:
    """Start the recorder and the daemon; return once the first unlock decision has arrived."""
    recorder = Recorder(broker.host, broker.port, (RELAY_TOPIC, DECISION_TOPIC, HEALTH_TOPIC))
    daemon = Daemon(door_config(door, broker.port, name, **sections), source or str(door.video), "--loop", env=env,
                    prefix=prefix)
    if recorder.wait_for(is_unlock_decision, 120) is None:
        daemon.kill()
        recorder.stop()
        raise RuntimeError(f"the door never decided unlock:\n{daemon.log()[-3000:]}")
    return daemon, recorder


def is_unlock_decision(m: Message) -> bool:
    return m.topic == DECISION_TOPIC and m.body.get("decision") == "unlock"


def late(m: Message) -> bool:
    """Arrived after its own `expires_at_ms` (capture + TTL)."""
    return m.recv * 1000 > m.body["expires_at_ms"]


def lateness(m: Message) -> str:
    """A decision's kind and its age at arrival, e.g. `unlock 12.3 s`."""
    return f"{m.body['decision']} {m.recv - m.body['ts_ms'] / 1000:.1f} s"


def describe_late(items: Sequence[str]) -> str:
    """How many, and (up to three of) which: `2 (unlock 12.3 s, deny 9.0 s)`."""
    return f"{len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})" if items else "0"


def is_on(m: Message) -> bool:
    return m.topic == RELAY_TOPIC and m.body.get("state") == "UNLOCK"


def on_held(recorder: Recorder, on: Message) -> float:
    """Seconds from ON to the relay's next OFF (inf when none came)."""
    off = recorder.wait_for(lambda m: m.topic == RELAY_TOPIC and m.recv >= on.recv and m.body.get("state") == "LOCK",
                            0)
    return off.recv - on.recv if off is not None else float("inf")


def health_stalls(recorder: Recorder, since: float, until: float) -> int | None:
    """Growth of the daemon's reported `broker_stalls` between its last health report before SINCE
    and its first after UNTIL (None when either is missing)."""
    before = recorder.select(HEALTH_TOPIC, until=since)
    after = recorder.wait_for(lambda m: m.topic == HEALTH_TOPIC and m.recv > until, 5)
    if not before or after is None:
        return None
    return int(after.body["broker_stalls"]) - int(before[-1].body["broker_stalls"])


@dataclass(frozen=True)
class Trial:
    """What one stall did, seen from the relay, the decision topic and the daemon's health."""

    stall_s: float
    decisions: int
    late_decisions: tuple[str, ...]  # kind and age at arrival of each decision delivered past expires_at_ms
    unlocks: int
    late_unlocks: int
    stale_on_held_s: float | None   # ON captured before the resume, delivered after it
    any_on_held_s: float | None
    stalls_reported: int | None
    recovery_s: float | None


def stall_trial(broker: PrivateBroker, recorder: Recorder, stall_s: float, rng: random.Random) -> Trial:
    """Wait for an unlock decision, pause the broker at a random moment of the next cycle for STALL_S, resume."""
    start = time.time()
    if recorder.wait_for(lambda m: is_unlock_decision(m) and m.recv >= start - 0.5, 60) is None:
        raise RuntimeError("no unlock decision to stall around")
    time.sleep(rng.uniform(0.0, CYCLE_S))
    t_pause = time.time()
    broker.pause()
    try:
        time.sleep(stall_s)
    finally:
        broker.resume()
    t_resume = time.time()
    fresh = recorder.wait_for(lambda m: m.topic == DECISION_TOPIC and m.body["ts_ms"] / 1000 > t_resume, 60)
    t_end = (fresh.recv if fresh is not None else time.time()) + RELOCK_S + 0.5
    time.sleep(max(0.0, t_end - time.time()))
    decisions = recorder.select(DECISION_TOPIC, t_pause, t_end)
    ons = [m for m in recorder.select(RELAY_TOPIC, t_pause - RELOCK_S, t_end) if is_on(m)]
    stale = [on_held(recorder, m) for m in ons
             if m.recv >= t_resume and m.body["expires_at_ms"] / 1000 - TTL_S < t_resume]
    return Trial(
        stall_s=stall_s,
        decisions=len(decisions),
        late_decisions=tuple(lateness(m) for m in decisions if late(m)),
        unlocks=len(ons),
        late_unlocks=sum(late(m) for m in ons),
        stale_on_held_s=max(stale, default=None),
        any_on_held_s=max((on_held(recorder, m) for m in ons), default=None),
        stalls_reported=health_stalls(recorder, t_pause, t_end),
        recovery_s=fresh.recv - t_resume if fresh is not None else None,
    )


def schedule(trials: int, rng: random.Random, only: float | None = None) -> list[float]:
    """TRIALS stall lengths spread over STALLS_S by SHARES (at least one each), or all ONLY, in random order."""
    if only is not None:
        return [only] * trials
    counts = [max(1, round(trials * share)) for share in SHARES]
    counts[0] += trials - sum(counts)
    lengths = [s for s, n in zip(STALLS_S, counts) for _ in range(n)]
    rng.shuffle(lengths)
    return lengths


def fmt_s(values: Sequence[float | None], how: Callable[[list[float]], float]) -> str:
    """HOW (max or median) of the known VALUES as seconds, '-' when none."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    value = how(known)
    return "never" if value == float("inf") else f"{value:.3f} s" if value < 1 else f"{value:.1f} s"


def stall_table(trials: Sequence[Trial]) -> list[str]:
    """One row per stall length: counts summed over its trials, times as max or median."""
    header = ("stall", "trials", "late unlocks [0]", "stale ON->OFF max", "any ON->OFF max",
              "late decisions (kind age)", "decisions", "unlocks", "stalls reported", "recovery median")
    rows = []
    for length in sorted({t.stall_s for t in trials}):
        ts = [t for t in trials if t.stall_s == length]
        reported = [t.stalls_reported for t in ts if t.stalls_reported is not None]
        rows.append((
            f"{length:g} s", str(len(ts)), str(sum(t.late_unlocks for t in ts)),
            fmt_s([t.stale_on_held_s for t in ts], max), fmt_s([t.any_on_held_s for t in ts], max),
            describe_late([d for t in ts for d in t.late_decisions]), str(sum(t.decisions for t in ts)),
            str(sum(t.unlocks for t in ts)),
            f"{sum(reported)} in {sum(r > 0 for r in reported)}/{len(ts)} trials",
            fmt_s([t.recovery_s for t in ts], statistics.median),
        ))
    return format_table(header, rows)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned text table: HEADER, a rule, ROWS."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def find_models(given: Path | None) -> Path:
    """The models directory: GIVEN, ./models, or the test cache; exits when there is none."""
    found = given or next((p for p in (Path("models"), sources.cache_dir() / "test-models")
                           if (p / "manifest.json").is_file()), None)
    if found is None:
        sys.exit("no models: run `facedoor-export --out models --only facenet,mtcnn` first")
    if mosquitto_binary() is None:
        sys.exit("mosquitto not installed (`make mosquitto`)")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30, help="stall trials in all (default 30)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the stall moments")
    parser.add_argument("--models", type=Path, default=None, help="models (default ./models, else the test cache)")
    parser.add_argument("--only", type=float, default=None, help="every trial stalls this many seconds")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory: daemon log and every recorded message (recorded.jsonl)")
    args = parser.parse_args()
    models = find_models(args.models)
    rng = random.Random(args.seed)
    lengths = schedule(args.trials, rng, args.only)
    work = Path(tempfile.mkdtemp(prefix="facedoor-stalls-"))
    broker = PrivateBroker(work / "mosquitto")
    t0 = time.monotonic()
    try:
        door = prepare_door(work, models)
        broker.start()
        daemon, recorder = start_door(door, broker)
        try:
            trials = [stall_trial(broker, recorder, length, rng)
                      for length in tqdm(lengths, desc="stall trials", unit="trial")]
        finally:
            daemon.terminate()
            daemon.kill()
            recorder.stop()
            if args.keep:
                (work / "recorded.jsonl").write_text("".join(json.dumps(vars(m)) + "\n" for m in recorder.messages))
    finally:
        broker.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nfacedoor stall benchmark: {len(trials)} trials, {door.person} at the door, TTL {TTL_S:g} s, "
          f"ack_timeout_s 1, relock {RELOCK_S:g} s, cooldown 2 s, {time.monotonic() - t0:.0f} s in all")
    print("\n".join(stall_table(trials)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
