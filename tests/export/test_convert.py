"""`facedoor_export.convert`: the same model converts to the same bytes in every process; Keras
PReLUs as tf2onnx writes them fold into the fast form, and a convolution's two-class softmax becomes
a sigmoid, with the same values."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from facedoor_export.convert import fold_keras_prelu, prelu_as_relu, two_class_softmax_as_sigmoid

REPO = Path(__file__).resolve().parents[2]

# A graph with one constant read in three places: tf2onnx merges the three equal constants under
# one of their names and lists the initializers in an order that both follow the string hashing;
# converted after 0, 1 or 2 other graphs, whose conversions advance tf2onnx's name counter.
CONVERT = """
import hashlib
import sys
import tensorflow as tf
from facedoor_export.convert import convert_function

spec = [tf.TensorSpec([None, 4], tf.float32, name="input")]

@tf.function(input_signature=spec)
def traced(x):
    w = tf.constant([[0.5, -1.0, 2.0, 0.25]])
    return (tf.nn.relu(x) * 0.17 + tf.sin(x) * 0.17 + tf.tanh(x) * 0.17 + x * w,)

for _ in range(int(sys.argv[1])):  # conversions before: their names must not move the probe's
    convert_function("before", tf.function(lambda x: (tf.cos(x) + 1.0,), input_signature=spec), spec, ["output"], 17)
proto = convert_function("probe", traced, spec, ["output"], 17)
print(hashlib.sha256(proto.SerializeToString()).hexdigest())
"""


def test_conversion_does_not_depend_on_the_string_hashing_nor_on_earlier_conversions():
    """Three processes with three hash seeds, having converted 0, 1 and 2 other graphs first, convert
    the graph to identical bytes (the store pins the encoder's SHA-256: a re-export of the same
    FaceNet, alone or with the other models, must not ask for re-enrolment)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    digests = set()
    for before, seed in enumerate(("1", "2", "3")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("daemon", "export"))}
        proc = subprocess.run([sys.executable, "-c", CONVERT, str(before)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests


def _keras_prelu(x: str, slope: str, y: str, swapped: bool = False) -> list[onnx.NodeProto]:
    """Relu(x) + C * Relu(Neg(x)), as tf2onnx writes a Keras PReLU (C = -alpha); SWAPPED puts
    the constant first in the Mul and the negative part first in the Add."""
    mul = [f"{y}_rn", slope][:: -1 if swapped else 1]
    add = [f"{y}_pos", f"{y}_m"][:: -1 if swapped else 1]
    return [helper.make_node("Relu", [x], [f"{y}_pos"]), helper.make_node("Neg", [x], [f"{y}_n"]),
            helper.make_node("Relu", [f"{y}_n"], [f"{y}_rn"]), helper.make_node("Mul", mul, [f"{y}_m"]),
            helper.make_node("Add", add, [y])]


def test_keras_prelus_fold_into_the_fast_form_with_the_same_values():
    """Both operand orders fold; a pattern whose positive part is also read elsewhere is left whole."""
    rng = np.random.default_rng(0)
    alpha = np.array([-0.5, 0.0, 0.25, 1.5], dtype=np.float32).reshape(1, 4, 1, 1)
    weight = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             *_keras_prelu("c", "k", "p1"), *_keras_prelu("p1", "k", "p2", swapped=True),
             *_keras_prelu("p2", "k", "p3"), helper.make_node("Add", ["p3", "p3_pos"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(-alpha, "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]

    assert fold_keras_prelu(model) == 2 and prelu_as_relu(model) == 2
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Neg") == 1 and "PRelu" not in ops  # the third pattern is left as it was
    assert np.abs(ort.InferenceSession(model.SerializeToString()).run(None, x)[0] - want).max() < 1e-5


def test_a_convolutions_two_class_softmax_becomes_a_sigmoid_with_the_same_values():
    """The softmax over a 2-channel Conv is rewritten; one over a 3-channel Conv, over a Conv whose
    output is also read elsewhere, over another axis, or over Convs sharing their weights is left."""
    rng = np.random.default_rng(0)
    arrays = {}
    for key in ("2a", "3a", "2b", "2c", "2d"):
        channels = int(key[0])
        arrays[f"w{key}"] = rng.normal(size=(channels, 4, 1, 1)).astype(np.float32)
        arrays[f"b{key}"] = rng.normal(size=channels).astype(np.float32)

    def head(name: str, weights: str, axis: int = 1) -> list:
        return [helper.make_node("Conv", ["x", f"w{weights}", f"b{weights}"], [f"{name}_logits"]),
                helper.make_node("Softmax", [f"{name}_logits"], [name], axis=axis)]

    nodes = [*head("two", "2a"), *head("three", "3a"), *head("read", "2b"), *head("last_axis", "2c", axis=3),
             *head("shared1", "2d"), *head("shared2", "2d")]
    widths = {"two": 2, "three": 3, "read": 2, "read_logits": 2, "last_axis": 2, "shared1": 2, "shared2": 2}
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, c, 6, 7]) for n, c in widths.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 7])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": rng.normal(scale=4.0, size=(1, 4, 6, 7)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)

    assert two_class_softmax_as_sigmoid(model) == 1
    onnx.checker.check_model(model)
    assert [(n.op_type, n.output[0]) for n in model.graph.node if n.op_type == "Sigmoid"] == [("Sigmoid", "two")]
    got = ort.InferenceSession(model.SerializeToString()).run(None, x)
    assert all(np.abs(g - w).max() < 1e-6 for g, w in zip(got, want))
    assert np.abs(got[0].sum(axis=1) - 1).max() < 1e-6 and got[0].min() < 0.1 < 0.9 < got[0].max()
