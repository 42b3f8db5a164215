"""Benchmark `facedoor run`: frame-to-MQTT latency, sustained frame rate and peak memory.

Runs the real daemon (subprocess) on a looping walk-up video (5-celebrity val photos, 3 enrolled
people and 1 stranger, 25 fps, paced like a live camera) against a private Mosquitto, with a
short cooldown so decisions keep coming, once per detector (MTCNN, and YuNet when
../shared/models/yunet is present), and prints both side by side. Latency is measured from the
frame's capture time (`ts_ms` in the decision) to the moment a subscriber receives the decision.

    .venv/bin/python benchmarks/daemon.py                       # 5 minutes per detector
    .venv/bin/python benchmarks/daemon.py --seconds 60          # shorter
    .venv/bin/python benchmarks/daemon.py --detectors mtcnn     # one detector

Targets (2 cores, facenet + MTCNN): p95 <= 100 ms, >= 15 fps, peak RSS <= 400 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from facedoor.demo import datasets
from facedoor.demo.broker import PrivateBroker, mosquitto_binary
from facedoor.demo.walkup import Visitor, write_walkup

BIN = Path(sys.executable).parent
ENROLLED = ("jerry_seinfeld", "mindy_kaling", "ben_afflek")
STRANGER = "elton_john"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_mb(pid: int, key: str) -> float:
    """VmRSS (current) or VmHWM (peak) of PID in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


YUNET = Path(__file__).resolve().parents[1].parent / "shared/models/yunet/face_detection_yunet_2023mar.onnx"


