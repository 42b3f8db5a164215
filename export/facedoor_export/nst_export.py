"""`facedoor-export --only vgg19`: the two neural-style-transfer graphs, checked against autodiff.

`vgg19_features` maps an RGB image to the activations of the content and style layers (used
once per run to build the targets); `vgg19_nst_step` maps image + targets + weights to the loss
and its gradient. Both are converted from NCHW TensorFlow functions, so tf2onnx emits plain
Conv/AveragePool nodes with no layout Transposes. Before anything is written, ONNX Runtime's
loss and gradient are compared with TensorFlow's autodiff of the same loss (NHWC, the way
TensorFlow runs it) on random images of two sizes, one odd: relative L2 error <= 1e-3.
"""
from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np

from facedoor_export.convert import ExportContext, convert_function, staged_file_fields
from facedoor_export.errors import ExportError
from facedoor_export.nst_graph import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS, NSTGraph
from facedoor_export.vgg19 import CONV_LAYERS, IMAGENET_MEAN_RGB, PLAN, VGGWeights, load_weights

PARITY_TOLERANCE = 1e-3  # relative L2 error, loss terms and gradient
PARITY_SIZES = ((40, 52), (33, 47))  # (H, W); the second is odd in both axes
DEFAULTS = {"alpha": 10.0, "beta": 40.0, "tv_weight": 0.0}

PREPROCESSING = {
    # The graph takes RGB pixels in [0, 255]: nothing to subtract outside it.
    "color": "RGB",
    "normalize": "affine",
    "mean": [0.0, 0.0, 0.0],
    "scale": 1.0,
    "input_range": [0, 255],
    # Inside the graph: RGB minus the ImageNet means (as the exercise), then conv1_1 with its
    # input channels reversed, because the Keras VGG19 weights come from Caffe and expect BGR.
    "in_graph_mean_rgb": list(IMAGENET_MEAN_RGB),
    "weights_color": "BGR",
    "pooling": "average 2x2 stride 2 (VALID), replacing VGG's max pooling",
}


