"""OpenFace nn4.small2.v1 (96x96 RGB in [0, 1] -> L2-normalised 128-D) from the OpenFace CSVs.

The network is the Keras port of the Torch model (Keras-OpenFace, used by the original
FaceNet exercise): 7x7 stem with two local response normalisations, inception blocks
3a, 3b, 3c, 4a, 4e, 5a, 5b, average pool, dense 736 -> 128. 3b and 4a pool with an L2 pool
(sqrt(9 * avgpool(x^2))). Weights come from one CSV file per tensor, exported from Torch:
`<layer>_w.csv` / `_b.csv` for convolutions (`_w` holds [out, in, kh, kw] row-major),
`<bn>_w/_b/_m/_v.csv` for batch norm (gamma, beta, mean, variance) and `dense_w.csv`
([128, 736]) / `dense_b.csv`.
"""
from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers
from tqdm import tqdm

from facedoor_export.convert import ExportContext, export_encoder
from facedoor_export.errors import ExportError

log = logging.getLogger(__name__)

NAME = "openface"
INPUT_SIZE = 96
EMBEDDING_DIM = 128
PARAMS = 3_743_280
PREPROCESSING = {
    "color": "RGB",
    "normalize": "affine",
    "mean": [0.0, 0.0, 0.0],
    "scale": 1.0 / 255.0,
    "input_range": [0, 255],
    "resize": "aligned face crop resized to 96x96",
}
_SPLIT = re.compile(r"[,\s]+")


@keras.saving.register_keras_serializable(package="facedoor")
class LRN(layers.Layer):
    """Local response normalisation across channels (tf.nn.lrn: radius 5, alpha 1e-4, beta 0.75)."""

    def call(self, inputs: Any) -> Any:
        import tensorflow as tf

        return tf.nn.lrn(inputs, depth_radius=5, bias=1.0, alpha=1e-4, beta=0.75)


@keras.saving.register_keras_serializable(package="facedoor")
class L2Pool(layers.Layer):
    """L2 pooling of the Torch model: sqrt(sum of squares over a 3x3 window), stride 3."""

    def call(self, inputs: Any) -> Any:
        from keras import ops

        pooled = ops.average_pool(ops.square(inputs), pool_size=3, strides=3, padding="valid")
        return ops.sqrt(pooled * 9.0)


def _conv_bn(x: Any, prefix: str, filters: int, kernel: int = 1, strides: int = 1,
             pad: int = 0, suffix: str = "") -> Any:
    if pad:
        x = layers.ZeroPadding2D(pad, name=f"{prefix}_pad{suffix}")(x)
    x = layers.Conv2D(filters, kernel, strides=strides, name=f"{prefix}_conv{suffix}")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1e-5, name=f"{prefix}_bn{suffix}")(x)
    return layers.Activation("relu", name=f"{prefix}_relu{suffix}")(x)


