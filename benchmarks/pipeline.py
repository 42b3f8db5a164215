"""Per-stage time of the face pipeline on 640x480 door-camera frames with one face, side by side.

Stages: decode (JPEG -> BGR), detect, align (crops), encode (ONNX Runtime), match (against 1,000
enrolled embeddings). Columns: detector (mtcnn = the default, yunet) x encoder (facenet float,
facenet_int8 when the manifest has it), at 2 ORT threads and at 1 (a Raspberry-Pi-class box has
fewer cores); when the `face_recognition` package (dlib HOG + ResNet, single-threaded) is
installed, the same frames go through it too and the speed-up of each column is printed. Every
configuration processes each frame in turn (interleaved), so a busy machine slows them alike.
Then: identify against 100,000 stored embeddings. Medians and 95th percentiles in milliseconds.
The column of the manifest's default encoder (what a fresh `facedoor-export` makes the door run)
is marked `*`.

`--command N`: the commands a user runs, end to end, on N such frames written as JPEG files:
`facedoor identify` (one process, start-up included, the models' defaults; it detects the next
photo while it encodes this one) against
`face_recognition`'s own command line (`face_recognition KNOWN UNKNOWN`, dlib HOG + ResNet, one
process), both with one person enrolled, taking turns; and a one-frame `identify` for its start-up.

    .venv/bin/python benchmarks/pipeline.py [--models models] [--rounds 3] [--threads 2,1] [--command 200]

`face_recognition` for the comparison (not a facedoor dependency):
    .venv/bin/pip install dlib-bin face_recognition_models && .venv/bin/pip install --no-deps face_recognition
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from facedoor.align import Aligner
from facedoor.config import parse_config
from facedoor.detect import create_detector
from facedoor.embed import Encoder
from facedoor.match import Gallery
from facedoor.models import Manifest
from facedoor.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
YUNET = SHARED / "models/yunet/face_detection_yunet_2023mar.onnx"
FRAME_W, FRAME_H = 640, 480


def make_frames(count: int, seed: int = 0) -> list[bytes]:
    """JPEG 640x480 frames: a background scene with one LFW face photo pasted at door distance."""
    rng = np.random.default_rng(seed)
    backgrounds = [cv2.imread(str(p)) for p in sorted((SHARED / "data/nst").glob("*.jpg"))]
    backgrounds = [cv2.resize(b, (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA)
                   for b in backgrounds if b is not None]
    people = sorted((SHARED / "data/faces/lfw10").glob("*/*.jpg"))
    frames = []
    for i in range(count):
        frame = backgrounds[i % len(backgrounds)].copy()
        face = cv2.imread(str(people[int(rng.integers(len(people)))]))[25:225, 25:225]  # head and shoulders
        side = int(rng.integers(180, 260))
        face = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
        x, y = int(rng.integers(0, FRAME_W - side)), int(rng.integers(0, FRAME_H - side))
        frame[y : y + side, x : x + side] = face
        frames.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return frames


CLOCK = time.perf_counter  # --cpu-clock: time.thread_time


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = CLOCK()
    out = fn()
    return out, (CLOCK() - t0) * 1000.0


def stats(samples: list[float]) -> tuple[float, float]:
    return float(np.median(samples)), float(np.percentile(samples, 95))


STAGES = ("decode", "detect", "align", "encode", "match", "total")
Step = Callable[[bytes], tuple[bool, dict[str, float]]]


def facedoor_step(pipeline: FacePipeline, gallery: Gallery) -> Step:
    """One frame through facedoor: (face found, stage times in ms)."""
    def step(data: bytes) -> tuple[bool, dict[str, float]]:
        image, t_dec = timed(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
        faces, t_det = timed(lambda: pipeline.detect(image))
        crops, t_al = timed(lambda: pipeline.crops(image, pipeline.deciding(faces)))
        emb, t_enc = timed(lambda: pipeline.encoder(crops))
        _, t_match = timed(lambda: gallery.identify(emb[0]) if len(emb) else None)
        return bool(faces), dict(zip(STAGES, (t_dec, t_det, t_al, t_enc, t_match,
                                              t_dec + t_det + t_al + t_enc + t_match)))
    return step


def face_recognition_step(known: np.ndarray) -> Step | None:
    """One frame through face_recognition (dlib HOG + ResNet), or None when it is not installed."""
    try:
        import face_recognition
    except ImportError:
        return None

    def step(data: bytes) -> tuple[bool, dict[str, float]]:
        rgb, t_dec = timed(lambda: cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                                cv2.COLOR_BGR2RGB))
        boxes, t_det = timed(lambda: face_recognition.face_locations(rgb))
        enc, t_enc = timed(lambda: face_recognition.face_encodings(rgb, boxes[:1]))
        _, t_match = timed(lambda: face_recognition.face_distance(known, enc[0]) if enc else None)
        return bool(boxes), {"decode": t_dec, "detect": t_det, "encode": t_enc, "match": t_match,
                             "total": t_dec + t_det + t_enc + t_match}
    return step


def run_interleaved(steps: dict[str, Step], frames: list[bytes], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Stage times of each step, the steps taking each frame in turn (round 0 warms up)."""
    times: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    found = dict.fromkeys(steps, 0)
    for r in range(rounds + 1):
        for data in frames:
            for name, step in steps.items():
                ok, stages = step(data)
                if r:
                    found[name] += ok
                    for key, value in stages.items():
                        times[name].setdefault(key, []).append(value)
    for name in steps:
        times[name]["found"] = [found[name] / (rounds * len(frames))]
    return times


