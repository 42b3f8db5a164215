"""MiniFASNet anti-spoofing models (Silent-Face, already ONNX): checked, copied and pinned in the manifest.

The two files cannot be fetched by the project; the user gives the directory that holds them
(`--antispoof-dir DIR`). Each must load in ONNX Runtime with input [1, 3, 80, 80] and 3 logits
out; then it is staged with the run like every exported model. No TensorFlow is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from facedoor.liveness import MODEL_SCALES
from facedoor.models import sha256_file
from facedoor_export.convert import ExportContext, staged_file_fields
from facedoor_export.errors import ExportError

# manifest entry -> (file in --antispoof-dir, crop scale of the face box the network was trained on)
MODELS: dict[str, tuple[str, float]] = {
    "antispoof_v2": ("MiniFASNetV2.onnx", MODEL_SCALES["antispoof_v2"]),
    "antispoof_v1se": ("MiniFASNetV1SE.onnx", MODEL_SCALES["antispoof_v1se"]),
}
INPUT_SHAPE = [1, 3, 80, 80]
CLASSES = 3


def _check(name: str, path: Path) -> tuple[bytes, Any]:
    """PATH's bytes and its ORT session, or an ExportError saying what is wrong with it."""
    import onnxruntime as ort

    data = path.read_bytes()
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"{name}: {path} is not a model ONNX Runtime can load ({exc})") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or list(inputs[0].shape) != INPUT_SHAPE:
        raise ExportError(f"{name}: {path} has inputs {[list(i.shape) for i in inputs]}, expected one {INPUT_SHAPE}")
    if len(outputs) != 1 or outputs[0].shape[-1] != CLASSES:
        raise ExportError(f"{name}: {path} has outputs {[list(o.shape) for o in outputs]}, expected one [1, {CLASSES}]")
    return data, session


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
        data, session = _check(name, source)
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
            "source_digest": ctx.digest,
        }
        print(f"{name}: pinned {ctx.out / entry['file']} (sha256 {entry['sha256'][:12]}...)")
        results.append((name, entry))
    return results
