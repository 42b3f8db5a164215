"""Benchmark `facedoor run` with the idle gate on (the product default) and off, side by side.

Runs the real daemon (subprocess, `facedoor run --source VIDEO`, the video paced like a live
camera) against a private Mosquitto, with the product's defaults (the liveness gate is on when the
antispoof models are exported) except a 0.5 s cooldown so that every visit decides; per detector
(MTCNN; YuNet with --detectors when ../shared/models/yunet is present) and per setting, two runs:

1. Empty door (benchmarks/idle.py's video: a door, light changes, no person): the daemon's CPU
   share of one core from /proc/<pid>/stat over --idle-seconds, after --warmup seconds from the
   moment its camera opened; detector passes per second from its health reports.
2. Walk-up (5-celebrity val photos, 3 enrolled people and a stranger, on a still doorway; every
   visit begins after --gap seconds of empty door, so the gate is idle when the face appears):
   for each visit of an enrolled person, the time from the capture of the first frame that shows
   the face to the unlock at the subscriber; every decision's capture -> subscriber latency; fps.
   A frame's capture time follows from the video (frame i is i / fps after the first) and the
   camera's pacing, anchored at its `camera_up` log record; the capture time that each decision
   carries checks the schedule (the "camera pacing" line). A camera that falls behind its
   schedule makes the walk-up times longer, never shorter.

Peak RSS (VmHWM) is the larger of the two runs.

3. The liveness gate on a real live webcam video (../shared's apfol_live.webm, looped, apfol enrolled
   from its first 6 s), forced on and off: capture -> subscriber of every decision, unlocks, fps,
   CPU and RSS (skipped, with a line saying why, without the gate's models or the video). The
   walk-ups above are photos, which the gate rightly refuses, so they run with it off.

    .venv/bin/python benchmarks/daemon.py                                   # about 6 minutes
    .venv/bin/python benchmarks/daemon.py --seconds 30 --idle-seconds 30    # shorter
    .venv/bin/python benchmarks/daemon.py --detectors mtcnn,yunet           # a YuNet column too

Targets (2 cores, MTCNN and the models' default encoder, which the header names): empty door
<= 10 % of one core with the gate on; a visit's unlock at most one idle detector period
(1 / idle.detect_fps) later than with the gate off; p95 capture -> subscriber <= 50 ms; >= 15 fps
with the gate off; peak RSS <= 400 MB; with the liveness gate on (issue 19), p95 capture ->
subscriber <= 100 ms.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from facedoor import sources
from facedoor.config import IdleConfig
from facedoor.demo.broker import PrivateBroker, Subscriber, mosquitto_binary
from facedoor.demo.walkup import Segment, Visitor, write_walkup
from facedoor.liveness import REQUIRED_MODELS
from facedoor.models import Manifest
from idle import cpu_seconds, write_empty_door

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from daemon_support import Daemon, write_config  # noqa: E402

BIN = Path(sys.executable).parent
ENROLLED = ("jerry_seinfeld", "mindy_kaling", "ben_afflek")
STRANGER = "elton_john"
VISIT_S = 3.0
GRACE_S = 1.0  # a run goes on this long after its measured window: decisions in flight arrive
YUNET = Path(__file__).resolve().parents[1].parent / "shared/models/yunet/face_detection_yunet_2023mar.onnx"
SETTINGS = {"on": {}, "off": {"idle": {"enabled": False}}}  # the idle gate; on is the product default
RISE = "walk-up: rise vs gate off, median / max of visits  [<= 1 detector period]"
LIVE_VIDEO = Path(__file__).resolve().parents[1].parent / "shared/data/antispoof/videos/apfol_live.webm"
LIVE_PERSON = "apfol"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_mb(pid: int, key: str) -> float:
    """VmRSS (current) or VmHWM (peak) of PID in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Run:
    """What one daemon run recorded, wall-clock times in seconds since the epoch."""

    decisions: list[dict[str, Any]]  # payloads, receive time under `_recv`
    health: list[dict[str, Any]]     # payloads received in the measured window
    camera_t0: float                 # the camera opened (its `camera_up` log record): frame 0 is read
    start: float                     # the measured window
    end: float
    cpu_share: float                 # CPU seconds per wall second over the window (1.0 = one core)
    peak_mb: float