def random_gallery(n: int, dim: int, threshold: float, seed: int = 1) -> Gallery:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Gallery([f"person{i // 3}" for i in range(n)], v, threshold)


def build_pipelines(models: Path, threads: int) -> dict[str, FacePipeline]:
    """detector/encoder -> pipeline at THREADS ORT threads; encoders and detectors shared, not duplicated."""
    manifest = Manifest.load(models)
    encoders = {n: Encoder(manifest, n, threads) for n in ("facenet", "facenet_int8") if n in manifest.entries}
    detectors = {}
    for name in ("mtcnn", "yunet"):
        cfg = parse_config({"models": str(models), "recognition": {"detector": name, "yunet_model": str(YUNET)}})
        detectors[name] = create_detector(cfg.recognition, cfg.quality.min_detect_score, manifest, threads)
    cfg = parse_config({})
    return {f"{d}/{e}": FacePipeline(det, Aligner(cfg.recognition.align, enc.size), enc, cfg.quality.min_face_size,
                                     cfg.recognition.max_faces, cfg.policy.near_ratio)
            for d, det in detectors.items() for e, enc in encoders.items()}


def print_table(title: str, results: dict[str, dict[str, list[float]]], baseline: str | None) -> None:
    print(title)
    names = list(results)
    print("stage       | " + " | ".join(f"{n:>22}" for n in names))
    for stage in STAGES:
        cells = [f"{'{:7.2f} / {:7.2f}'.format(*stats(results[n][stage])):>22}" if stage in results[n] else f"{'-':>22}"
                 for n in names]
        print(f"{stage:11} | " + " | ".join(cells))
    print("faces found | " + " | ".join(f"{100 * results[n]['found'][0]:21.0f}%" for n in names))
    if baseline:
        base = stats(results[baseline]["total"])[0]
        print("vs face_rec | " + " | ".join(f"{base / stats(results[n]['total'])[0]:21.1f}x" for n in names))


