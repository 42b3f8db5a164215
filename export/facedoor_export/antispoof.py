"""MiniFASNet anti-spoofing models (Silent-Face, already ONNX): checked, sped up, parity-checked and pinned.

The two files cannot be fetched by the project; the user gives the directory that holds them
(`--antispoof-dir DIR`). Each must load in ONNX Runtime with input [1, 3, 80, 80] and 3 logits
out. Its PRelus are rewritten as Relu, Mul and Add (`convert.prelu_as_relu`: 2.4x faster on one
core), the result must give the original's logits within PARITY_TOLERANCE on PARITY_INPUTS random
crops, and then it is staged with the run like every exported model. No TensorFlow is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from facedoor.liveness import MODEL_SCALES
from facedoor.models import sha256_file
from facedoor_export.convert import PARITY_TOLERANCE, ExportContext, prelu_as_relu, staged_file_fields
from facedoor_export.errors import ExportError

# manifest entry -> (file in --antispoof-dir, crop scale of the face box the network was trained on)
MODELS: dict[str, tuple[str, float]] = {
    "antispoof_v2": ("MiniFASNetV2.onnx", MODEL_SCALES["antispoof_v2"]),
    "antispoof_v1se": ("MiniFASNetV1SE.onnx", MODEL_SCALES["antispoof_v1se"]),
}
INPUT_SHAPE = [1, 3, 80, 80]
CLASSES = 3
PARITY_INPUTS = 4


def _session(data: bytes) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _check(name: str, path: Path) -> tuple[bytes, Any, float]:
    """PATH's model with its PRelus rewritten, its ORT session and the largest logit difference from the
    original, or an ExportError saying what is wrong with it."""
    import onnx

    data = path.read_bytes()
    try:
        original = _session(data)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{name}: {path} is not a model ONNX Runtime can load ({exc})") from exc
    inputs, outputs = original.get_inputs(), original.get_outputs()
    if len(inputs) != 1 or list(inputs[0].shape) != INPUT_SHAPE:
        raise ExportError(f"{name}: {path} has inputs {[list(i.shape) for i in inputs]}, expected one {INPUT_SHAPE}")
    if len(outputs) != 1 or outputs[0].shape[-1] != CLASSES:
        raise ExportError(f"{name}: {path} has outputs {[list(o.shape) for o in outputs]}, expected one [1, {CLASSES}]")
    model = onnx.load_from_string(data)
    prelu_as_relu(model)
    data = model.SerializeToString()
    session = _session(data)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(PARITY_INPUTS):
        x = {inputs[0].name: (rng.random(INPUT_SHAPE, dtype=np.float32) * 255).astype(np.float32)}
        worst = max(worst, float(np.max(np.abs(original.run(None, x)[0] - session.run(None, x)[0]))))
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(f"{name}: the rewritten model differs from {path} by {worst:.3g} (> {PARITY_TOLERANCE:g})")
    return data, session, worst


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Copy and pin both MiniFASNet files from --antispoof-dir."""
    directory: Path | None = ctx.args.antispoof_dir
    if directory is None:
        raise ExportError("antispoof: --antispoof-dir DIR is required (the directory holding "
                          f"{' and '.join(f for f, _ in MODELS.values())})")
    missing = [f for f, _ in MODELS.values() if not (directory / f).is_file()]
    if missing:
        raise ExportError(f"antispoof: {directory} lacks {', '.join(missing)}")
    results = []
    for name, (filename, scale) in MODELS.items():
        source = directory / filename
        weights_sha256 = sha256_file(source)
        previous = ctx.fresh(name, weights_sha256)
        if previous is not None:
            results.append((name, previous))
            continue
        data, session, worst = _check(name, source)
        entry = {
            "kind": "antispoof",
            "preprocessing": {"color": "BGR", "normalize": "affine", "mean": [0.0, 0.0, 0.0], "scale": 1.0,
                              "input_range": [0, 255],
                              "resize": f"face box scaled {scale} around its centre, resized to 80x80"},
            "crop_scale": scale,
            "live_class": 1,
            "architecture": filename.removesuffix(".onnx") + " (Silent-Face anti-spoofing)",
            "weights": {"source": str(source.resolve()), "sha256": weights_sha256, "untrained": False},
            **staged_file_fields(ctx, name, data, session, default_layout="NCHW"),
            "parity_reference": f"{filename} as given (PRelu rewritten)",
            "parity_max_abs_diff": worst,
            "parity_inputs": PARITY_INPUTS,
            "source_digest": ctx.digest,
        }
        print(f"{name}: logits within {worst:.3g} of {filename}; pinned {ctx.out / entry['file']} "
              f"(sha256 {entry['sha256'][:12]}...)")
        results.append((name, entry))
    return results
