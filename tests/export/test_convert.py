"""`facedoor_export.convert`: the same model converts to the same bytes in every process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
REPO = Path(__file__).resolve().parents[2]

# A graph with one constant read in three places: tf2onnx merges the three equal constants under
# one of their names and lists the initializers in an order that both follow the string hashing.
CONVERT = """
import hashlib
import tensorflow as tf
from facedoor_export.convert import convert_function

spec = [tf.TensorSpec([None, 4], tf.float32, name="input")]

@tf.function(input_signature=spec)
def traced(x):
    w = tf.constant([[0.5, -1.0, 2.0, 0.25]])
    return (tf.nn.relu(x) * 0.17 + tf.sin(x) * 0.17 + tf.tanh(x) * 0.17 + x * w,)

proto = convert_function("probe", traced, spec, ["output"], 17)
print(hashlib.sha256(proto.SerializeToString()).hexdigest())
"""


def test_conversion_does_not_depend_on_the_string_hashing():
    """Three processes with three hash seeds convert the graph to identical bytes (the store pins
    the encoder's SHA-256: a re-export of the same FaceNet must not ask for re-enrolment)."""
    digests = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("daemon", "export"))}
        proc = subprocess.run([sys.executable, "-c", CONVERT], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, digests