def timed_command(cmd: list[str], expect: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system, all its threads) of CMD as a fresh process, start-up
    included; it must print at least EXPECT result lines (face_recognition prints one per face)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode not in (0, 1) or len(lines) < expect:
        raise RuntimeError(f"{cmd[:4]}... exit {proc.returncode}, {len(lines)} of {expect} results: "
                           f"{proc.stderr[-500:]}")
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def command_comparison(models: Path, count: int, rounds: int) -> None:
    """`facedoor identify` vs `face_recognition`'s command line on COUNT frame files, ROUNDS turns each."""
    facedoor = [str(Path(sys.executable).with_name("facedoor")), "--models", str(models)]
    fr_cli = [sys.executable, "-c", "from face_recognition.face_recognition_cli import main; main()"]
    has_fr = face_recognition_step(np.zeros((1, 128))) is not None
    encoder = Manifest.load(models).default_encoder
    with tempfile.TemporaryDirectory(prefix="facedoor-bench-") as tmp:
        root = Path(tmp)
        (root / "frames").mkdir()
        (root / "known").mkdir()
        for i, data in enumerate(make_frames(count, seed=5)):
            (root / "frames" / f"frame{i:04d}.jpg").write_bytes(data)
        member = sorted((SHARED / "data/faces/lfw10").iterdir())[0]
        photos = sorted(member.glob("*.jpg"))[:3]
        (root / "known" / f"{member.name}.jpg").write_bytes(photos[0].read_bytes())
        store = ["--store", str(root / "door.db")]
        subprocess.run([*facedoor, *store, "enroll", member.name, *map(str, photos)], check=True, capture_output=True)
        frames = sorted(str(p) for p in (root / "frames").iterdir())
        runs: dict[str, list[tuple[float, float]]] = {"identify": [], "identify, 1 frame": [], "face_recognition": []}
        for _ in range(rounds):
            runs["identify"].append(timed_command([*facedoor, *store, "identify", "--json", *frames], count))
            runs["identify, 1 frame"].append(timed_command([*facedoor, *store, "identify", frames[0]], 1))
            if has_fr:
                runs["face_recognition"].append(timed_command([*fr_cli, str(root / "known"), str(root / "frames")],
                                                              count))
    print(f"\n# the commands, {count} frame files {FRAME_W}x{FRAME_H}, one face each, {rounds} run(s) each taking "
          f"turns, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; facedoor on its defaults (encoder "
          f"{encoder}; detection a photo ahead of encoding, each with half the CPUs as ORT threads); "
          "face_recognition: its CLI, 1 process; medians of wall and of CPU "
          "seconds (user + system, every thread: facedoor's ORT workers spin while a run lasts)")
    base = {k: float(np.median([r[k] for r in runs["face_recognition"]])) for k in (0, 1)} if has_fr else None
    print("command              | wall s | ms per frame | vs face_recognition | CPU s | CPU ms per frame | vs f_r")
    for name, samples in runs.items():
        if not samples:
            continue
        wall, cpu = (float(np.median([r[k] for r in samples])) for k in (0, 1))
        n = 1 if name.endswith("1 frame") else count
        ratio = [f"{base[k] / v:.1f}x" if base and n == count else "-" for k, v in ((0, wall), (1, cpu))]
        print(f"{name:20} | {wall:6.2f} | {1000 * wall / n:12.1f} | {ratio[0]:>19} | {cpu:5.2f} | "
              f"{1000 * cpu / n:16.1f} | {ratio[1]:>6}")
    if not has_fr:
        print("(face_recognition is not installed: no comparison; see the docstring to add it)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="2,1", help="ORT thread counts, comma-separated (default 2,1)")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="1 thread everywhere (ORT, OpenCV), timed by this thread's CPU time: on a shared, busy "
                         "machine this is close to what an idle one would take; wall time counts others' work")
    ap.add_argument("--command", type=int, default=0, metavar="N",
                    help="also time `facedoor identify` against face_recognition's CLI on N frame files")
    args = ap.parse_args(argv)
    global CLOCK
    if args.cpu_clock:
        CLOCK, args.threads = time.thread_time, "1"
        cv2.setNumThreads(1)

    frames = make_frames(args.frames)
    gallery = random_gallery(1000, 128, 0.7)
    fr = face_recognition_step(np.random.default_rng(2).normal(size=(1000, 128)))
    if fr is None:
        print("(face_recognition is not installed: no dlib column; see the docstring to add it)")
    for threads in (int(t) for t in args.threads.split(",")):
        steps = {name: facedoor_step(p, gallery) for name, p in build_pipelines(args.models, threads).items()}
        if fr is not None:
            steps["face_recognition"] = fr
        print_table(f"\n# {args.frames} frames {FRAME_W}x{FRAME_H} x {args.rounds} rounds, one face each; "
                    f"{os.cpu_count()} CPUs, ORT threads {threads} (face_recognition: dlib, 1 thread); "
                    f"ms median / p95 of {'thread CPU time' if args.cpu_clock else 'wall time'}",
                    run_interleaved(steps, frames, args.rounds),
                    "face_recognition" if fr is not None else None)

    big = random_gallery(100_000, 128, 0.7, seed=3)
    queries = np.random.default_rng(4).normal(size=(200, 128)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for q in queries[:10]:
        big.identify(q)
    samples = [timed(lambda q=q: big.identify(q))[1] for q in queries]
    print("\nidentify against 100,000 stored embeddings: {:.2f} ms median, {:.2f} ms p95".format(*stats(samples)))
    if args.command:
        command_comparison(args.models, args.command, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
