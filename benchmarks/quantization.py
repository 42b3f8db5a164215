"""Float vs INT8 FaceNet on the LFW DevTrain pairs: embedding shift, FAR/FRR and speed, side by side.

Two INT8 encoders are built from the float `facenet` of `--models` (into temporary copies, with
`facedoor-export --only facenet_int8`): the default one, calibrated on the 5-celebrity set of the
FaceNet source archive and its mirror images (what a fresh machine builds), and one calibrated on LFW
DevTrain people who are in none of the pairs (`--calibration-dir`). Every photo of
`../shared/data/faces/lfw-devtrain/pairsDevTrain.txt` (1,100 genuine + 1,100 impostor pairs) is
detected once (MTCNN), aligned (similarity) and encoded by the three encoders from the same crop,
as a camera frame is encoded (one pass). Prints the per-crop L2 distance between the float and
each INT8 embedding, FAR/FRR at thresholds around 0.7, the pair decisions at 0.7 that flip, the
rule for a default (FAR does not rise, FRR rises by < 0.5 points) of each INT8 encoder against the
float one and of the default calibration against the LFW one, how many genuine pairs lie so near
0.7 that the encoders' per-crop shifts move them across it (the rule's noise: a change of the
calibration crops in their last bits has moved the FRR by +0.45 points with the same per-crop
shift), the mean move of genuine and impostor distances (the systematic part), and the encoder
time per face at 2 threads and 1 thread (alternating calls, medians).

Every pair as well: the 1,100 genuine pairs put 52 within 0.01 of 0.7, so the official pairs
judge the FRR rule to a few pairs (0.09 points each). The benchmark also judges every encoder on
every within-person pair of the DevTrain people with two or more photos (up to `PER_PERSON`
each: about 8,000 genuine pairs) and on every cross-person pair of those photos (about 9
million impostor pairs, false accepts counted).

Calibration draws (`--draws K`, default 3): a door builds its own INT8 encoder, and another CPU's
float rounding moves MTCNN's landmarks, so the calibration crops, in their last bits. Each draw
re-quantises with the default calibration photos cut from landmarks moved by N(0, 0.01 px)
(`NudgedMTCNN`), and the rule is also judged on the mean FRR change of the default build and the
draws: what a door can expect, where one build is a single throw.

    .venv/bin/python benchmarks/quantization.py [--models models] [--limit N] [--draws K]
        [--int8-weights auto|int8|uint8]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from facedoor.align import Aligner
from facedoor.config import parse_config
from facedoor.detect import Face, MTCNNDetector
from facedoor.embed import Encoder
from facedoor.models import Manifest, sha256_file
from facedoor.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]
LFW = REPO.parent / "shared/data/faces/lfw-devtrain"
THRESHOLDS = (0.6, 0.7, 0.8, 0.9, 1.0)
DECISION = 0.7
NEAR = 0.01  # a pair this close to DECISION can cross it on a per-crop shift of the INT8 encoder
NUDGE = 0.01  # px: standard deviation of the landmark moves of a calibration draw
PER_PERSON = 8  # photos of each person in the every-pair comparison
COUNTED = "false accepts {:.0f} -> {:.1f}"  # `rule`'s accepts as counts (the every-pair comparison)


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


def person_photos(root: Path, limit: int = PER_PERSON) -> dict[str, list[Path]]:
    """The first LIMIT photos of each person of ROOT who has two or more."""
    people = {d.name: sorted(d.glob("*.jpg"))[:limit] for d in sorted(root.iterdir()) if d.is_dir()}
    return {name: photos for name, photos in people.items() if len(photos) >= 2}


def every_pair(emb: dict[str, np.ndarray], owner: np.ndarray) -> None:
    """False accepts and FRR at DECISION of each encoder in EMB (float first) over every within-person
    and every cross-person pair of its rows (OWNER: each row's person); the rule against float per
    build, and over the default calibration's builds (the export's and the draws) on the means."""
    people, photos = np.unique(owner, return_counts=True)
    gi, gj = np.array([(a, b) for k in people for a, b in itertools.combinations(np.nonzero(owner == k)[0], 2)]).T
    base = np.linalg.norm(emb["float"][gi] - emb["float"][gj], axis=1)
    pairs = int(len(owner) ** 2 - np.sum(photos**2)) // 2
    print(f"\n## every pair: {len(gi)} within-person pairs ({len(people)} people, up to {PER_PERSON} "
          f"photos each) and {pairs} cross-person pairs of the same {len(owner)} crops, at {DECISION}")
    at: dict[str, tuple[float, float]] = {}  # (false accepts, FRR %)
    for name, e in emb.items():
        g = np.linalg.norm(e[gi] - e[gj], axis=1)
        accepts = 0
        for start in range(0, len(e), 512):  # cross-person distances under DECISION, a block of rows at a time
            d2 = 2.0 - 2.0 * e[start : start + 512] @ e.T
            accepts += int(np.sum((d2 < DECISION**2) & (owner[start : start + 512, None] != owner[None, :])))
        at[name] = (accepts / 2, 100.0 * float(np.mean(g >= DECISION)))
        print(f"  {name}: {at[name][0]:.0f} false accepts, FRR {at[name][1]:.2f} % ({int(np.sum(g >= DECISION))} "
              f"pairs), genuine distances moved by a mean of {np.mean(g - base):+.4f}"
              + ("" if name == "float" else f"; vs float: {rule(at['float'], at[name], COUNTED)}"))
    throws = [n for n in emb if n == "INT8 (celebrities)" or n.startswith("INT8 (draw")]
    if len(throws) > 1:
        mean = (float(np.mean([at[n][0] for n in throws])), float(np.mean([at[n][1] for n in throws])))
        print(f"  the default calibration over {len(throws)} builds, on the means: {rule(at['float'], mean, COUNTED)}")


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


def build_int8(models: Path, target: Path, weights: str, calibration: Path | None) -> Path:
    """TARGET: a copy of MODELS' float FaceNet and MTCNN with `facenet_int8` built by the exporter."""
    from facedoor_export.cli import main as export

    target.mkdir()
    for entry in Manifest.load(models).entries.values():
        shutil.copy(models / entry.file, target / entry.file)
    shutil.copy(models / "manifest.json", target / "manifest.json")
    args = ["--out", str(target), "--only", "facenet_int8", "--force", "--int8-weights", weights]
    if export([*args, *(["--calibration-dir", str(calibration)] if calibration else [])]) != 0:
        raise SystemExit(f"building the INT8 encoder in {target} failed")
    return target


