"""Idle cost of the door: an empty-door video with light changes, and CPU from /proc/<pid>/stat.

    .venv/bin/python benchmarks/idle.py [--models models] [--seconds 60] [--fps 15]
    .venv/bin/python benchmarks/idle.py --write-video door.mp4      # the video alone (for the daemon)
    .venv/bin/python benchmarks/idle.py --pid PID --seconds 60      # CPU of a running process (the daemon)

Without --pid it generates the video (a door, no person: daylight drifting, clouds, a lamp
switching on and off, mains flicker, sensor noise) and runs the per-frame path on it as the
daemon would at the video's frame rate: decode, idle gate (`facedoor.motion.IdleGate`), and the
pipeline (`analyze`) on the frames the gate passes; once with the gate and once without. It
prints the CPU seconds this process used per second of video (= share of one core at that frame
rate, read from /proc/self/stat), the detector passes, the time spent idle, and the gate's own
cost per frame. `--pid` measures any process the same way over --seconds of wall time, which is
how the daemon's target (<= 10 % of one core on an empty scene, averaged over 60 s) is checked.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from facedoor.config import parse_config
from facedoor.motion import IdleGate
from facedoor.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of PID so far (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_share(pid: int, seconds: float) -> float:
    """Average share of one core PID used over the next SECONDS of wall time (0.1 = 10 %)."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


def door_scene(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A still float32 BGR picture of a front door: wall, door, frame, handle, plant, texture."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    scene = np.repeat((150 + 40 * x / w - 30 * y / h)[..., None], 3, axis=2)
    cv2.rectangle(scene, (int(w * 0.34), int(h * 0.12)), (int(w * 0.66), h), (70, 90, 120), -1)
    cv2.rectangle(scene, (int(w * 0.33), int(h * 0.1)), (int(w * 0.67), h), (230, 230, 230), 8)
    cv2.circle(scene, (int(w * 0.62), int(h * 0.56)), 8, (40, 180, 200), -1)
    cv2.ellipse(scene, (int(w * 0.15), int(h * 0.8)), (45, 80), 0, 0, 360, (40, 120, 50), -1)
    return scene + cv2.GaussianBlur(rng.normal(0, 12, (h, w, 3)).astype(np.float32), (5, 5), 0)


def write_empty_door(path: Path, seconds: float, fps: float = 15.0, size: tuple[int, int] = (640, 480),
                     seed: int = 0) -> Path:
    """An MP4 of an empty door with light changes and no person; returns PATH."""
    rng = np.random.default_rng(seed)
    scene = door_scene(size, rng)
    w, h = size
    x = np.mgrid[0:h, 0:w][1].astype(np.float32)
    lamp = (0.25 + 0.25 * x / w)[..., None]  # a porch lamp lights the right side more
    noise = [rng.normal(0, 3, (h, w, 3)).astype(np.float32) for _ in range(8)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path} (OpenCV has no mp4v encoder?)")
    frames = int(seconds * fps)
    cloud = 1.0
    for i in range(frames):
        t = i / fps
        daylight = 0.85 + 0.15 * np.sin(2 * np.pi * t / max(seconds, 1))
        cloud += (1.0 - cloud) * 0.05 + (-0.3 if rng.random() < 0.01 else 0.0)  # sudden dips, slow recovery
        lit = (t % 40) > 30  # the lamp is on for 10 s of every 40
        flicker = 1.0 + 0.02 * np.sin(2 * np.pi * 7.3 * t)
        frame = scene * (daylight * cloud * flicker) + (scene * lamp if lit else 0) + noise[i % len(noise)]
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    return path


def replay(pipeline: FacePipeline | None, gate: IdleGate | None, video: Path) -> dict[str, float]:
    """Decode VIDEO and run the per-frame path (gate, then analyze); CPU seconds and counts."""
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 15.0
    frames = passes = idle = 0
    gate_s = 0.0
    start = cpu_seconds()
    while True:
        ok, image = cap.read()
        if not ok:
            break
        captured = frames / fps
        frames += 1
        run = True
        if gate is not None:
            t0 = time.thread_time()
            run = gate.should_detect(image, captured)
            gate_s += time.thread_time() - t0
            idle += gate.state == "idle"
        if run and pipeline is not None:
            passes += 1
            faces = pipeline.analyze(image)
            if gate is not None:
                gate.observe(captured, len(faces))
    cap.release()
    used = cpu_seconds() - start
    return {"frames": frames, "seconds": frames / fps, "cpu": used, "passes": passes, "idle": idle,
            "gate_ms": 1000 * gate_s / max(frames, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=None, help="ORT threads (default: all cores)")
    ap.add_argument("--write-video", type=Path, metavar="PATH", help="only write the empty-door video to PATH")
    ap.add_argument("--pid", type=int, help="only measure this process's CPU over --seconds")
    args = ap.parse_args(argv)

    if args.pid:
        share = cpu_share(args.pid, args.seconds)
        print(f"pid {args.pid}: {100 * share:.1f} % of one core over {args.seconds:.0f} s")
        return 0
    if args.write_video:
        write_empty_door(args.write_video, args.seconds, args.fps)
        print(f"wrote {args.write_video} ({args.seconds:.0f} s at {args.fps:g} fps, empty door, light changes)")
        return 0
    cfg = parse_config({"models": str(args.models), "recognition": {"threads": args.threads}})
    pipeline = FacePipeline.from_config(cfg)
    with tempfile.TemporaryDirectory(prefix="facedoor-idle-") as tmp:
        video = write_empty_door(Path(tmp) / "empty-door.mp4", args.seconds, args.fps)
        rows = {
            "decode only": replay(None, None, video),
            "gate off": replay(pipeline, None, video),
            "gate on": replay(pipeline, IdleGate.from_config(cfg.idle), video),
        }
    print(f"# empty door, {args.seconds:.0f} s at {args.fps:g} fps 640x480 (light changes, no person); "
          f"detector {cfg.recognition.detector}, idle.detect_fps {cfg.idle.detect_fps:g}; {os.cpu_count()} CPUs, "
          "CPU from /proc/self/stat")
    print("run         | CPU s / video s (% of one core) | detector passes | idle frames | gate ms/frame")
    for name, r in rows.items():
        share = 100 * r["cpu"] / r["seconds"]
        gate = f"{r['gate_ms']:.3f}" if name == "gate on" else "-"
        print(f"{name:11} | {r['cpu']:6.1f} / {r['seconds']:4.0f} ({share:5.1f} %)        | "
              f"{int(r['passes']):15d} | {int(r['idle']):11d} | {gate:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