def wait_message(sub: Subscriber, daemon: Daemon, predicate: Callable[[dict[str, Any]], bool],
                 timeout: float) -> dict[str, Any]:
    """The first message that satisfies PREDICATE, as it arrives; exits with the log if the daemon stops first."""
    deadline = time.monotonic() + timeout
    while (message := sub.wait_for(predicate, 1.0)) is None:
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"daemon exited ({daemon.proc.poll()}) or timed out before the message:\n{daemon.log()[-3000:]}")
    return message


def stays_up(daemon: Daemon, until: float) -> None:
    """Return at wall time UNTIL, or exit with the log as soon as the daemon stops before it."""
    try:
        daemon.proc.wait(max(0.0, until - time.time()))
    except subprocess.TimeoutExpired:
        return
    sys.exit(f"daemon exited early ({daemon.proc.returncode}):\n{daemon.log()[-3000:]}")


def log_time(record: dict[str, Any]) -> float:
    """Epoch seconds of a JSON log record's `ts` (UTC, milliseconds)."""
    return datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def run_daemon(name: str, sections: dict[str, Any], video: Path, seconds: float, args: argparse.Namespace,
               work: Path, store: Path, loop: bool = False) -> Run:
    """The daemon with config SECTIONS on VIDEO (LOOP: over and over): --warmup s after its camera
    opens, then SECONDS measured."""
    with PrivateBroker(work / f"mosquitto-{name}") as broker:
        config = write_config(work / f"{name}.yaml", args.models, store, broker.port, **sections)
        sub = Subscriber(broker.host, broker.port, "facedoor/front/decision", "facedoor/front/health")
        daemon = Daemon(config, str(video), *(["--loop"] if loop else []))
        try:
            wait_message(sub, daemon, lambda m: m["topic"].endswith("/health")
                         and json.loads(m["payload"])["camera"] == "up", 300)
            opened = daemon.events("camera_up")
            if not opened:
                sys.exit(f"{name}: the camera is up but its camera_up log record is missing:\n{daemon.log()[-3000:]}")
            camera_t0 = log_time(opened[0])
            start = camera_t0 + args.warmup
            stays_up(daemon, start)
            cpu, mono = cpu_seconds(daemon.proc.pid), time.monotonic()
            stays_up(daemon, start + seconds)
            cpu_share = (cpu_seconds(daemon.proc.pid) - cpu) / (time.monotonic() - mono)
            end = time.time()
            stays_up(daemon, end + GRACE_S)
            peak = rss_mb(daemon.proc.pid, "VmHWM")
            if len(daemon.events("camera_up")) != 1:
                sys.exit(f"{name}: the camera reopened; the walk-up schedule is lost:\n{daemon.log()[-3000:]}")
        finally:
            daemon.terminate()
            daemon.kill()
            sub.stop()
    health = [json.loads(m["payload"]) for m in sub.on("health") if start <= m["recv"] <= end]
    return Run(sub.decisions(), health, camera_t0, start, end, cpu_share, peak)


def idle_rows(run: Run) -> dict[str, str]:
    """The empty-door rows: CPU share and detector passes per second from the health counts."""
    if len(run.health) < 2:
        sys.exit("empty door: fewer than two health reports in the measured window")
    first, last = run.health[0], run.health[-1]

    def passes(h: dict[str, Any]) -> int:
        return h["frames"] - h["skipped_idle"] - h["skipped_offline"]

    span = last["uptime_s"] - first["uptime_s"]
    return {
        "empty door: CPU, % of one core  [<= 10 % gate on]": f"{100 * run.cpu_share:.1f} %",
        "empty door: detector passes / frames per s":
            f"{(passes(last) - passes(first)) / span:.1f} / {(last['frames'] - first['frames']) / span:.1f}",
        "empty door: unlock / deny decisions  [0 / 0]":
            f"{sum(d['decision'] == 'unlock' for d in run.decisions)} / "
            f"{sum(d['decision'] == 'deny' for d in run.decisions)}",
    }