class NudgedMTCNN(MTCNNDetector):
    """MTCNN whose landmarks move by N(0, NUDGE) px: the calibration crops another CPU could cut."""

    def __init__(self, manifest: Manifest, seed: int):
        super().__init__(manifest, threads=None)
        self._rng = np.random.default_rng(seed)

    def detect(self, image_bgr: np.ndarray, min_face_size: int = 40) -> list[Face]:
        return [dataclasses.replace(f, landmarks=(f.landmarks + self._rng.normal(0, NUDGE, f.landmarks.shape))
                                    .astype(np.float32)) for f in super().detect(image_bgr, min_face_size)]


def build_draw(default: Path, target: Path, seed: int) -> Path:
    """TARGET: DEFAULT (a directory built by `build_int8` with the default calibration) with its INT8
    encoder re-quantised on the default calibration crops cut from nudged landmarks (seed SEED)."""
    from facedoor_export import quantize

    shutil.copytree(default, target)
    manifest = Manifest.load(target)
    entry, weights = manifest.entry("facenet"), manifest.entry("facenet_int8").extra("quantization")["weights"]
    size = entry.input_size[0] if entry.input_size else 160
    train, _ = quantize.celebrity_photos()
    crops = quantize.mirrored(quantize.aligned_crops(train, NudgedMTCNN(manifest, seed), Aligner("similarity", size)))
    model = target / manifest.entry("facenet_int8").file
    quantize.quantize(manifest.verify("facenet"), model, crops, entry, weights.split()[0])
    raw = json.loads((target / "manifest.json").read_text())
    raw["models"]["facenet_int8"].update(sha256=sha256_file(model),
                                         size=model.stat().st_size)
    (target / "manifest.json").write_text(json.dumps(raw, indent=2))
    return target


