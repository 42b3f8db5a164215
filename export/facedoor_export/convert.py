"""Keras/TensorFlow callable -> verified ONNX file + manifest entry.

Every model goes the same way: trace a `tf.function` with an explicit input signature
(tf2onnx's `from_keras` is broken with Keras 3), convert with `tf2onnx.convert.from_function`,
run the ONNX bytes in ONNX Runtime against the Keras model on several inputs, refuse the export
when they differ by more than the tolerance, and only then write the file (temp name + rename).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from facedoor.models import sha256_file
from facedoor_export.atomic import write_temp
from facedoor_export.errors import ExportError

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE = 1e-4


@dataclass
class ExportContext:
    """What a model group's `export(ctx)` gets: output dir, parsed flags, freshness data."""

    out: Path
    args: argparse.Namespace
    force: bool = False
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)
    digest: str = ""  # source digest of the group being exported (set by the CLI)
    opset: int = OPSET
    staged: list[tuple[Path, Path]] = field(default_factory=list)  # (temp file, final path)

    def stage(self, path: Path, data: bytes) -> Path:
        """Write DATA beside PATH under a temp name; `commit()` renames it once all succeeded."""
        tmp = write_temp(path, data)
        self.staged.append((tmp, path))
        return tmp

    def commit(self) -> None:
        """Rename every staged file to its final name (called just before the manifest is written)."""
        while self.staged:
            tmp, path = self.staged.pop(0)
            os.replace(tmp, path)

    def discard(self) -> None:
        """Delete staged temp files after a failure, so nothing half-done is left behind."""
        while self.staged:
            self.staged.pop()[0].unlink(missing_ok=True)

    def fresh(self, name: str, weights_sha256: str) -> dict[str, Any] | None:
        """The previous manifest entry of NAME if its file, weights and export code are unchanged.

        Returns None (rebuild) under `--force`, or when anything recorded differs.
        """
        prev = self.previous.get(name)
        if self.force or not prev:
            return None
        if prev.get("source_digest") != self.digest:
            return None
        if prev.get("weights", {}).get("sha256") != weights_sha256:
            return None
        path = self.out / str(prev.get("file", ""))
        if not path.is_file() or sha256_file(path) != prev.get("sha256"):
            return None
        log.info("%s: %s is up to date (weights and export code unchanged); skipping, "
                 "use --force to rebuild", name, path)
        print(f"{name}: up to date, skipped ({path})")
        return prev


def random_samples(
    signature: Sequence[Any], count: int, dims: dict[int, int] | None = None, seed: int = 0
) -> list[tuple[np.ndarray, ...]]:
    """COUNT tuples of standard-normal float32 inputs matching SIGNATURE.

    Dynamic dimensions (None) other than the batch take their size from DIMS {axis: size}, or
    vary per sample between 12 and 40 so shape-dependent bugs show up in the parity check.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        arrays = []
        for spec in signature:
            shape = []
            for axis, dim in enumerate(spec.shape.as_list()):
                if dim is not None:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(1 + i % 2)
                else:
                    shape.append((dims or {}).get(axis, 12 + (7 * i + 5 * axis) % 29))
            arrays.append(rng.standard_normal(shape).astype(np.float32))
        samples.append(tuple(arrays))
    return samples


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename tensor OLD to NEW everywhere in an ONNX graph."""
    if old == new:
        return
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        if value.name == old:
            value.name = new


def canonical_numbers(graph: Any) -> None:
    """Renumber, in place, what tf2onnx numbers across the conversions of a process, so that a model's
    bytes do not depend on what was converted before it (`--only mtcnn` against a whole export):
    the `__N` of the names it makes (one global counter) in order of first appearance, the unknown
    dimensions' names (`unk__N`) likewise, and the graph's doc string, which names the traced
    function by a process-wide id. Distinct numbers stay distinct, so distinct names stay so."""
    numbers: dict[str, str] = {}

    def renumber(name: str) -> str:
        return re.sub(r"__(\d+)", lambda m: "__" + numbers.setdefault(m.group(1), str(len(numbers))), name)

    for node in graph.node:
        node.name = renumber(node.name)
        node.input[:] = [renumber(n) for n in node.input]
        node.output[:] = [renumber(n) for n in node.output]
    for tensor in graph.initializer:
        tensor.name = renumber(tensor.name)
    symbols: dict[str, str] = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renumber(value.name)
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = symbols.setdefault(dim.dim_param, f"dim{len(symbols)}")
    graph.doc_string = "converted by tf2onnx"