def run_once(detector: str, args: argparse.Namespace, models: Path, work: Path, video: Path,
             store: Path) -> dict[str, str]:
    """One measured daemon run with DETECTOR; returns the table column."""
    procs: list[subprocess.Popen] = []
    broker = PrivateBroker(work / f"mosquitto-{detector}")
    try:
        broker.start()
        port = broker.port

        received: list[tuple[float, dict]] = []
        health: list[tuple[float, dict]] = []
        lock = threading.Lock()

        def on_message(client, userdata, msg) -> None:
            now = time.time()
            with lock:
                (received if msg.topic.endswith("/decision") else health).append((now, json.loads(msg.payload)))

        sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        sub.on_message = on_message
        sub.on_connect = lambda c, u, f, r, p: c.subscribe([("facedoor/bench/decision", 1),
                                                             ("facedoor/bench/health", 0)])
        sub.connect("127.0.0.1", port)
        sub.loop_start()

        config = work / f"facedoor-{detector}.yaml"
        recognition: dict = {"threads": args.threads, "detector": detector}
        if detector == "yunet":
            recognition["yunet_model"] = str(YUNET)
        config.write_text(yaml.safe_dump({
            "door_id": "bench", "state_dir": str(work), "models": str(models), "store": str(store),
            "recognition": recognition,
            "policy": {"cooldown_s": 0.5, "unknown_interval_s": 0.5},
            "mqtt": {"port": port, "health_interval_s": 2.0},
            "audit": {"enabled": False},
            "logging": {"level": "WARNING"},
        }))
        daemon = subprocess.Popen([str(BIN / "facedoor"), "--config", str(config), "run", "--source", str(video),
                                   "--loop"], stderr=subprocess.PIPE, text=True)
        procs.append(daemon)
        measure_from = time.time() + args.warmup
        end = measure_from + args.seconds
        print(f"{detector}: {args.warmup:.0f} s warm-up + {args.seconds:.0f} s measured ...", flush=True)
        while time.time() < end:
            if daemon.poll() is not None:
                sys.exit(f"daemon exited early ({daemon.returncode}):\n{daemon.stderr.read()[-3000:]}")
            time.sleep(1.0)
        peak = rss_mb(daemon.pid, "VmHWM")
        daemon.terminate()
        daemon.wait(20)
        sub.loop_stop()

        with lock:
            decisions = [(recv, d) for recv, d in received if d["ts_ms"] / 1000 >= measure_from]
            reports = [h for recv, h in health if recv >= measure_from]
        if not decisions or not reports:
            sys.exit(f"{detector}: no decisions or health reports were received during the measured run")
        e2e = [(recv - d["ts_ms"] / 1000) * 1000 for recv, d in decisions]
        internal = [d["latency_ms"] for _, d in decisions]
        fps = [h["fps"] for h in reports]
        late = sum(1 for recv, d in decisions if recv - d["ts_ms"] / 1000 > d["ttl_s"])
        unlock = sum(1 for _, d in decisions if d["decision"] == "unlock")
        return {
            "decisions received (unlock / deny)": f"{len(decisions)} ({unlock} / {len(decisions) - unlock})",
            "capture -> subscriber, median": f"{statistics.median(e2e):.1f} ms",
            "capture -> subscriber, p95  [<= 100 ms]": f"{percentile(e2e, 95):.1f} ms",
            "capture -> publish (in daemon), median / p95":
                f"{statistics.median(internal):.1f} / {percentile(internal, 95):.1f} ms",
            "processed fps, median of 10 s windows  [>= 15]": f"{statistics.median(fps):.1f}",
            "processed fps, min": f"{min(fps):.1f}",
            "peak RSS (VmHWM)  [<= 400 MB]": f"{peak:.0f} MB",
            "decisions delivered after their TTL  [0]": f"{late}",
        }
    finally:
        broker.stop()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="measured seconds per detector (default 300)")
    parser.add_argument("--models", type=Path, default=None,
                        help="models directory (default: ./models, else the test cache)")
    parser.add_argument("--detectors", default="mtcnn,yunet", help="comma-separated: mtcnn, yunet")
    parser.add_argument("--fps", type=float, default=25.0, help="camera (video) frame rate")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds ignored at the start of each run")
    args = parser.parse_args()

    models = args.models or next((p for p in (Path("models"), datasets.cache_dir() / "test-models")
                                  if (p / "manifest.json").is_file()), None)
    if models is None:
        sys.exit("no models: run `facedoor-export --out models --only facenet,mtcnn` first")
    if mosquitto_binary() is None:
        sys.exit("mosquitto not installed (`make mosquitto`)")
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    if "yunet" in detectors and not YUNET.is_file():
        print(f"skipping yunet: {YUNET} not found (../shared)")
        detectors.remove("yunet")
    celeb = datasets.celebrity_faces_dir()
    work = Path(tempfile.mkdtemp(prefix="facedoor-bench-"))
    try:
        store = work / "store.db"
        for name in ENROLLED:
            photos = sorted(str(p) for p in (celeb / "train" / name).glob("*.jpg"))
            subprocess.run([str(BIN / "facedoor"), "--models", str(models), "--store", str(store), "enroll",
                            "--skip-bad", name, *photos], check=True, capture_output=True)
        visitors = [Visitor(n, sorted((celeb / "val" / n).glob("*.jpg"))[0]) for n in (*ENROLLED, STRANGER)]
        video = work / "walkup.avi"
        write_walkup(video, visitors, fps=args.fps, visit_s=3.0, gap_s=1.0)
        load_before = os.getloadavg()[0]
        columns = {d: run_once(d, args, models, work, video, store) for d in detectors}
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = list(next(iter(columns.values())))
    width = max(len(r) for r in rows)
    print(f"\nfacedoor daemon benchmark: {args.seconds:.0f} s measured per detector, {os.cpu_count()} CPUs, "
          f"{args.threads} ORT threads, camera {args.fps:g} fps, cooldown 0.5 s, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'metric  [target]'.ljust(width)}  " + "  ".join(f"{d:>24}" for d in columns))
    for row in rows:
        print(f"{row.ljust(width)}  " + "  ".join(f"{columns[d][row]:>24}" for d in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