def rule(base: tuple[float, float], other: tuple[float, float], accepts: str = "FAR {:.2f} -> {:.2f}") -> str:
    """The rule for a default on (accepts, FRR %) pairs: accepts (FAR %, or false accepts counted, shown
    by the ACCEPTS format) do not rise and FRR rises by under half a point."""
    (af, rf), (aq, rq) = base, other
    ok = aq <= af and rq - rf < 0.5
    return (f"{accepts.format(af, aq)}, FRR {rf:.2f} -> {rq:.2f} ({rq - rf:+.2f} points): "
            f"{'passes' if ok else 'FAILS'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models", help="models directory with facenet + mtcnn")
    ap.add_argument("--lfw", type=Path, default=LFW, help="LFW DevTrain directory with pairsDevTrain.txt")
    ap.add_argument("--limit", type=int, default=None, help="first N pairs of each kind (quick runs)")
    ap.add_argument("--int8-weights", choices=("auto", "int8", "uint8"), default="auto",
                    help="weight type of both INT8 encoders (default auto: int8 where this CPU has VNNI/dotprod)")
    ap.add_argument("--draws", type=int, default=3, help="re-quantisations of the default from nudged landmarks")
    args = ap.parse_args(argv)

    if not (args.lfw / "pairsDevTrain.txt").is_file():
        print(f"(LFW DevTrain pairs not found at {args.lfw}: see ../shared/README.md)")
        return 0
    genuine, impostor = read_pairs(args.lfw)
    genuine, impostor = genuine[: args.limit], impostor[: args.limit]
    with tempfile.TemporaryDirectory(prefix="facedoor-quant-bench-") as tmp:
        built = {"INT8 (celebrities)": build_int8(args.models, Path(tmp) / "default", args.int8_weights, None),
                 "INT8 (LFW)": build_int8(args.models, Path(tmp) / "lfw", args.int8_weights, args.lfw)}
        for k in range(1, args.draws + 1):
            print(f"# calibration draw {k} of {args.draws}: landmarks nudged by N(0, {NUDGE} px)", file=sys.stderr)
            built[f"INT8 (draw {k})"] = build_draw(built["INT8 (celebrities)"], Path(tmp) / f"draw{k}", k)
        pipeline = FacePipeline.from_config(parse_config({"models": str(args.models),
                                                          "recognition": {"encoder": "facenet"}}))
        encoders = {"float": pipeline.encoder, **{name: Encoder(Manifest.load(d), "facenet_int8")
                                                  for name, d in built.items()}}
        q = {name: Manifest.load(d).entry("facenet_int8").extra("quantization") for name, d in built.items()}
        everyone = person_photos(args.lfw)
        paths = sorted({p for pair in genuine + impostor for p in pair} | {p for v in everyone.values() for p in v})
        t0 = time.perf_counter()
        crops = crops_of(pipeline, paths)
        keys = list(crops)
        stack = np.stack([crops[k] for k in keys])
        emb = {name: embed(enc, stack) for name, enc in encoders.items()}
        row = {k: i for i, k in enumerate(keys)}
        print(f"# LFW DevTrain pairs: {len(paths)} photos, {len(paths) - len(keys)} without a face, "
              f"{time.perf_counter() - t0:.0f} s; MTCNN + similarity alignment, one encoder pass per photo")
        for name, info in q.items():
            if "draw" in name:
                continue
            print(f"{name}: {info['weights']} weights, {info['calibration_crops']} calibration crops of "
                  f"{info['calibration_set']}; export check: median L2 {info['l2_median']:.4f}, "
                  f"max {info['l2_max']:.4f}")

        def distances(pairs: list[tuple[Path, Path]], e: np.ndarray) -> np.ndarray:
            kept = [(row[a], row[b]) for a, b in pairs if a in row and b in row]
            ia, ib = np.array(kept).T
            return np.linalg.norm(e[ia] - e[ib], axis=1)

        g = {name: distances(genuine, e) for name, e in emb.items()}
        i = {name: distances(impostor, e) for name, e in emb.items()}
        for name in built:
            shift = np.linalg.norm(emb["float"] - emb[name], axis=1)
            pair_shift = np.abs(np.concatenate([g["float"] - g[name], i["float"] - i[name]]))
            flips = int(np.sum((g["float"] < DECISION) != (g[name] < DECISION))
                        + np.sum((i["float"] < DECISION) != (i[name] < DECISION)))
            print(f"{name}: per-crop L2 to float over {len(keys)} crops: median {np.median(shift):.4f}, "
                  f"p95 {np.percentile(shift, 95):.4f}, max {shift.max():.4f}; pair distance shift median "
                  f"{np.median(pair_shift):.4f}, max {pair_shift.max():.4f}; decisions at {DECISION} that differ: "
                  f"{flips} of {len(pair_shift)}; genuine distances moved by a mean of "
                  f"{np.mean(g[name] - g['float']):+.4f} (impostor {np.mean(i[name] - i['float']):+.4f})")
        near = int(np.sum(np.abs(g["float"] - DECISION) < NEAR))
        share = 100 * near / len(g["float"])
        print(f"{near} genuine pairs lie within {NEAR} of {DECISION} under float ({share:.1f} % of them): shifts "
              f"that small move the FRR at {DECISION} by whole pairs either way, so the rule's margin is read "
              "against the mean moves above")
        names = list(emb)
        print(f"\n## {len(g['float'])} genuine / {len(i['float'])} impostor pairs with both faces found "
              "-- FAR % / FRR %")
        print("threshold | " + " | ".join(f"{n:>22}" for n in names))
        for t in THRESHOLDS:
            cells = [f"{'{:8.2f} / {:8.2f}'.format(*rates(g[n], i[n], t)):>22}" for n in names]
            print(f"{t:9.1f} | " + " | ".join(cells))
        at = {n: rates(g[n], i[n], DECISION) for n in names}
        print(f"\nrule at {DECISION} (FAR not up, FRR up by < 0.5 points):")
        for name in built:
            print(f"  {name} vs float: {rule(at['float'], at[name])}")
        print(f"  INT8 (celebrities) vs INT8 (LFW): {rule(at['INT8 (LFW)'], at['INT8 (celebrities)'])}")
        throws = [n for n in names if n == "INT8 (celebrities)" or n.startswith("INT8 (draw")]
        if len(throws) > 1:
            moves = [at[n][1] - at["float"][1] for n in throws]
            mean = (max(at[n][0] for n in throws), at["float"][1] + float(np.mean(moves)))
            print(f"  the default calibration over {len(throws)} builds (the export's and {len(throws) - 1} draw(s)), "
                  f"FRR changes {', '.join(f'{m:+.2f}' for m in moves)}; the worst FAR and the mean FRR: "
                  f"{rule(at['float'], mean)}")

        mine = [row[p] for v in everyone.values() for p in v if p in row]
        every_pair({n: e[mine] for n, e in emb.items()}, np.array([keys[r].parent.name for r in mine]))

        sample = stack[:: max(1, len(stack) // 40)][:40]
        default = built["INT8 (celebrities)"]
        for threads in (2, 1):
            ms = encoder_speed(default, ["facenet", "facenet_int8"], threads, sample)
            print(f"encoder, one face, {threads} thread(s): float {ms['facenet']:.1f} ms, INT8 "
                  f"{ms['facenet_int8']:.1f} ms median ({ms['facenet'] / ms['facenet_int8']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
