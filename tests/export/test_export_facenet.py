"""FaceNet from generated Keras-2-format HDF5 weights: export, parity, manifest, error paths."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from export_support import onnx_leftovers, randomize, write_keras2_h5

pytest.importorskip("tensorflow")
PINNED = "6acdd8fb3a3fb2b54257abdd1879246a3fcbe18fbe53a41c751e141abe63a0af"


@pytest.fixture(scope="module")
def facenet_weights(tmp_path_factory: pytest.TempPathFactory):
    """(HDF5 path, its SHA-256, the Keras model holding exactly those weights)."""
    from facedoor.models import sha256_file
    from facedoor_export import facenet

    model = facenet.build_model()
    randomize(model, seed=1)
    path = tmp_path_factory.mktemp("facenet") / "facenet_keras.h5"
    write_keras2_h5(model, path)
    return path, sha256_file(path), model


@pytest.mark.slow
def test_facenet_export_parity_and_manifest(facenet_weights, tmp_path, export_cli):
    from facedoor.models import Manifest

    path, sha, model = facenet_weights
    out = tmp_path / "models"
    code, stdout, stderr = export_cli("--out", out, "--only", "facenet", "--facenet-weights", path,
                                      "--facenet-weights-sha256", sha)
    assert code == 0, stderr
    assert "facenet: ONNX vs Keras max abs diff" in stdout

    manifest = Manifest.load(out)
    entry = manifest.entry("facenet")
    raw = json.loads((out / "manifest.json").read_text())
    body = raw["models"]["facenet"]
    assert {"facedoor_version", "tensorflow_version", "tf2onnx_version", "opset"} <= set(raw)
    assert entry.kind == "encoder" and entry.embedding_dim == 128 and entry.threshold == 0.7
    assert entry.input_shape == (None, 160, 160, 3) and entry.layout == "NHWC"
    assert entry.preprocessing.normalize == "per_image_standardization"
    assert entry.preprocessing.color == "RGB"
    assert body["weights"] == {"source": str(path), "sha256": sha, "untrained": False}
    assert body["params"] == 22_808_144 and body["l2_normalized"] is True
    assert body["parity_max_abs_diff"] < 1e-4 and body["size"] == (out / "facenet.onnx").stat().st_size

    # Every stored weight reached its layer: ONNX output == the generating model's output.
    x = np.random.default_rng(5).standard_normal((2, 160, 160, 3)).astype(np.float32)
    got = manifest.session("facenet").run(None, {"input": x})[0]
    want = np.asarray(model(x, training=False))
    assert got.shape == (2, 128) and np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_wrong_hash_is_refused(facenet_weights, tmp_path, export_cli):
    path, sha, _ = facenet_weights
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--facenet-weights", path)
    assert code == 2
    assert f"SHA-256 mismatch for {path}: expected {PINNED}, got {sha}" in stderr
    assert onnx_leftovers(out) == []


def test_missing_weights_say_where_and_which_flag(tmp_path, export_cli):
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--facenet-weights", tmp_path / "nope.h5")
    assert code == 2
    assert f"FaceNet weights not found at {tmp_path / 'nope.h5'}" in stderr
    assert "--facenet-weights" in stderr
    assert onnx_leftovers(out) == []


def test_truncated_hdf5_is_named(facenet_weights, tmp_path, export_cli):
    from facedoor.models import sha256_file

    path, _, _ = facenet_weights
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--facenet-weights", cut,
                                 "--facenet-weights-sha256", sha256_file(cut))
    assert code == 2
    assert str(cut) in stderr and ("cannot read HDF5" in stderr or "unreadable" in stderr)
    assert stderr.count("\n") == 1
    assert onnx_leftovers(out) == []


def test_unused_stored_weight_fails(facenet_weights, tmp_path, export_cli):
    from facedoor.models import sha256_file

    _, _, model = facenet_weights
    path = tmp_path / "extra.h5"
    write_keras2_h5(model, path, extra_layer="Logits")
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--facenet-weights", path,
                                 "--facenet-weights-sha256", sha256_file(path))
    assert code == 2
    assert "1 stored layer(s) not in the model, e.g. Logits" in stderr
    assert onnx_leftovers(out) == []


def test_layer_without_weights_fails(facenet_weights):
    from facedoor_export.errors import ExportError
    from facedoor_export.h5weights import assign_by_name, read_h5_weights

    path, _, model = facenet_weights
    stored = read_h5_weights(path)
    del stored["Bottleneck"]
    with pytest.raises(ExportError, match="no weights for 1 model layer.*Bottleneck"):
        assign_by_name(model, stored, path)
    stored = read_h5_weights(path)
    stored["Bottleneck_BatchNorm"]["gamma"] = np.ones(128, np.float32)
    with pytest.raises(ExportError, match="Bottleneck_BatchNorm: stored weight.*gamma.*unused"):
        assign_by_name(model, stored, path)


def test_unwritable_output_directory(facenet_weights, tmp_path, export_cli):
    path, sha, _ = facenet_weights
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, _, stderr = export_cli("--out", blocker / "models", "--facenet-weights", path,
                                 "--facenet-weights-sha256", sha)
    assert code == 2
    assert f"output directory {blocker / 'models'} is not writable" in stderr
    assert blocker.read_text() == "not a directory" and onnx_leftovers(tmp_path) == ["a-file"]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    exporter = Path(sys.executable).with_name("facedoor-export")
    proc = subprocess.run([str(exporter), "--out", str(tmp_path / "m"), "--only", "facenet",
                           "--facenet-weights", str(tmp_path / "missing.h5")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("facedoor-export")]
    assert len(lines) == 1 and "missing.h5" in lines[0] and "Traceback" not in proc.stderr
    assert onnx_leftovers(tmp_path / "m") == []