def visit_latencies(run: Run, segments: list[Segment], fps: float) -> tuple[dict[int, float | None], list[float]]:
    """Per measured visit of an enrolled person (by index in SEGMENTS): seconds from the capture of its
    first face frame to its first unlock at the subscriber (None: no unlock); and the pacing residuals."""
    period = 1.0 / fps
    # a decision carries its frame's capture time: on the camera's schedule, frame j is read at
    # camera_t0 + j * period plus the read itself (ts_ms and the log's ts are truncated to ms)
    residuals = []
    for d in run.decisions:
        since = d["ts_ms"] / 1000 - run.camera_t0
        residuals.append(since - math.floor((since + 0.002) / period) * period)
    read_s = statistics.median(residuals) if residuals else 0.0
    out: dict[int, float | None] = {}
    for i, seg in enumerate(segments):
        face_t = run.camera_t0 + seg.first_frame(fps) * period + read_s
        end_t = run.camera_t0 + seg.end_s
        if seg.name not in ENROLLED or face_t < run.start or end_t > run.end:
            continue
        unlocks = [d["_recv"] for d in run.decisions if d["decision"] == "unlock" and d["identity"] == seg.name
                   and face_t - 0.002 <= d["ts_ms"] / 1000 <= end_t]
        out[i] = min(unlocks) - face_t if unlocks else None
    return out, residuals


def walkup_rows(run: Run, visits: dict[int, float | None]) -> dict[str, str]:
    """The walk-up rows: first face -> unlock per visit, capture -> subscriber of all decisions, fps."""
    decisions = [d for d in run.decisions if run.start <= d["ts_ms"] / 1000 <= run.end]
    if not decisions or not run.health:
        sys.exit("walk-up: no decisions or health reports were received during the measured window")
    e2e = [(d["_recv"] - d["ts_ms"] / 1000) * 1000 for d in decisions]
    internal = [d["latency_ms"] for d in decisions]
    unlocked = [1000 * v for v in visits.values() if v is not None]
    unlock = sum(d["decision"] == "unlock" for d in decisions)
    return {
        "walk-up: member visits unlocked": f"{len(unlocked)} / {len(visits)}",
        "walk-up: first face -> unlock at subscriber, median":
            f"{statistics.median(unlocked):.0f} ms" if unlocked else "-",
        "walk-up: first face -> unlock at subscriber, max": f"{max(unlocked):.0f} ms" if unlocked else "-",
        RISE: "-",  # the gate-on column's is filled in once both settings ran
        "walk-up: decisions (unlock / deny)": f"{len(decisions)} ({unlock} / {len(decisions) - unlock})",
        "walk-up: liveness gate (live_score in decisions)":
            "on" if any(d["live_score"] is not None for d in decisions) else "off",
        "capture -> subscriber, median": f"{statistics.median(e2e):.1f} ms",
        "capture -> subscriber, p95  [<= 50 ms]": f"{percentile(e2e, 95):.1f} ms",
        "capture -> publish (in daemon), median / p95":
            f"{statistics.median(internal):.1f} / {percentile(internal, 95):.1f} ms",
        "processed fps, median of 10 s windows  [>= 15 gate off]":
            f"{statistics.median(h['fps'] for h in run.health):.1f}",
        "decisions delivered after their TTL  [0]":
            f"{sum(d['_recv'] - d['ts_ms'] / 1000 > d['ttl_s'] for d in decisions)}",
    }


def gate_columns(args: argparse.Namespace, work: Path) -> dict[str, dict[str, str]]:
    """The liveness gate on a real live webcam video (LIVE_VIDEO, looped; its person enrolled from its
    first 6 s as `facedoor enroll --video` does): capture -> subscriber, unlocks, CPU, with the gate
    forced on and off. Empty when the gate's models or ../shared's video are missing (said)."""
    listed = Manifest.load(args.models).entries
    missing = [m for m in REQUIRED_MODELS if m not in listed]
    if missing or not LIVE_VIDEO.is_file():
        print(f"skipping the liveness gate on live video: {', '.join(missing) or LIVE_VIDEO} not found "
              "(facedoor-export --only antispoof,landmarks; ../shared)")
        return {}
    store = work / "gate.db"
    subprocess.run([str(BIN / "facedoor"), "--models", str(args.models), "--store", str(store), "enroll",
                    LIVE_PERSON, "--video", str(LIVE_VIDEO), "--seconds", "6"], check=True, capture_output=True)
    columns = {}
    for setting, enabled in (("on", True), ("off", False)):
        print(f"live video, liveness gate {setting}: {args.warmup:g} + {args.seconds:g} s ...", flush=True)
        sections = {"liveness": {"enabled": enabled}, "recognition": {"threads": args.threads},
                    "mqtt": {"health_interval_s": 2.0}, "policy": {"cooldown_s": 0.5, "unknown_interval_s": 0.5}}
        run = run_daemon(f"gate-{setting}", sections, LIVE_VIDEO, args.seconds, args, work, store, loop=True)
        decisions = [d for d in run.decisions if run.start <= d["ts_ms"] / 1000 <= run.end]
        e2e = [(d["_recv"] - d["ts_ms"] / 1000) * 1000 for d in decisions]
        columns[f"live video, liveness {setting}"] = {
            "decisions (unlock / deny)": f"{len(decisions)} ({sum(d['decision'] == 'unlock' for d in decisions)}"
                                         f" / {sum(d['decision'] == 'deny' for d in decisions)})",
            "liveness in decisions": ", ".join(sorted({str(d.get('liveness')) for d in decisions})) or "-",
            "capture -> subscriber, median": f"{statistics.median(e2e):.1f} ms" if e2e else "-",
            "capture -> subscriber, p95  [<= 100 ms gate on]": f"{percentile(e2e, 95):.1f} ms" if e2e else "-",
            "processed fps, median of health reports": f"{statistics.median(h['fps'] for h in run.health):.1f}"
                                                       if run.health else "-",
            "CPU, % of one core": f"{100 * run.cpu_share:.1f} %",
            "peak RSS (VmHWM)": f"{run.peak_mb:.0f} MB",
        }
    return columns