def canonical_constants(graph: Any) -> None:
    """Give the initializers of GRAPH names and an order that do not depend on the process: each one
    that several nodes read becomes `shared_constant_K` (K in the order of its first reader), and
    all are sorted by name. tf2onnx merges equal constants under the name of whichever it meets
    first in a set and lists them in set order, both of which follow Python's string hashing: the
    same FaceNet came out as other bytes, so with another SHA-256 (which the store pins), in each
    process."""
    constants = {i.name for i in graph.initializer}
    readers = Counter(name for node in graph.node for name in set(node.input))
    shared: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in constants and readers[name] > 1 and name not in shared:
                shared[name] = f"shared_constant_{len(shared)}"
    for old, new in shared.items():
        _rename(graph, old, new)
    graph.initializer.sort(key=lambda i: i.name)


def prelu_as_relu(model: Any) -> int:
    """Rewrite, in place, every PRelu of the ONNX MODEL whose slope A is a constant as A*x + (1-A)*Relu(x)
    (Relu, two Muls, Add: the same values up to float rounding); returns how many were rewritten.

    ONNX Runtime runs PRelu by a slow broadcast kernel, and its blocked (NCHWc) convolutions must
    leave their layout around each one; a Mul by a per-channel constant and an Add stay in it. One
    core, per run: MediaPipe face mesh 4.6 -> 1.8 ms, iris 4.8 -> 2.2 ms, MiniFASNetV2 4.8 -> 2.0 ms."""
    from onnx import helper, numpy_helper

    graph = model.graph
    slopes = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    complements: dict[str, str] = {}
    nodes, rewritten = [], 0
    for node in graph.node:
        slope = node.input[1] if node.op_type == "PRelu" else ""
        if slope not in slopes:
            nodes.append(node)
            continue
        if slope not in complements:
            complements[slope] = f"{slope}__one_minus"
            graph.initializer.append(numpy_helper.from_array(
                (1 - slopes[slope]).astype(slopes[slope].dtype), complements[slope]))
        x, y = node.input[0], node.output[0]
        nodes += [helper.make_node("Relu", [x], [f"{y}__relu"], name=f"{y}__relu"),
                  helper.make_node("Mul", [x, slope], [f"{y}__ax"], name=f"{y}__ax"),
                  helper.make_node("Mul", [f"{y}__relu", complements[slope]], [f"{y}__bx"], name=f"{y}__bx"),
                  helper.make_node("Add", [f"{y}__ax", f"{y}__bx"], [y], name=f"{y}__add")]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def _index(graph: Any) -> tuple[dict[str, Any], dict[str, Any], Counter[str]]:
    """GRAPH's initializers by name, each tensor's producing node, and how often each tensor is read
    (a graph output counts as a reader): what a rewrite checks before it folds nodes away."""
    readers = Counter(name for node in graph.node for name in node.input)
    readers.update(o.name for o in graph.output)
    return ({i.name: i for i in graph.initializer}, {out: node for node in graph.node for out in node.output},
            readers)


