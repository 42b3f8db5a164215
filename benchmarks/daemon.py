"""Benchmark `facedoor run`: frame-to-MQTT latency, sustained frame rate and peak memory.

Runs the real daemon (subprocess) on a looping walk-up video (5-celebrity val photos, 3 enrolled
people and 1 stranger, 25 fps, paced like a live camera) against a private Mosquitto, with a
short cooldown so decisions keep coming. Latency is measured from the frame's capture time
(`ts_ms` in the decision) to the moment a subscriber receives the decision.

    .venv/bin/python benchmarks/daemon.py                # 5 minutes
    .venv/bin/python benchmarks/daemon.py --seconds 60   # shorter

Targets (2 cores, facenet + MTCNN): p95 <= 100 ms, >= 15 fps, peak RSS <= 400 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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

from facedoor import datasets
from facedoor.walkup import Visitor, write_walkup

BIN = Path(sys.executable).parent
ENROLLED = ("jerry_seinfeld", "mindy_kaling", "ben_afflek")
STRANGER = "elton_john"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_mb(pid: int, key: str) -> float:
    """VmRSS (current) or VmHWM (peak) of PID in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0, help="measured run length (default 300)")
    parser.add_argument("--models", type=Path, default=None,
                        help="models directory (default: ./models, else the test cache)")
    parser.add_argument("--fps", type=float, default=25.0, help="camera (video) frame rate")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds ignored at the start")
    args = parser.parse_args()

    models = args.models or next((p for p in (Path("models"), datasets.cache_dir() / "test-models")
                                  if (p / "manifest.json").is_file()), None)
    if models is None:
        sys.exit("no models: run `facedoor-export --out models --only facenet,mtcnn` first")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        sys.exit("mosquitto not installed (`make mosquitto`)")
    celeb = datasets.celebrity_faces_dir()
    work = Path(tempfile.mkdtemp(prefix="facedoor-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        store = work / "store.db"
        for name in ENROLLED:
            photos = sorted(str(p) for p in (celeb / "train" / name).glob("*.jpg"))
            subprocess.run([str(BIN / "facedoor"), "--models", str(models), "--store", str(store), "enroll",
                            "--skip-bad", name, *photos], check=True, capture_output=True)
        visitors = [Visitor(n, sorted((celeb / "val" / n).glob("*.jpg"))[0]) for n in (*ENROLLED, STRANGER)]
        video = work / "walkup.avi"
        write_walkup(video, visitors, fps=args.fps, visit_s=3.0, gap_s=1.0)

        port = free_port()
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        time.sleep(0.5)

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

        config = work / "facedoor.yaml"
        config.write_text(yaml.safe_dump({
            "door_id": "bench", "state_dir": str(work), "models": str(models), "store": str(store),
            "recognition": {"threads": args.threads},
            "policy": {"cooldown_s": 0.5, "unknown_interval_s": 0.5},
            "mqtt": {"port": port, "health_interval_s": 2.0},
            "audit": {"enabled": False},
            "logging": {"level": "WARNING"},
        }))
        daemon = subprocess.Popen([str(BIN / "facedoor"), "--config", str(config), "run", "--source", str(video),
                                   "--loop"], stderr=subprocess.PIPE, text=True)
        procs.append(daemon)
        start = time.time()
        measure_from = start + args.warmup
        end = measure_from + args.seconds
        peak_sampled = 0.0
        print(f"running the daemon for {args.warmup:.0f} s warm-up + {args.seconds:.0f} s "
              f"(models {models}, {args.threads} ORT threads, camera {args.fps:g} fps) ...", flush=True)
        while time.time() < end:
            if daemon.poll() is not None:
                sys.exit(f"daemon exited early ({daemon.returncode}):\n{daemon.stderr.read()[-3000:]}")
            peak_sampled = max(peak_sampled, rss_mb(daemon.pid, "VmRSS"))
            time.sleep(1.0)
        peak = rss_mb(daemon.pid, "VmHWM")
        daemon.terminate()
        daemon.wait(20)
        sub.loop_stop()

        with lock:
            decisions = [(recv, d) for recv, d in received if d["ts_ms"] / 1000 >= measure_from]
            reports = [h for recv, h in health if recv >= measure_from]
        if not decisions or not reports:
            sys.exit("no decisions or health reports were received during the measured run")
        e2e = [(recv - d["ts_ms"] / 1000) * 1000 for recv, d in decisions]
        internal = [d["latency_ms"] for _, d in decisions]
        fps = [h["fps"] for h in reports]
        late = sum(1 for recv, d in decisions if recv - d["ts_ms"] / 1000 > d["ttl_s"])
        kinds = {k: sum(1 for _, d in decisions if d["decision"] == k) for k in ("unlock", "deny")}

        rows = [
            ("decisions received", f"{len(decisions)} ({kinds['unlock']} unlock, {kinds['deny']} deny)", "", ""),
            ("capture -> subscriber, median", f"{statistics.median(e2e):.1f} ms", "", ""),
            ("capture -> subscriber, p95", f"{percentile(e2e, 95):.1f} ms", "<= 100 ms",
             "ok" if percentile(e2e, 95) <= 100 else "MISSED"),
            ("capture -> publish (daemon), median / p95",
             f"{statistics.median(internal):.1f} / {percentile(internal, 95):.1f} ms", "", ""),
            ("processed fps, median (10 s windows)", f"{statistics.median(fps):.1f}", ">= 15",
             "ok" if statistics.median(fps) >= 15 else "MISSED"),
            ("processed fps, min", f"{min(fps):.1f}", "", ""),
            ("peak RSS (VmHWM)", f"{peak:.0f} MB", "<= 400 MB", "ok" if peak <= 400 else "MISSED"),
            ("decisions delivered after their TTL", f"{late}", "0", "ok" if late == 0 else "MISSED"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"\nfacedoor daemon benchmark: {args.seconds:.0f} s measured, {os.cpu_count()} CPUs, "
              f"camera {args.fps:g} fps, cooldown 0.5 s")
        print(f"{'metric'.ljust(width)}  {'value':>32}  {'target':>10}  result")
        for name, value, target, ok in rows:
            print(f"{name.ljust(width)}  {value:>32}  {target:>10}  {ok}")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