def _layers(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(n.strip() for n in (value or "").split(",") if n.strip()) or default
    unknown = [n for n in names if n not in CONV_LAYERS]
    if unknown:
        raise ExportError(f"unknown VGG-19 layer {', '.join(unknown)} "
                          f"(choose from {', '.join(CONV_LAYERS)})")
    return names


def _convert(fn: Any, signature: list[Any], output_names: list[str], opset: int, name: str = "vgg19") -> Any:
    """Trace FN without autograph and convert it with stable input/output names."""
    import tensorflow as tf

    traced = tf.function(fn, input_signature=signature, autograph=False)
    return convert_function(name, traced, signature, output_names, opset)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """Relative L2 error ||got - want|| / ||want|| (absolute when want is 0)."""
    want64, got64 = np.asarray(want, np.float64), np.asarray(got, np.float64)
    norm = float(np.linalg.norm(want64))
    return float(np.linalg.norm(got64 - want64)) / (norm if norm > 0 else 1.0)


def gram_np(act_nchw: np.ndarray) -> np.ndarray:
    """Gram matrix F F^T of (1, C, H, W) activations unrolled to (C, H*W)."""
    flat = act_nchw.reshape(act_nchw.shape[1], -1).astype(np.float32)
    return flat @ flat.T


def parity(features_bytes: bytes, step_bytes: bytes, graph: NSTGraph, reference: NSTGraph,
           sizes: tuple[tuple[int, int], ...] = PARITY_SIZES, seed: int = 0) -> dict[str, Any]:
    """Run both ONNX graphs and TensorFlow autodiff on random images; worst relative errors."""
    import onnxruntime as ort
    import tensorflow as tf

    feats = ort.InferenceSession(features_bytes, providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(step_bytes, providers=["CPUExecutionProvider"])
    ref_features = tf.function(reference.features, autograph=False)
    ref_step = tf.function(reference.autodiff, autograph=False)
    rng = np.random.default_rng(seed)
    nc = len(graph.content_layers)
    worst: dict[str, float] = collections.defaultdict(float)
    for h, w in sizes:
        image, content, style = (rng.uniform(0, 255, (1, h, w, 3)).astype(np.float32)
                                 for _ in range(3))
        got = feats.run(None, {"image": image})
        want = [np.asarray(a).transpose(0, 3, 1, 2) for a in ref_features(tf.constant(image))]
        worst["features"] = max(worst["features"], *(_rel(g, x) for g, x in zip(got, want)))
        targets = feats.run(None, {"image": content})[:nc]
        grams = [gram_np(a) for a in feats.run(None, {"image": style})[nc:]]
        scalars = [rng.uniform(0.5, 1.5, nc).astype(np.float32),
                   rng.uniform(0.1, 0.3, len(graph.style_layers)).astype(np.float32),
                   np.array(10.0, np.float32), np.array(40.0, np.float32),
                   np.array(1.0, np.float32)]
        feed = dict(zip([i.name for i in step.get_inputs()], [image, *targets, *grams, *scalars]))
        got = step.run(list(graph.step_outputs), feed)
        nhwc_targets = [tf.constant(t.transpose(0, 2, 3, 1)) for t in targets]
        want = ref_step(tf.constant(image), *nhwc_targets, *[tf.constant(g) for g in grams],
                        *[tf.constant(s) for s in scalars])
        for name, g, x in zip(graph.step_outputs, got, want):
            worst[name] = max(worst[name], _rel(g, np.asarray(x)))
    return dict(worst)


def _graph_stats(proto: Any) -> dict[str, int]:
    """Node counts; `layout_transposes` are 4-D Transposes (the 2-D ones are MatMul operands
    that ONNX Runtime folds into FusedMatMul)."""
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    layout = sum(1 for node in proto.graph.node if node.op_type == "Transpose"
                 and any(a.name == "perm" and len(a.ints) == 4 for a in node.attribute))
    return {"nodes": sum(ops.values()), "Conv": ops["Conv"], "Transpose": ops["Transpose"],
            "layout_transposes": layout}


def export(ctx: ExportContext) -> list[tuple[str, dict[str, Any]]]:
    """Build, check and write `vgg19_features` and `vgg19_nst_step`."""
    import onnxruntime as ort

    args = ctx.args
    content_layers = _layers(getattr(args, "vgg19_content_layers", None), DEFAULT_CONTENT_LAYERS)
    style_layers = _layers(getattr(args, "vgg19_style_layers", None), DEFAULT_STYLE_LAYERS)
    layers = {"content_layers": list(content_layers), "style_layers": list(style_layers)}
    started = time.monotonic()
    weights: VGGWeights = load_weights(args)
    if weights.untrained:
        print("vgg19: WARNING: untrained weights (--vgg19-untrained): for tests only; "
              "stylised images will not look like the style")
    previous = [ctx.fresh(name, weights.sha256) for name in ("vgg19_features", "vgg19_nst_step")]
    features, step = previous
    if features is not None and step is not None and all(
            p.get(k) == v for p in (features, step) for k, v in layers.items()):
        return [("vgg19_features", features), ("vgg19_nst_step", step)]

    graph = NSTGraph(weights, content_layers, style_layers, layout="NCHW")
    reference = NSTGraph(weights, content_layers, style_layers, layout="NHWC")
    print(f"vgg19: converting to ONNX (opset {ctx.opset}; content {', '.join(content_layers)}, "
          f"style {', '.join(style_layers)})")
    feature_names = graph.feature_names()
    features = _convert(graph.features, graph.feature_signature(), feature_names, ctx.opset)
    step = _convert(graph.step, graph.step_signature(), list(graph.step_outputs), ctx.opset)
    for name, proto in (("vgg19_features", features), ("vgg19_nst_step", step)):
        stats = _graph_stats(proto)
        print(f"{name}: {stats['nodes']} nodes, {stats['Conv']} Conv, "
              f"{stats['layout_transposes']} layout Transpose (RGB image/gradient only)")
    features_bytes, step_bytes = features.SerializeToString(), step.SerializeToString()

    errors = parity(features_bytes, step_bytes, graph, reference)
    sizes = " and ".join(f"{h}x{w}" for h, w in PARITY_SIZES)
    print(f"vgg19: ONNX Runtime vs TensorFlow autodiff on random {sizes} images, relative L2 "
          "error: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
          + f" (tolerance {PARITY_TOLERANCE:g})")
    bad = {k: v for k, v in errors.items() if not v <= PARITY_TOLERANCE}
    if bad:
        raise ExportError("vgg19: ONNX graphs differ from TensorFlow autodiff: "
                          + ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
                          + f" > {PARITY_TOLERANCE:g}; nothing written")

    channels = {s[0]: s[2] for s in PLAN if not isinstance(s, str)}
    common = {
        "kind": "nst",
        "preprocessing": PREPROCESSING,
        "activation_layout": "NCHW",
        **layers,
        "layer_channels": {n: channels[n] for n in dict.fromkeys(content_layers + style_layers)},
        "weights": {"source": weights.source, "sha256": weights.sha256,
                    "untrained": weights.untrained},
        "parity_rel_l2": errors,
        "parity_max_abs_diff": None,
        "parity_sizes": [list(s) for s in PARITY_SIZES],
        "opset": ctx.opset,
        "source_digest": ctx.digest,
    }
    layouts = {"image": "NHWC", **{f"content_{n}": "NCHW" for n in content_layers}}
    results = []
    for name, data, proto, extra in (
        ("vgg19_features", features_bytes, features, {}),
        ("vgg19_nst_step", step_bytes, step, {
            "defaults": {**DEFAULTS, "content_weights": [1.0] * len(content_layers),
                         "style_weights": [round(1.0 / len(style_layers), 6)] * len(style_layers)},
            "costs": "J = alpha J_content + beta J_style + tv_weight J_tv (see nst_graph.py)",
        }),
    ):
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        entry = {
            **common, **extra,
            **staged_file_fields(ctx, name, data, session, layouts),
            "graph": _graph_stats(proto),
            "export_seconds": round(time.monotonic() - started, 1),
        }
        print(f"{name}: built {ctx.out / entry['file']} ({entry['size']:,} bytes, "
              f"sha256 {entry['sha256'][:12]}...)")
        results.append((name, entry))
    return results
