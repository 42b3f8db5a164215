"""Float vs INT8 FaceNet on the LFW DevTrain pairs: embedding shift, FAR/FRR and speed, side by side.

Every photo of `../shared/data/faces/lfw-devtrain/pairsDevTrain.txt` (1,100 genuine + 1,100
impostor pairs) is detected once (MTCNN), aligned (similarity) and encoded by both encoders from
the same crop, as a camera frame is encoded (one pass). Prints the per-crop L2 distance between
the float and INT8 embeddings, FAR/FRR at thresholds around 0.7, the pairs whose decision at 0.7
flips, the rule for making INT8 the default (FAR does not rise, FRR rises by < 0.5 points) and
the encoder time per face at 2 threads and 1 thread (alternating calls, medians).
The calibration set of `facedoor-export --only facenet_int8` holds no person of these pairs.

    .venv/bin/python benchmarks/quantization.py [--models models] [--limit N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from facedoor.config import parse_config
from facedoor.embed import Encoder
from facedoor.models import Manifest
from facedoor.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared/data/faces/lfw-devtrain"
THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 1.0)
DECISION = 0.7


def read_pairs(root: Path) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(genuine, impostor) photo path pairs of ROOT/pairsDevTrain.txt."""
    def photo(name: str, number: str) -> Path:
        return root / name / f"{name}_{int(number):04d}.jpg"

    genuine, impostor = [], []
    for line in (root / "pairsDevTrain.txt").read_text().splitlines()[1:]:
        f = line.split("\t")
        if len(f) == 3:
            genuine.append((photo(f[0], f[1]), photo(f[0], f[2])))
        elif len(f) == 4:
            impostor.append((photo(f[0], f[1]), photo(f[2], f[3])))
    return genuine, impostor


def crops_of(pipeline: FacePipeline, paths: list[Path]) -> dict[Path, np.ndarray]:
    """The aligned crop of each photo's largest face (photos without one are left out)."""
    out = {}
    for i, path in enumerate(paths):
        image = cv2.imread(str(path))
        faces = pipeline.detect_still(image) if image is not None else []
        if faces:
            out[path] = pipeline.crops(image, faces[:1])[0]
        if (i + 1) % 500 == 0:
            print(f"# {i + 1}/{len(paths)} photos aligned", file=sys.stderr)
    return out


def embed(encoder: Encoder, crops: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([encoder(crops[i : i + batch]) for i in range(0, len(crops), batch)])


def rates(genuine: np.ndarray, impostor: np.ndarray, t: float) -> tuple[float, float]:
    """(FAR %, FRR %) at T; a match is a distance strictly below T."""
    return 100.0 * float(np.mean(impostor < t)), 100.0 * float(np.mean(genuine >= t))


def encoder_speed(models: Path, names: list[str], threads: int, crops: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Median ms per one-face encoder call, the encoders called alternately on the same crops."""
    manifest = Manifest.load(models)
    encoders = {n: Encoder(manifest, n, threads) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        for crop in crops:
            for n, enc in encoders.items():
                t0 = time.perf_counter()
                enc(crop[None])
                if r:
                    times[n].append((time.perf_counter() - t0) * 1000.0)
    return {n: float(np.median(v)) for n, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--lfw", type=Path, default=LFW, help="LFW DevTrain directory with pairsDevTrain.txt")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of each kind (quick runs)")
    args = ap.parse_args(argv)

    if "facenet_int8" not in Manifest.load(args.models).entries:
        print(f"(no facenet_int8 in {args.models}/manifest.json: build it with "
              f"`facedoor-export --out {args.models} --only facenet_int8`)")
        return 0
    if not (args.lfw / "pairsDevTrain.txt").is_file():
        print(f"(LFW DevTrain pairs not found at {args.lfw}: see ../shared/README.md)")
        return 0
    genuine, impostor = read_pairs(args.lfw)
    genuine, impostor = genuine[: args.limit], impostor[: args.limit]
    pipeline = FacePipeline.from_config(parse_config({"models": str(args.models)}))
    int8 = Encoder(Manifest.load(args.models), "facenet_int8")
    paths = sorted({p for pair in genuine + impostor for p in pair})
    t0 = time.perf_counter()
    crops = crops_of(pipeline, paths)
    keys = list(crops)
    stack = np.stack([crops[k] for k in keys])
    emb_f, emb_q = embed(pipeline.encoder, stack), embed(int8, stack)
    row = {k: i for i, k in enumerate(keys)}
    shift = np.linalg.norm(emb_f - emb_q, axis=1)
    print(f"# LFW DevTrain pairs: {len(paths)} photos, {len(paths) - len(keys)} without a face, "
          f"{time.perf_counter() - t0:.0f} s; MTCNN + similarity alignment, one encoder pass per photo")
    print(f"per-crop L2(float, INT8) over {len(keys)} crops: median {np.median(shift):.4f}, "
          f"p95 {np.percentile(shift, 95):.4f}, max {shift.max():.4f}")

    def distances(pairs: list[tuple[Path, Path]], emb: np.ndarray) -> np.ndarray:
        kept = [(row[a], row[b]) for a, b in pairs if a in row and b in row]
        ia, ib = np.array(kept).T
        return np.linalg.norm(emb[ia] - emb[ib], axis=1)

    g_f, i_f = distances(genuine, emb_f), distances(impostor, emb_f)
    g_q, i_q = distances(genuine, emb_q), distances(impostor, emb_q)
    print(f"\n## {len(g_f)} genuine / {len(i_f)} impostor pairs with both faces found -- FAR % / FRR %")
    print("threshold |      float FAR / FRR |       INT8 FAR / FRR")
    for t in THRESHOLDS:
        (af, rf), (aq, rq) = rates(g_f, i_f, t), rates(g_q, i_q, t)
        print(f"{t:9.1f} | {af:8.2f} / {rf:9.2f} | {aq:8.2f} / {rq:9.2f}")
    pair_shift = np.abs(np.concatenate([g_f - g_q, i_f - i_q]))
    flips = int(np.sum((g_f < DECISION) != (g_q < DECISION)) + np.sum((i_f < DECISION) != (i_q < DECISION)))
    print(f"pair distance |float - INT8|: median {np.median(pair_shift):.4f}, max {pair_shift.max():.4f}; "
          f"decisions at {DECISION} that differ: {flips} of {len(pair_shift)}")
    (af, rf), (aq, rq) = rates(g_f, i_f, DECISION), rates(g_q, i_q, DECISION)
    verdict = "INT8 may be the default" if aq <= af and rq - rf < 0.5 else "INT8 stays an option (float default)"
    print(f"rule at {DECISION}: FAR {af:.2f} -> {aq:.2f}, FRR {rf:.2f} -> {rq:.2f} "
          f"(FRR {rq - rf:+.2f} points): {verdict}")

    sample = stack[:: max(1, len(stack) // 40)][:40]
    for threads in (2, 1):
        ms = encoder_speed(args.models, ["facenet", "facenet_int8"], threads, sample)
        print(f"encoder, one face, {threads} thread(s): float {ms['facenet']:.1f} ms, INT8 {ms['facenet_int8']:.1f} ms "
              f"median ({ms['facenet'] / ms['facenet_int8']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
