"""MTCNN P/R/O-Net from the mtcnn wheel: export, parity against the wheel's own networks,
up-to-date skip, and the runtime's refusal of a tampered model."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("mtcnn")
NAMES = ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet")


@pytest.fixture(scope="module")
def mtcnn_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facedoor_export.cli import main

    out = tmp_path_factory.mktemp("mtcnn") / "models"
    assert main(["--out", str(out), "--only", "mtcnn"]) == 0
    return out


def test_manifest_entries(mtcnn_models):
    from facedoor.models import Manifest

    manifest = Manifest.load(mtcnn_models)
    assert sorted(manifest.entries) == sorted(NAMES)
    raw = json.loads((mtcnn_models / "manifest.json").read_text())["models"]
    for name in NAMES:
        entry = manifest.entry(name)
        assert entry.kind == "detector" and entry.layout == "NHWC"
        assert entry.preprocessing.color == "RGB" and entry.preprocessing.normalize == "affine"
        assert entry.preprocessing.mean == (127.5, 127.5, 127.5)
        assert entry.preprocessing.scale == 1 / 128
        assert raw[name]["preprocessing"]["transposed"] is False
        assert raw[name]["parity_max_abs_diff"] < 1e-4
        assert raw[name]["weights"]["source"].startswith("pypi:mtcnn==1.0.0")
        assert len(raw[name]["weights"]["sha256"]) == 64
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [*mtcnn_models.glob("*.onnx"), mtcnn_models / "manifest.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path  # readable by the daemon user
    assert manifest.entry("mtcnn_pnet").input_shape == (None, None, None, 3)
    assert manifest.entry("mtcnn_rnet").input_size == (24, 24)
    assert manifest.entry("mtcnn_onet").input_size == (48, 48)
    assert [o["name"] for o in raw["mtcnn_onet"]["outputs"]] == ["bbox_reg", "landmarks", "prob"]


def test_onnx_matches_the_wheels_networks(mtcnn_models):
    """Same numbers as mtcnn 1.0.0's own Keras networks: architecture and weight order are right."""
    from mtcnn.stages.stage_onet import StageONet
    from mtcnn.stages.stage_pnet import StagePNet
    from mtcnn.stages.stage_rnet import StageRNet

    from facedoor.models import Manifest

    manifest = Manifest.load(mtcnn_models)
    rng = np.random.default_rng(2)
    cases = [(StagePNet, "mtcnn_pnet", (1, 12, 12, 3)), (StagePNet, "mtcnn_pnet", (2, 61, 83, 3)),
             (StageRNet, "mtcnn_rnet", (3, 24, 24, 3)), (StageONet, "mtcnn_onet", (3, 48, 48, 3))]
    for stage, name, shape in cases:
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        want = [np.asarray(t) for t in stage()._model(x)]
        got = manifest.session(name).run(None, {"input": x})
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4, name


def test_prelus_and_pnets_softmax_run_in_the_fast_form(mtcnn_models):
    """Every Keras PReLU (3 in P-Net, 4 in R-Net, 5 in O-Net) is one Relu, two Muls and an Add: no
    Neg or PRelu is left; P-Net's face probability is a sigmoid, the dense nets keep their softmax
    (the parity test above shows the values are the wheel's)."""
    import onnx

    for name, prelus, sigmoids in (("mtcnn_pnet", 3, 1), ("mtcnn_rnet", 4, 0), ("mtcnn_onet", 5, 0)):
        ops = [n.op_type for n in onnx.load(mtcnn_models / f"{name}.onnx").graph.node]
        assert "Neg" not in ops and "PRelu" not in ops, name
        assert ops.count("Relu") == prelus and ops.count("Mul") == 2 * prelus, name
        assert ops.count("Sigmoid") == sigmoids and ops.count("Softmax") == 1 - sigmoids, name


def test_up_to_date_outputs_are_skipped_unless_forced(mtcnn_models, tmp_path, export_cli):
    out = tmp_path / "models"
    shutil.copytree(mtcnn_models, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")}
    code, stdout, _ = export_cli("--out", out, "--only", "mtcnn")
    assert code == 0 and stdout.count("up to date, skipped") == 3
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.onnx")} == stamps

    code, stdout, _ = export_cli("--out", out, "--only", "mtcnn", "--force")
    assert code == 0 and "up to date" not in stdout and stdout.count("max abs diff") == 3
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.glob("*.onnx"))


def test_tampered_model_is_refused_by_name(mtcnn_models, tmp_path):
    from facedoor.models import Manifest, ModelError

    out = tmp_path / "models"
    shutil.copytree(mtcnn_models, out)
    path = out / "mtcnn_rnet.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = Manifest.load(out)
    with pytest.raises(ModelError, match="model 'mtcnn_rnet'.*SHA-256.*refusing"):
        manifest.session("mtcnn_rnet")
    assert manifest.session("mtcnn_onet") is not None


def test_failed_run_leaves_the_directory_as_it_was(mtcnn_models, tmp_path, export_cli):
    out = tmp_path / "models"
    shutil.copytree(mtcnn_models, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # mtcnn is rebuilt (--force) before openface fails: nothing of it may land.
    code, stdout, stderr = export_cli("--out", out, "--only", "mtcnn,openface", "--force",
                                      "--openface-weights", tmp_path / "no-such-dir")
    assert code == 2 and "OpenFace weights directory" in stderr
    assert stdout.count("max abs diff") == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_parity_failure_writes_nothing(tmp_path):
    import keras
    import tensorflow as tf

    from facedoor_export.convert import ExportContext, export_onnx
    from facedoor_export.errors import ExportError

    inputs = keras.Input((4,), name="input")
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    ctx = ExportContext(out=tmp_path, args=None)
    signature = [tf.TensorSpec([None, 4], tf.float32, name="input")]
    with pytest.raises(ExportError, match="tiny: ONNX output differs from Keras by .*not writing"):
        export_onnx(ctx, "tiny", model, signature, {"kind": "encoder"}, ["y"], tolerance=-1.0)
    ctx.discard()
    assert list(tmp_path.iterdir()) == []
    entry = export_onnx(ctx, "tiny", model, signature, {"kind": "encoder"}, ["y"])
    ctx.commit()
    assert entry["parity_max_abs_diff"] < 1e-6 and entry["input"]["shape"] == [None, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]
