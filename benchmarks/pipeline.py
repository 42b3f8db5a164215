"""Per-stage time of the face pipeline on 640x480 door-camera frames with one face, side by side.

Stages: decode (JPEG -> BGR), detect, align (crops), encode (FaceNet, ONNX Runtime), match
(against 1,000 enrolled embeddings); then identify against 100,000 stored embeddings, and, when
the `face_recognition` package (dlib HOG + ResNet) is installed, the same frames through it in
the same run, with the ratio. Medians and 95th percentiles in milliseconds.

    .venv/bin/python benchmarks/pipeline.py [--models models] [--rounds 3] [--threads N]

`face_recognition` for the comparison (not a facedoor dependency):
    .venv/bin/pip install dlib-bin face_recognition_models && .venv/bin/pip install --no-deps face_recognition
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from facedoor.config import parse_config
from facedoor.match import Gallery
from facedoor.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
YUNET = SHARED / "models/yunet/face_detection_yunet_2023mar.onnx"
FRAME_W, FRAME_H = 640, 480


def make_frames(count: int, seed: int = 0) -> list[bytes]:
    """JPEG 640x480 frames: a background scene with one LFW face photo pasted at door distance."""
    rng = np.random.default_rng(seed)
    backgrounds = [cv2.imread(str(p)) for p in sorted((SHARED / "data/nst").glob("*.jpg"))]
    backgrounds = [cv2.resize(b, (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA) for b in backgrounds if b is not None]
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


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000.0


def stats(samples: list[float]) -> tuple[float, float]:
    return float(np.median(samples)), float(np.percentile(samples, 95))


def run_facedoor(pipeline: FacePipeline, frames: list[bytes], gallery: Gallery, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in ("decode", "detect", "align", "encode", "match", "total")}
    found = 0
    for r in range(rounds + 1):  # round 0 warms up
        for data in frames:
            image, t_dec = timed(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
            faces, t_det = timed(lambda: pipeline.detect(image))
            crops, t_al = timed(lambda: pipeline.crops(image, faces[:1]))
            emb, t_enc = timed(lambda: pipeline.encoder(crops))
            _, t_match = timed(lambda: gallery.identify(emb[0]) if len(emb) else None)
            if r:
                found += bool(faces)
                for key, value in zip(times, (t_dec, t_det, t_al, t_enc, t_match, t_dec + t_det + t_al + t_enc + t_match)):
                    times[key].append(value)
    times["found"] = [found / (rounds * len(frames))]
    return times


def run_face_recognition(frames: list[bytes], known: np.ndarray, rounds: int) -> dict[str, list[float]] | None:
    try:
        import face_recognition
    except ImportError:
        return None
    times: dict[str, list[float]] = {k: [] for k in ("decode", "detect", "encode", "match", "total")}
    found = 0
    for r in range(rounds + 1):
        for data in frames:
            rgb, t_dec = timed(lambda: cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                                                    cv2.COLOR_BGR2RGB))
            boxes, t_det = timed(lambda: face_recognition.face_locations(rgb))
            enc, t_enc = timed(lambda: face_recognition.face_encodings(rgb, boxes[:1]))
            _, t_match = timed(lambda: face_recognition.face_distance(known, enc[0]) if enc else None)
            if r:
                found += bool(boxes)
                for key, value in zip(times, (t_dec, t_det, t_enc, t_match, t_dec + t_det + t_enc + t_match)):
                    times[key].append(value)
    times["found"] = [found / (rounds * len(frames))]
    return times


def random_gallery(n: int, dim: int, threshold: float, seed: int = 1) -> Gallery:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return Gallery([f"person{i // 3}" for i in range(n)], v, threshold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    args = ap.parse_args(argv)

    frames = make_frames(args.frames)
    results: dict[str, dict[str, list[float]]] = {}
    for detector in ("yunet", "mtcnn"):
        cfg = parse_config({"models": str(args.models), "recognition": {
            "detector": detector, "yunet_model": str(YUNET), "threads": args.threads}})
        pipeline = FacePipeline.from_config(cfg)
        gallery = random_gallery(1000, pipeline.embedding_dim, pipeline.threshold)
        results[detector] = run_facedoor(pipeline, frames, gallery, args.rounds)
    fr = run_face_recognition(frames, np.random.default_rng(2).normal(size=(1000, 128)), args.rounds)
    if fr is not None:
        results["face_recognition"] = fr

    print(f"# {args.frames} frames {FRAME_W}x{FRAME_H} x {args.rounds} rounds, one face each; "
          f"{os.cpu_count()} CPUs, ORT threads {args.threads or 'default'}; times in ms (median / p95)")
    names = list(results)
    print("stage      | " + " | ".join(f"{n:>19}" for n in names))
    for stage in ("decode", "detect", "align", "encode", "match", "total"):
        cells = []
        for n in names:
            cells.append(f"{'%7.2f / %7.2f' % stats(results[n][stage]):>19}" if stage in results[n] else f"{'-':>19}")
        print(f"{stage:10} | " + " | ".join(cells))
    print("faces found| " + " | ".join(f"{100 * results[n]['found'][0]:18.0f}%" for n in names))
    if fr is not None:
        base = stats(fr["total"])[0]
        print("speed-up vs face_recognition (median total): "
              + ", ".join(f"{n} {base / stats(results[n]['total'])[0]:.1f}x" for n in names if n != "face_recognition"))

    big = random_gallery(100_000, 128, 0.7, seed=3)
    queries = np.random.default_rng(4).normal(size=(200, 128)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for q in queries[:10]:
        big.identify(q)
    samples = [timed(lambda q=q: big.identify(q))[1] for q in queries]
    print("identify against 100,000 stored embeddings: %.2f ms median, %.2f ms p95" % stats(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
