"""MTCNN P-Net / R-Net / O-Net rebuilt in Keras 3 with the weights of the `mtcnn==1.0.0` wheel.

The wheel stores each network's weights as a joblib list (`mtcnn/assets/weights/*.lz4`) in
the order of its `model.set_weights`; the functional models below create their variables in
that same order. What the detector around them must do (recorded in the manifest, as read
from mtcnn 1.0.0's `stages/` and `utils/`): decode images as RGB, keep them (H, W) -- no
transpose --, normalise with (x - 127.5) / 128, run P-Net on a pyramid (scale factor 0.709,
min face 20 px, 12-px cells at stride 2), and feed R-Net/O-Net square crops taken from the
normalised image with bilinear crop-and-resize to 24x24 / 48x48.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from facedoor.models import sha256_file
from facedoor_export.convert import (
    ExportContext,
    export_onnx,
    fold_keras_prelu,
    prelu_as_relu,
    random_samples,
    two_class_softmax_as_sigmoid,
)
from facedoor_export.errors import ExportError

WHEEL = "mtcnn==1.0.0"
PREPROCESSING = {
    "color": "RGB",
    "normalize": "affine",
    "mean": [127.5, 127.5, 127.5],
    "scale": 0.0078125,
    "input_range": [0, 255],
    "transposed": False,
    "crops": "square boxes cut from the normalised image, bilinear crop-and-resize",
}
# Detector constants of mtcnn 1.0.0 (detect_faces defaults), for the runtime to follow.
PIPELINE = {
    "min_face_size": 20,
    "scale_factor": 0.709,
    "pnet_stride": 2,
    "pnet_cell_size": 12,
    "thresholds": {"pnet": 0.6, "rnet": 0.7, "onet": 0.8},
    "nms": {"pnet_per_scale": 0.5, "pnet_all": 0.7, "rnet": 0.7, "onet": 0.7,
            "onet_method": "min"},
    "bbox_reg": "offsets [dx1, dy1, dx2, dy2] times the box (w, h), w = x2 - x1 + 1",
    "landmarks": "[x1..x5, y1..y5] relative: x = w * lx + x1 - 1, y = h * ly + y1 - 1; "
                 "left eye, right eye, nose, mouth left, mouth right",
    "prob": "softmax [not face, face]",
}


def _conv_prelu(x: Any, filters: int, kernel: int, name: str) -> Any:
    x = layers.Conv2D(filters, kernel, padding="valid", name=f"conv{name}")(x)
    return layers.PReLU(shared_axes=[1, 2], name=f"prelu{name}")(x)


def build_pnet() -> keras.Model:
    """P-Net: fully convolutional, any HxW >= 12; outputs per 12-px cell at stride 2."""
    inputs = keras.Input((None, None, 3), name="input")
    x = _conv_prelu(inputs, 10, 3, "1")
    x = layers.MaxPooling2D(2, strides=2, padding="same", name="pool1")(x)
    x = _conv_prelu(x, 16, 3, "2")
    x = _conv_prelu(x, 32, 3, "3")
    reg = layers.Conv2D(4, 1, name="conv4_1")(x)
    prob = layers.Conv2D(2, 1, activation="softmax", name="conv4_2")(x)
    return keras.Model(inputs, [reg, prob], name="mtcnn_pnet")


def _dense_head(x: Any, units: int, name: str) -> Any:
    # mtcnn's (Caffe-born) weights expect the feature map flattened in (W, H, C) order.
    x = layers.Permute((2, 1, 3), name="permute")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(units, name=f"fc{name}")(x)
    return layers.PReLU(name=f"prelu{name}")(x)


def _crop_net(name: str, side: int, stages: list[tuple[int, int, str]], last: int, units: int,
              heads: list[tuple[str | None, int]]) -> keras.Model:
    """R-Net / O-Net: 3x3 conv + pool STAGES (filters, pool size, padding), a 2x2 conv of LAST
    filters, a dense layer of UNITS, then one dense head per (activation, units) in HEADS."""
    inputs = keras.Input((side, side, 3), name="input")
    x = inputs
    for i, (filters, pool, padding) in enumerate(stages, 1):
        x = _conv_prelu(x, filters, 3, str(i))
        x = layers.MaxPooling2D(pool, strides=2, padding=padding, name=f"pool{i}")(x)
    n = len(stages) + 1
    x = layers.Conv2D(last, 2, padding="valid", name=f"conv{n}")(x)
    x = layers.PReLU(shared_axes=[1, 2], name=f"prelu{n}")(x)
    x = _dense_head(x, units, str(n + 1))
    outputs = [layers.Dense(size, activation=activation, name=f"fc{n + 2}_{j}")(x)
               for j, (activation, size) in enumerate(heads, 1)]
    return keras.Model(inputs, outputs, name=name)


def build_rnet() -> keras.Model:
    """R-Net: refines P-Net proposals from 24x24 crops (outputs bbox_reg, prob)."""
    return _crop_net("mtcnn_rnet", 24, [(28, 3, "same"), (48, 3, "valid")], 64, 128,
                     [(None, 4), ("softmax", 2)])


def build_onet() -> keras.Model:
    """O-Net: final boxes and 5 landmarks from 48x48 crops (outputs bbox_reg, landmarks, prob)."""
    return _crop_net("mtcnn_onet", 48, [(32, 3, "same"), (64, 3, "valid"), (64, 2, "same")], 128,
                     256, [(None, 4), (None, 10), ("softmax", 2)])


# name -> (builder, weights file, output names, fixed input side or None)
NETWORKS: dict[str, tuple[Callable[[], keras.Model], str, list[str], int | None]] = {
    "mtcnn_pnet": (build_pnet, "pnet.lz4", ["bbox_reg", "prob"], None),
    "mtcnn_rnet": (build_rnet, "rnet.lz4", ["bbox_reg", "prob"], 24),
    "mtcnn_onet": (build_onet, "onet.lz4", ["bbox_reg", "landmarks", "prob"], 48),
}


def weights_dir() -> Path:
    """`mtcnn/assets/weights` of the installed mtcnn wheel (found without importing it)."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the {WHEEL} wheel is not installed (pip install '.[export]'); "
                          "its weights are needed for the mtcnn group")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "weights"