def print_table(title: str, columns: dict[str, dict[str, str]]) -> None:
    """TITLE, then one row per metric and one column per run."""
    rows = list(next(iter(columns.values())))
    width = max(len(r) for r in rows)
    print(f"\n{title}")
    print(f"{'metric  [target]'.ljust(width)}  " + "  ".join(f"{c:>24}" for c in columns))
    for row in rows:
        print(f"{row.ljust(width)}  " + "  ".join(f"{columns[c][row]:>24}" for c in columns))


def rise_row(on: dict[int, float | None], off: dict[int, float | None], period_s: float) -> str:
    """Gate on minus gate off, per visit unlocked in both: median and max, against one detector period."""
    rises = [1000 * (on[i] - off_s) for i, off_s in off.items() if off_s is not None and on.get(i) is not None]
    if not rises:
        return "-"
    worst = max(rises)
    verdict = "within" if worst <= 1000 * period_s else "EXCEEDS"
    return f"{statistics.median(rises):+.0f} / {worst:+.0f} ms ({verdict} {1000 * period_s:.0f})"


def walkup_video(path: Path, celeb: Path, seconds: float, args: argparse.Namespace) -> list[Segment]:
    """A still-doorway walk-up long enough for warm-up, SECONDS measured and the grace: the enrolled
    people (each val photo in turn) and every fourth visit the stranger; returns its timeline."""
    photos = {n: sorted((celeb / "val" / n).glob("*.jpg")) for n in (*ENROLLED, STRANGER)}
    visits = math.ceil((args.warmup + seconds + GRACE_S) / (VISIT_S + args.gap)) + 1
    people = itertools.cycle((*ENROLLED, STRANGER))
    visitors = [Visitor(n, photos[n][(i // 4) % len(photos[n])]) for i, n in zip(range(visits), people)]
    return write_walkup(path, visitors, fps=args.fps, visit_s=VISIT_S, gap_s=args.gap, still=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured walk-up seconds per run (default 60)")
    parser.add_argument("--idle-seconds", type=float, default=60.0,
                        help="measured empty-door seconds per run (default 60)")
    parser.add_argument("--models", type=Path, default=None,
                        help="models directory (default: ./models, else the test cache)")
    parser.add_argument("--detectors", default="mtcnn", help="comma-separated: mtcnn, yunet (default mtcnn)")
    parser.add_argument("--fps", type=float, default=25.0, help="camera (video) frame rate")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds ignored after the camera opens")
    hold = IdleConfig().active_hold_s
    parser.add_argument("--gap", type=float, default=hold + 1.5,
                        help=f"seconds of empty door before each visit (default {hold + 1.5:g}: the gate's "
                             f"{hold:g} s hold after the last visitor, then idle)")
    args = parser.parse_args()
    if args.gap <= hold:
        parser.error(f"--gap must exceed idle.active_hold_s ({hold:g} s): the gate must be idle when a face appears")
    if args.seconds < VISIT_S + args.gap or args.idle_seconds < 5 or args.warmup < 0 or args.fps <= 0:
        parser.error(f"need --seconds >= {VISIT_S + args.gap:g} (one visit), --idle-seconds >= 5, --warmup >= 0, "
                     "--fps > 0")

    args.models = args.models or next((p for p in (Path("models"), sources.cache_dir() / "test-models")
                                       if (p / "manifest.json").is_file()), None)
    if args.models is None:
        sys.exit("no models: run `facedoor-export --out models --only facenet,mtcnn` first")
    if mosquitto_binary() is None:
        sys.exit("mosquitto not installed (`make mosquitto`)")
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if "yunet" in detectors and not YUNET.is_file():
        print(f"skipping yunet: {YUNET} not found (../shared)")
        detectors.remove("yunet")
    period_s = 1.0 / IdleConfig().detect_fps
    celeb = sources.celebrity_faces_dir()
    work = Path(tempfile.mkdtemp(prefix="facedoor-bench-"))
    try:
        store = work / "store.db"
        for name in ENROLLED:
            photos = sorted(str(p) for p in (celeb / "train" / name).glob("*.jpg"))
            subprocess.run([str(BIN / "facedoor"), "--models", str(args.models), "--store", str(store), "enroll",
                            "--skip-bad", name, *photos], check=True, capture_output=True)
        empty = write_empty_door(work / "empty-door.mp4", args.warmup + args.idle_seconds + GRACE_S + 5.0, args.fps)
        walkup = work / "walkup.avi"
        segments = walkup_video(walkup, celeb, args.seconds, args)
        load_before = os.getloadavg()
        columns: dict[str, dict[str, str]] = {}
        for detector in detectors:
            visits: dict[str, dict[int, float | None]] = {}
            for setting, gate in SETTINGS.items():
                recognition: dict[str, Any] = {"threads": args.threads, "detector": detector}
                if detector == "yunet":
                    recognition["yunet_model"] = str(YUNET)
                sections = {**gate, "recognition": recognition, "mqtt": {"health_interval_s": 2.0},
                            "policy": {"cooldown_s": 0.5, "unknown_interval_s": 0.5}}
                label = f"{detector}, gate {setting}"
                print(f"{label}: empty door {args.warmup:g} + {args.idle_seconds:g} s, walk-up "
                      f"{args.warmup:g} + {args.seconds:g} s ...", flush=True)
                quiet = run_daemon(f"{detector}-{setting}-empty", sections, empty, args.idle_seconds, args, work,
                                   store)
                walk = run_daemon(f"{detector}-{setting}-walkup", sections, walkup, args.seconds, args, work, store)
                visits[setting], residuals = visit_latencies(walk, segments, args.fps)
                columns[label] = {
                    **idle_rows(quiet), **walkup_rows(walk, visits[setting]),
                    "peak RSS (VmHWM)  [<= 400 MB]": f"{max(quiet.peak_mb, walk.peak_mb):.0f} MB",
                    "camera pacing: decision frames read after schedule, median / max":
                        f"{1000 * statistics.median(residuals):.0f} / {1000 * max(residuals):.0f} ms"
                        if residuals else "-",
                }
            columns[f"{detector}, gate on"][RISE] = rise_row(visits["on"], visits["off"], period_s)
        gate = gate_columns(args, work)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    detect_fps = IdleConfig().detect_fps
    print_table(f"facedoor daemon benchmark: idle gate on (product default, idle.detect_fps {detect_fps:g}: "
          f"detector period {1000 * period_s:.0f} ms) vs off (idle.enabled: false); empty door {args.idle_seconds:g} s "
          f"and walk-up {args.seconds:g} s measured per run after {args.warmup:g} s warm-up; {os.cpu_count()} CPUs, "
          f"{args.threads} ORT threads, encoder {Manifest.load(args.models).default_encoder} (the models' default), "
          f"camera {args.fps:g} fps, {args.gap:g} s empty door before each "
          f"{VISIT_S:g} s visit, cooldown 0.5 s; load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load_before)} -> {'/'.join(f'{x:.1f}' for x in load_after)}", columns)
    if gate:
        print_table(f"the liveness gate (forced on / off) on {LIVE_VIDEO.name}, looped, {LIVE_PERSON} enrolled from "
                    f"its first 6 s; idle gate on; {args.seconds:g} s measured after {args.warmup:g} s", gate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