def fold_keras_prelu(model: Any) -> int:
    """Replace, in place, each Keras PReLU that tf2onnx wrote as Relu(x) + C * Relu(Neg(x)) (C = -alpha,
    a constant) by one PRelu(x, alpha); returns how many were folded. Five operators and two
    intermediate tensors become one, which `prelu_as_relu` then turns into the fast form."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants, producer, readers = _index(graph)

    def made_by(name: str, op: str) -> Any:
        node = producer.get(name)
        return node if node is not None and node.op_type == op and readers[name] == 1 else None

    folded: dict[int, Any] = {}  # id of the Add -> the PRelu that replaces it
    dropped: set[int] = set()
    for add in graph.node:
        if add.op_type != "Add":
            continue
        for pos, neg in (add.input, add.input[::-1]):
            relu, mul = made_by(pos, "Relu"), made_by(neg, "Mul")
            if relu is None or mul is None:
                continue
            slope = next((c for c in mul.input if c in constants), None)
            relu_neg = next((made_by(i, "Relu") for i in mul.input if i != slope), None)
            neg_node = made_by(relu_neg.input[0], "Neg") if relu_neg is not None else None
            if slope is None or neg_node is None or neg_node.input[0] != relu.input[0]:
                continue
            alpha = f"{slope}__alpha"
            if alpha not in constants:
                constants[alpha] = numpy_helper.from_array(-numpy_helper.to_array(constants[slope]), alpha)
                graph.initializer.append(constants[alpha])
            folded[id(add)] = helper.make_node("PRelu", [relu.input[0], alpha], [add.output[0]], name=add.name)
            dropped.update(id(n) for n in (relu, mul, relu_neg, neg_node))
            break
    nodes = [folded.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(folded)


def two_class_softmax_as_sigmoid(model: Any) -> int:
    """Rewrite, in place, each Softmax over the 2 output channels of a Conv that nothing else reads as a
    Sigmoid, the Conv computing the logit differences (l0 - l1, l1 - l0) instead of (l0, l1); returns
    how many were rewritten. The softmax of two logits is the sigmoid of their difference: the same
    values up to float rounding.

    ONNX Runtime runs a Softmax over the channel axis by moving that axis last and back, a Sigmoid
    in one pass. MTCNN's P-Net on a 640x480 frame's pyramid (one 144x483 mosaic), AVX512 EPYC:
    1 thread 5.86 -> 5.54 ms, 2 threads 7.09 -> 6.57 ms; largest difference 4.2e-07."""
    from onnx import numpy_helper

    graph = model.graph
    constants, producer, readers = _index(graph)
    rewritten = 0
    for softmax in graph.node:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), None)
        conv = producer.get(softmax.input[0]) if softmax.op_type == "Softmax" and axis == 1 else None
        if conv is None or conv.op_type != "Conv" or readers[conv.output[0]] != 1 or len(conv.input) != 3:
            continue
        weight, bias = (constants.get(name) for name in conv.input[1:])
        if weight is None or bias is None or weight.dims[0] != 2 or readers[weight.name] + readers[bias.name] != 2:
            continue
        for tensor in (weight, bias):
            value = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.stack([value[0] - value[1], value[1] - value[0]]), tensor.name))
        softmax.op_type = "Sigmoid"
        del softmax.attribute[:]
        rewritten += 1
    return rewritten


def _shape(dims: Sequence[Any]) -> list[int | None]:
    return [d if isinstance(d, int) else None for d in dims]


def export_onnx(
    ctx: ExportContext,
    name: str,
    fn: Callable[..., Any],
    signature: Sequence[Any],
    entry: dict[str, Any],
    output_names: Sequence[str],
    samples: Sequence[tuple[np.ndarray, ...]] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    rewrite: Callable[[Any], object] | None = None,
) -> dict[str, Any]:
    """Convert FN (positional tensors -> tensor or tuple of tensors) to OUT/NAME.onnx.

    SIGNATURE is a list of named `tf.TensorSpec`. ENTRY holds the group's manifest fields
    (kind, layout, preprocessing, weights, ...); file, hash, size, input/outputs, parity and
    provenance are filled in here. REWRITE (ONNX model, in place) runs before the parity check,
    which therefore covers it. Raises ExportError when the parity check fails.
    """
    import onnxruntime as ort
    import tensorflow as tf

    started = time.monotonic()
    input_names = [spec.name for spec in signature]

    @tf.function(input_signature=list(signature))
    def traced(*inputs: Any) -> Any:
        result = fn(*inputs)
        return tuple(result) if isinstance(result, (list, tuple)) else (result,)

    samples = list(samples) if samples is not None else random_samples(signature, 4)
    print(f"{name}: converting to ONNX (opset {ctx.opset})")
    with tqdm(total=1 + len(samples), desc=f"{name}: convert + parity", unit="step",
              leave=False) as progress:
        proto = convert_function(name, traced, signature, output_names, ctx.opset)
        if rewrite is not None:
            rewrite(proto)
        data = proto.SerializeToString()
        progress.update(1)

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        worst = 0.0
        for sample in samples:
            expected = traced(*[tf.constant(x) for x in sample])
            actual = session.run(list(output_names), dict(zip(input_names, sample)))
            for want, got in zip(expected, actual):
                want = np.asarray(want)
                if want.shape != got.shape:
                    raise ExportError(f"{name}: ONNX output shape {got.shape} != Keras "
                                      f"{want.shape}")
                worst = max(worst, float(np.max(np.abs(want - got))) if want.size else 0.0)
            progress.update(1)
    print(f"{name}: ONNX vs Keras max abs diff {worst:.3g} over {len(samples)} inputs "
          f"(tolerance {tolerance:g})")
    if not worst <= tolerance:
        raise ExportError(f"{name}: ONNX output differs from Keras by {worst:.3g} "
                          f"(> {tolerance:g}); not writing {ctx.out / (name + '.onnx')}")

    result = {
        **{k: v for k, v in entry.items() if k != "layout"},
        **staged_file_fields(ctx, name, data, session, default_layout=entry.get("layout", "NHWC")),
        "parity_max_abs_diff": worst,
        "parity_inputs": len(samples),
        "opset": ctx.opset,
        "source_digest": ctx.digest,
        "export_seconds": round(time.monotonic() - started, 1),
    }
    print(f"{name}: built {ctx.out / result['file']} ({result['size']:,} bytes, sha256 "
          f"{result['sha256'][:12]}...) in {result['export_seconds']} s")
    return result


def convert_function(name: str, traced: Any, signature: Sequence[Any], output_names: Sequence[str],
                     opset: int) -> Any:
    """tf2onnx `from_function` with an explicit signature (`from_keras` is broken with Keras 3);
    graph inputs take the signature's names and outputs OUTPUT_NAMES, so the manifest can rely on them;
    constants get names and an order that do not depend on the process (`canonical_constants`), nor
    does anything else depend on what the process converted before (`canonical_numbers`)."""
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(traced, input_signature=list(signature), opset=opset)
    canonical_numbers(proto.graph)
    for value, spec in zip(list(proto.graph.input), signature):
        _rename(proto.graph, value.name, spec.name)
    outputs = [v.name for v in proto.graph.output]
    if len(outputs) != len(output_names):
        raise ExportError(f"{name}: converted graph has {len(outputs)} outputs, expected "
                          f"{len(output_names)} ({', '.join(output_names)})")
    for old, new in zip(outputs, output_names):
        _rename(proto.graph, old, new)
    canonical_constants(proto.graph)
    return proto


def staged_file_fields(ctx: ExportContext, name: str, data: bytes, session: Any,
                       layouts: dict[str, str] | None = None, default_layout: str = "-") -> dict[str, Any]:
    """Stage OUT/NAME.onnx (published with the run) and describe it for the manifest:
    file, SHA-256, size, `input` (and `inputs` when there are several) and `outputs`."""
    layouts = layouts or {}
    inputs = [{"name": i.name, "shape": _shape(i.shape), "layout": layouts.get(i.name, default_layout),
               "dtype": "float32"} for i in session.get_inputs()]
    path = ctx.out / f"{name}.onnx"
    staged = ctx.stage(path, data)
    fields = {
        "file": path.name,
        "sha256": sha256_file(staged),
        "size": staged.stat().st_size,
        "input": inputs[0],
        "outputs": [{"name": o.name, "shape": _shape(o.shape)} for o in session.get_outputs()],
    }
    if len(inputs) > 1:
        fields["inputs"] = inputs
    return fields


def export_encoder(
    ctx: ExportContext,
    name: str,
    model: Any,
    input_size: int,
    *,
    architecture: str,
    params: int,
    embedding_dim: int,
    preprocessing: dict[str, Any],
    weights: dict[str, Any],
) -> list[tuple[str, dict[str, Any]]]:
    """Export a face encoder (NHWC square RGB crop -> L2-normalised embedding) to OUT/NAME.onnx.

    Writes the encoder manifest entry every encoder shares (threshold 0.7, output `embedding`).
    """
    import tensorflow as tf

    entry = {
        "kind": "encoder",
        "layout": "NHWC",
        "preprocessing": preprocessing,
        "embedding_dim": embedding_dim,
        "threshold": 0.7,
        "l2_normalized": True,
        "params": params,
        "architecture": architecture,
        "weights": weights,
    }
    signature = [tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="input")]
    return [(name, export_onnx(ctx, name, lambda x: model(x, training=False), signature, entry,
                               ["embedding"]))]