def load_weights(model: keras.Model, path: Path) -> None:
    """Set MODEL's weights from a joblib list, checking count and every shape."""
    import joblib

    if not path.is_file():
        raise ExportError(f"MTCNN weights not found at {path} (from the {WHEEL} wheel)")
    try:
        arrays = list(joblib.load(path))
    except Exception as exc:  # joblib/lz4/pickle raise many types for a damaged file
        raise ExportError(f"cannot read MTCNN weights {path}: {exc}") from exc
    variables = model.weights
    if len(arrays) != len(variables):
        raise ExportError(f"{path}: {len(arrays)} stored arrays, {model.name} has "
                          f"{len(variables)} weights")
    for var, value in zip(variables, arrays):
        if tuple(np.shape(value)) != tuple(var.shape):
            raise ExportError(f"{path}: weight {var.path} has shape {np.shape(value)}, "
                              f"the model needs {tuple(var.shape)}")
        var.assign(np.asarray(value, dtype=np.float32))


def load_model(name: str, path: Path | None = None) -> keras.Model:
    """The named MTCNN network with the wheel's (or PATH's) weights."""
    builder, filename, _, _ = NETWORKS[name]
    model = builder()
    load_weights(model, path or weights_dir() / filename)
    return model


def fast_forms(model: Any, prelus: int, conv_softmaxes: int) -> None:
    """Each PReLU as one Relu, two Muls and an Add (`convert.fold_keras_prelu`, `convert.prelu_as_relu`):
    ONNX Runtime's blocked convolutions stay in their layout around them. 2 threads, AVX512 EPYC:
    P-Net 2.70 -> 2.52 ms, R-Net (44 crops) 1.43 -> 1.26 ms, O-Net 0.45 -> 0.37 ms; a whole
    `MTCNNDetector.detect` on an AVX2 EPYC 6-8 % less at 2 threads, 9 % at 1. P-Net's face
    probability, a softmax over a convolution's 2 channels, as a sigmoid
    (`convert.two_class_softmax_as_sigmoid`): the whole detect on an AVX512 EPYC 11.04 -> 10.39 ms
    at 2 threads, 17.05 -> 16.66 ms at 1, the same faces. Refused unless each is rewritten."""
    folded, rewritten = fold_keras_prelu(model), prelu_as_relu(model)
    if not folded == rewritten == prelus:
        raise ExportError(f"MTCNN: {rewritten} of {prelus} PReLUs rewritten (tf2onnx wrote the others in another form)")
    sigmoids = two_class_softmax_as_sigmoid(model)
    if sigmoids != conv_softmaxes:
        raise ExportError(f"MTCNN: {sigmoids} of {conv_softmaxes} convolutional softmaxes rewritten as sigmoids")


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Export P-Net, R-Net and O-Net to OUT/mtcnn_{pnet,rnet,onet}.onnx."""
    import tensorflow as tf

    results = []
    for name, (_, filename, outputs, side) in NETWORKS.items():
        path = weights_dir() / filename
        if not path.is_file():
            raise ExportError(f"MTCNN weights not found at {path} (from the {WHEEL} wheel)")
        sha = sha256_file(path)
        fresh = ctx.fresh(name, sha)
        if fresh:
            results.append((name, fresh))
            continue
        model = load_model(name, path)
        prelus = sum(isinstance(layer, layers.PReLU) for layer in model.layers)
        conv_softmaxes = sum(isinstance(layer, layers.Conv2D) and layer.get_config()["activation"] == "softmax"
                             for layer in model.layers)
        signature = [tf.TensorSpec([None, side, side, 3], tf.float32, name="input")]
        samples = random_samples(signature, 4) if side else [
            (np.random.default_rng(i).standard_normal((1 + i % 2, h, w, 3)).astype(np.float32),)
            for i, (h, w) in enumerate([(12, 12), (37, 53), (120, 90), (241, 319)])]
        entry = {
            "kind": "detector",
            "layout": "NHWC",
            "preprocessing": PREPROCESSING,
            "mtcnn": PIPELINE,
            "weights": {"source": f"pypi:{WHEEL} mtcnn/assets/weights/{filename}",
                        "sha256": sha, "untrained": False},
        }
        results.append((name, export_onnx(ctx, name, lambda x, m=model: m(x, training=False),
                                          signature, entry, outputs, samples,
                                          rewrite=partial(fast_forms, prelus=prelus,
                                                          conv_softmaxes=conv_softmaxes))))
    return results