def _tower(x: Any, prefix: str, reduce: int, out: int, kernel: int, strides: int = 1) -> Any:
    """1x1 reduction then a kxk convolution (names `<prefix>_conv1/_bn1`, `_conv2/_bn2`)."""
    x = _conv_bn(x, prefix, reduce, suffix="1")
    return _conv_bn(x, prefix, out, kernel, strides, pad=kernel // 2, suffix="2")


_POOLS: dict[str, Callable[[str], layers.Layer]] = {
    "max": lambda p: layers.MaxPooling2D(3, strides=2, name=f"{p}_maxpool"),
    "avg": lambda p: layers.AveragePooling2D(3, strides=3, name=f"{p}_avgpool"),
    "l2": lambda p: L2Pool(name=f"{p}_l2pool"),
}


def _inception(x: Any, block: str, pool: str, pool_pad: Any, towers: list[tuple[int, ...]],
               pool_filters: int = 0, filters_1x1: int = 0) -> Any:
    """Inception block BLOCK: concatenation of the TOWERS (reduce, out, kernel[, strides]), the
    POOL branch (1x1 conv of POOL_FILTERS if given, zero-padded by POOL_PAD back to the towers'
    size) and, if FILTERS_1X1, a 1x1 conv branch."""
    p = f"inception_{block}"
    branches = [_tower(x, f"{p}_{t[2]}x{t[2]}", *t) for t in towers]
    y = _POOLS[pool](p)(x)
    if pool_filters:
        y = _conv_bn(y, f"{p}_pool", pool_filters)
    pad_name = f"{p}_pool_pad2" if pool_filters else f"{p}_pool_pad"
    branches.append(layers.ZeroPadding2D(pool_pad, name=pad_name)(y))
    if filters_1x1:
        branches.append(_conv_bn(x, f"{p}_1x1", filters_1x1))
    return layers.Concatenate(axis=3, name=p)(branches)


def build_model() -> keras.Model:
    """nn4.small2.v1 as ported to Keras by Keras-OpenFace, L2-normalised inside the graph."""
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="input")
    x = layers.ZeroPadding2D(3, name="pad1")(inputs)
    x = layers.Conv2D(64, 7, strides=2, name="conv1")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1e-5, name="bn1")(x)
    x = layers.Activation("relu", name="relu1")(x)
    x = layers.ZeroPadding2D(1, name="pad2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = LRN(name="lrn_1")(x)
    x = layers.Conv2D(64, 1, name="conv2")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1e-5, name="bn2")(x)
    x = layers.Activation("relu", name="relu2")(x)
    x = layers.ZeroPadding2D(1, name="pad3")(x)
    x = layers.Conv2D(192, 3, name="conv3")(x)
    x = layers.BatchNormalization(axis=3, epsilon=1e-5, name="bn3")(x)
    x = layers.Activation("relu", name="relu3")(x)
    x = LRN(name="lrn_2")(x)
    x = layers.ZeroPadding2D(1, name="pad4")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)

    x = _inception(x, "3a", "max", ((3, 4), (3, 4)), [(96, 128, 3), (16, 32, 5)], 32, 64)  # 12x12
    x = _inception(x, "3b", "l2", 4, [(96, 128, 3), (32, 64, 5)], 64, 64)
    x = _inception(x, "3c", "max", ((0, 1), (0, 1)), [(128, 256, 3, 2), (32, 64, 5, 2)])  # -> 6x6
    x = _inception(x, "4a", "l2", 2, [(96, 192, 3), (32, 64, 5)], 128, 256)
    x = _inception(x, "4e", "max", ((0, 1), (0, 1)), [(160, 256, 3, 2), (64, 128, 5, 2)])  # -> 3x3
    x = _inception(x, "5a", "avg", 1, [(96, 384, 3)], 96, 256)
    x = _inception(x, "5b", "max", 1, [(96, 384, 3)], 96, 256)

    x = layers.AveragePooling2D(3, strides=1, name="avgpool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(EMBEDDING_DIM, name="dense_layer")(x)
    x = layers.UnitNormalization(axis=-1, name="L2Normalize")(x)
    model = keras.Model(inputs, x, name="openface_nn4_small2_v1")
    if model.count_params() != PARAMS:
        raise ExportError(f"OpenFace architecture has {model.count_params():,} parameters, "
                          f"expected {PARAMS:,}")
    return model


def csv_files(model: keras.Model) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """{CSV file name: (layer, weight, Torch-order shape)} for every weight of MODEL."""
    files: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            files[f"{layer.name}_w.csv"] = (layer.name, "kernel", (cout, cin, kh, kw))
            files[f"{layer.name}_b.csv"] = (layer.name, "bias", (cout,))
        elif isinstance(layer, layers.BatchNormalization):
            c = layer.gamma.shape[0]
            for suffix, weight in (("w", "gamma"), ("b", "beta"), ("m", "moving_mean"),
                                   ("v", "moving_variance")):
                files[f"{layer.name}_{suffix}.csv"] = (layer.name, weight, (c,))
        elif isinstance(layer, layers.Dense):
            cin, cout = layer.kernel.shape
            files["dense_w.csv"] = (layer.name, "kernel", (cout, cin))
            files["dense_b.csv"] = (layer.name, "bias", (cout,))
    return files


def read_csv(path: Path, count: int) -> np.ndarray:
    """COUNT float32 values from one OpenFace CSV; ExportError naming the file otherwise."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ExportError(f"OpenFace weights file {path} is missing "
                          "(--openface-weights DIR must hold all the CSV files)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read OpenFace weights file {path}: {exc}") from exc
    tokens = [t for t in _SPLIT.split(text) if t]
    if len(tokens) != count:
        raise ExportError(f"{path}: {len(tokens)} values, expected {count} "
                          "(truncated or wrong file?)")
    try:
        return np.array(tokens, dtype=np.float64).astype(np.float32)
    except ValueError:
        bad = next(i for i, t in enumerate(tokens) if not _is_number(t))
        raise ExportError(f"{path}: value {bad + 1} ({tokens[bad][:20]!r}) is not a number") from None


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def weights_digest(directory: Path, names: list[str]) -> str:
    """SHA-256 over the named CSV files (name + content), identifying one set of weights."""
    digest = hashlib.sha256()
    for name in sorted(names):
        path = directory / name
        digest.update(name.encode() + b"\0")
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            raise ExportError(f"OpenFace weights file {path} is missing "
                              "(--openface-weights DIR must hold all the CSV files)") from None
        except OSError as exc:
            raise ExportError(f"cannot read OpenFace weights file {path}: {exc}") from exc
    return digest.hexdigest()


def load_model(directory: Path) -> keras.Model:
    """The model with every weight read from DIRECTORY's CSV files (all must be present)."""
    model = build_model()
    files = csv_files(model)
    extra = sorted({p.name for p in directory.glob("*.csv")} - set(files))
    if extra:
        log.info("ignoring %d CSV file(s) the network does not use in %s: %s",
                 len(extra), directory, ", ".join(extra[:5]))
    for name, (layer_name, weight, shape) in tqdm(files.items(), desc="reading OpenFace CSVs",
                                                  unit="file", leave=False):
        values = read_csv(directory / name, int(np.prod(shape))).reshape(shape)
        if len(shape) == 4:
            values = values.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
        elif len(shape) == 2:
            values = values.T  # [out, in] -> [in, out]
        getattr(model.get_layer(layer_name), weight).assign(values)
    return model


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Export OpenFace nn4.small2.v1 from --openface-weights DIR to OUT/openface.onnx."""
    directory = getattr(ctx.args, "openface_weights", None)
    if directory is None:
        raise ExportError("OpenFace weights not given: pass --openface-weights DIR, the folder "
                          "of the OpenFace CSV weight files (iwantooxxoox/Keras-OpenFace weights/)")
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"OpenFace weights directory {directory} not found "
                          "(given by --openface-weights)")
    names = list(csv_files(build_model()))
    sha = weights_digest(directory, names)
    fresh = ctx.fresh(NAME, sha)
    if fresh:
        return [(NAME, fresh)]
    print(f"{NAME}: building nn4.small2.v1 and loading {len(names)} CSV files from {directory}")
    model = load_model(directory)
    return export_encoder(
        ctx, NAME, model, INPUT_SIZE,
        architecture="OpenFace nn4.small2.v1 (Keras-OpenFace port)", params=PARAMS,
        embedding_dim=EMBEDDING_DIM, preprocessing=PREPROCESSING,
        weights={"source": str(directory.resolve()), "sha256": sha, "untrained": False,
                 "sha256_of": f"the {len(names)} CSV files (name + bytes, sorted by name)"})
