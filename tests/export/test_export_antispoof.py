"""`facedoor-export --only antispoof`: MiniFASNet files checked, PRelus rewritten, parity-checked, hash-pinned,
and refused when tampered; `convert.prelu_as_relu` on a graph with every kind of slope."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from facedoor.liveness import crop_input
from facedoor.models import Manifest, ModelError, sha256_file
from facedoor_export.convert import prelu_as_relu

NAMES = {"antispoof_v2": "MiniFASNetV2.onnx", "antispoof_v1se": "MiniFASNetV1SE.onnx"}


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def test_files_are_pinned_in_the_manifest_with_their_prelus_rewritten(antispoof_models, shared_dir):
    """The pinned file is the given one with its PRelus rewritten: pinned by its own hash, the given
    file's hash recorded, and the same logits as the given file on a real face."""
    manifest = Manifest.load(antispoof_models)
    assert sorted(manifest.entries) == sorted(NAMES)
    raw = json.loads((antispoof_models / "manifest.json").read_text())["models"]
    image = cv2.imread(str(sorted((shared_dir / "data/antispoof/nuaa/live").glob("0004_*.jpg"))[0]))
    for name, filename in NAMES.items():
        entry = manifest.entry(name)
        source = shared_dir / "models/antispoof" / filename
        assert entry.kind == "antispoof" and entry.layout == "NCHW"
        assert entry.input_shape == (1, 3, 80, 80) and entry.preprocessing.color == "BGR"
        pinned = manifest.verify(name)
        assert entry.sha256 == sha256_file(pinned) and raw[name]["weights"]["sha256"] == sha256_file(source)
        assert "PRelu" in _ops(onnx.load(source)) and "PRelu" not in _ops(onnx.load(pinned))
        assert raw[name]["outputs"][0]["shape"] == [1, 3] and 0 <= raw[name]["parity_max_abs_diff"] <= 1e-4
        given, ours = (ort.InferenceSession(str(p)) for p in (source, pinned))
        x = {given.get_inputs()[0].name: crop_input(image, (250.0, 150.0, 400.0, 330.0), entry.extra("crop_scale"))}
        assert np.abs(given.run(None, x)[0] - ours.run(None, x)[0]).max() < 1e-4
    assert raw["antispoof_v2"]["crop_scale"] == 2.7 and raw["antispoof_v1se"]["crop_scale"] == 4.0


def test_prelu_as_relu_keeps_the_values_for_any_slope():
    """Slopes below 0, between 0 and 1 and above 1 (MiniFASNet and the face mesh have all three), a slope
    shared by two PRelus, and a PRelu whose slope is computed (left as it is)."""
    slope = np.array([-1.1, 0.0, 0.25, 1.0, 1.5], dtype=np.float32).reshape(5, 1, 1)
    weight = np.random.default_rng(0).normal(size=(5, 5, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "a"], ["p1"]),
             helper.make_node("PRelu", ["p1", "a"], ["p2"]),
             helper.make_node("Neg", ["a"], ["na"]),
             helper.make_node("PRelu", ["p2", "na"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8, 8])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(slope, "a")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = {"x": np.random.default_rng(1).normal(size=(1, 5, 8, 8)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, x)[0]
    assert prelu_as_relu(model) == 2
    onnx.checker.check_model(model)
    assert _ops(model).count("PRelu") == 1 and _ops(model).count("Relu") == 2
    assert np.abs(ort.InferenceSession(model.SerializeToString()).run(None, x)[0] - want).max() < 1e-5


def test_tampered_file_is_refused(antispoof_models, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(antispoof_models, out)
    path = out / Manifest.load(out).entry("antispoof_v2").file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = Manifest.load(out)
    with pytest.raises(ModelError, match="SHA-256"):
        manifest.verify("antispoof_v2")
    manifest.verify("antispoof_v1se")  # the untouched one still loads


def test_up_to_date_files_are_skipped(antispoof_models, tmp_path, export_cli, shared_dir):
    out = tmp_path / "models"
    shutil.copytree(antispoof_models, out)
    code, stdout, _ = export_cli("--out", out, "--only", "antispoof", "--antispoof-dir",
                                 shared_dir / "models/antispoof")
    assert code == 0 and stdout.count("up to date, skipped") == 2


def test_missing_directory_or_files_fail_clearly(tmp_path, export_cli):
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--only", "antispoof")
    assert code == 2 and "--antispoof-dir DIR is required" in stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "MiniFASNetV2.onnx").write_bytes(b"not a model")
    code, _, stderr = export_cli("--out", out, "--only", "antispoof", "--antispoof-dir", empty)
    assert code == 2 and "lacks MiniFASNetV1SE.onnx" in stderr
    assert not (out / "manifest.json").exists()


def test_a_file_that_is_not_the_model_is_refused(tmp_path, export_cli, shared_dir):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(shared_dir / "models/antispoof/MiniFASNetV2.onnx", source / "MiniFASNetV2.onnx")
    (source / "MiniFASNetV1SE.onnx").write_bytes(b"not a model")
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--only", "antispoof", "--antispoof-dir", source)
    assert code == 2 and "antispoof_v1se" in stderr and "ONNX Runtime can load" in stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.onnx"))
