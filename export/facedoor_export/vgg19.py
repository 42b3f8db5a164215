"""VGG-19 convolution weights (Keras `VGG19(include_top=False)` layout) for neural style transfer.

Three sources: `imagenet` through Keras's own download (pinned hash), the Keras notop HDF5 file
given by path (hash checked before a byte is used), or deterministic untrained weights for tests.
Layers are named as in the exercise (`conv1_1` ... `conv5_1`); Keras calls them `block1_conv1`.
Kernels are `[3, 3, in, out]` (TensorFlow order); the Keras weights were converted from Caffe and
expect BGR input minus the ImageNet means (`nst_graph` flips conv1_1 so the graph takes RGB).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facedoor_export.errors import ExportError

WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
               + WEIGHTS_FILE)
# The hash Keras itself pins for this file (keras/src/applications/vgg19.py, `file_hash`).
# Keras records an MD5, not a SHA-256; the manifest records the file's SHA-256 after the check.
WEIGHTS_MD5 = "253f8cb515780f3b799900260a226db6"

# (name, in_channels, out_channels) per conv layer, "pool" between blocks, up to conv5_1.
PLAN: tuple[tuple[str, int, int] | str, ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool",
    ("conv2_1", 64, 128), ("conv2_2", 128, 128), "pool",
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256),
    "pool",
    ("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512), ("conv4_4", 512, 512),
    "pool",
    ("conv5_1", 512, 512),
)
CONV_LAYERS: tuple[str, ...] = tuple(step[0] for step in PLAN if not isinstance(step, str))
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)


def keras_name(layer: str) -> str:
    """`conv3_2` -> Keras's `block3_conv2`."""
    block, index = layer[len("conv"):].split("_")
    return f"block{block}_conv{index}"


@dataclass
class VGGWeights:
    """Kernels `[3,3,in,out]` and biases per layer, plus where they came from."""

    layers: dict[str, tuple[np.ndarray, np.ndarray]]
    source: str
    sha256: str
    untrained: bool


def untrained(seed: int = 0) -> VGGWeights:
    """Deterministic He-initialised weights: same shapes as the real ones, for tests only."""
    rng = np.random.default_rng(seed)
    layers = {}
    digest = hashlib.sha256(f"untrained-vgg19-he-normal-seed{seed}".encode())
    for name, cin, cout in (s for s in PLAN if not isinstance(s, str)):
        std = np.sqrt(2.0 / (9 * cin))
        kernel = (rng.standard_normal((3, 3, cin, cout)) * std).astype(np.float32)
        bias = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        layers[name] = (kernel, bias)
    return VGGWeights(layers, f"untrained (He normal, seed {seed})", digest.hexdigest(), True)


def file_hashes(path: Path) -> tuple[str, str]:
    """(md5, sha256) of PATH, read once in chunks."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            md5.update(block)
            sha.update(block)
    return md5.hexdigest(), sha.hexdigest()


def from_hdf5(path: Path, expected_hash: str = WEIGHTS_MD5) -> VGGWeights:
    """Load the Keras VGG19 notop HDF5 at PATH after checking its hash.

    EXPECTED_HASH is an MD5 (32 hex digits, Keras's pin by default) or a SHA-256 (64). A file
    that does not match is refused: different weights would silently change every stylisation.
    """
    import h5py

    if not path.is_file():
        raise ExportError(f"VGG-19 weights file {path} does not exist "
                          f"(expected Keras's {WEIGHTS_FILE})")
    md5, sha = file_hashes(path)
    expected = expected_hash.strip().lower()
    actual = sha if len(expected) == 64 else md5
    if actual != expected:
        kind = "SHA-256" if len(expected) == 64 else "MD5"
        raise ExportError(
            f"VGG-19 weights {path}: {kind} {actual} does not match the expected {expected}; "
            f"it is not Keras's {WEIGHTS_FILE} (pass --vgg19-weights-hash to accept another file)")
    layers = {}
    try:
        with h5py.File(path, "r") as h5:
            root = h5["model_weights"] if "model_weights" in h5 else h5
            for name, cin, cout in (s for s in PLAN if not isinstance(s, str)):
                group = root[keras_name(name)]
                names = [n.decode() if isinstance(n, bytes) else str(n)
                         for n in group.attrs["weight_names"]]
                arrays = [np.asarray(group[n], dtype=np.float32) for n in names]
                kernel = next((a for a in arrays if a.ndim == 4), None)
                bias = next((a for a in arrays if a.ndim == 1), None)
                if kernel is None or bias is None or kernel.shape != (3, 3, cin, cout) \
                        or bias.shape != (cout,):
                    raise ExportError(
                        f"VGG-19 weights {path}: layer {keras_name(name)} holds shapes "
                        f"{[a.shape for a in arrays]}, expected kernel (3, 3, {cin}, {cout}) "
                        f"and bias ({cout},)")
                layers[name] = (kernel, bias)
    except (OSError, KeyError) as exc:
        raise ExportError(f"VGG-19 weights {path}: not a Keras VGG19 notop HDF5 ({exc})") from exc
    return VGGWeights(layers, str(path), sha, False)


def imagenet() -> VGGWeights:
    """Keras's ImageNet notop weights, downloaded (and MD5-checked) by Keras into its cache."""
    import keras

    try:
        path = keras.utils.get_file(WEIGHTS_FILE, WEIGHTS_URL, cache_subdir="models",
                                    file_hash=WEIGHTS_MD5)
    except Exception as exc:  # urllib / HTTP / hash errors have many types
        raise ExportError(
            f"cannot download the VGG-19 ImageNet weights from {WEIGHTS_URL} ({exc}); "
            "on a machine without internet pass --vgg19-weights PATH (the Keras file) or "
            "--vgg19-untrained (tests only)") from exc
    weights = from_hdf5(Path(path))
    weights.source = f"imagenet ({WEIGHTS_URL})"
    return weights


def load_weights(args: Any) -> VGGWeights:
    """The weights the flags ask for: --vgg19-untrained, --vgg19-weights PATH, else imagenet."""
    if getattr(args, "vgg19_untrained", False):
        return untrained()
    path = getattr(args, "vgg19_weights", None)
    if path is not None:
        return from_hdf5(Path(path), getattr(args, "vgg19_weights_hash", None) or WEIGHTS_MD5)
    return imagenet()

