"""OpenFace nn4.small2.v1 from generated CSV weights: export, parity, manifest, CSV errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from export_support import onnx_leftovers, randomize, write_openface_csvs

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def openface_weights(tmp_path_factory: pytest.TempPathFactory):
    """(CSV directory, Keras model holding exactly those weights)."""
    from facedoor_export import openface

    model = openface.build_model()
    randomize(model, seed=3)
    directory = tmp_path_factory.mktemp("openface-csv")
    write_openface_csvs(model, directory)
    return directory, model


def test_openface_export_parity_and_manifest(openface_weights, tmp_path, export_cli):
    from facedoor.models import Manifest

    csv_dir, model = openface_weights
    assert len(list(csv_dir.glob("*.csv"))) == 224
    out = tmp_path / "models"
    code, stdout, stderr = export_cli("--out", out, "--only", "openface",
                                      "--openface-weights", csv_dir)
    assert code == 0, stderr
    assert "openface: ONNX vs Keras max abs diff" in stdout

    manifest = Manifest.load(out)
    entry = manifest.entry("openface")
    raw = json.loads((out / "manifest.json").read_text())["models"]["openface"]
    assert entry.kind == "encoder" and entry.embedding_dim == 128 and entry.threshold == 0.7
    assert entry.input_shape == (None, 96, 96, 3) and entry.layout == "NHWC"
    assert entry.preprocessing.color == "RGB" and entry.preprocessing.normalize == "affine"
    assert entry.preprocessing.scale == pytest.approx(1 / 255)
    assert raw["params"] == 3_743_280 and raw["l2_normalized"] is True
    assert raw["parity_max_abs_diff"] < 1e-4
    assert raw["outputs"] == [{"name": "embedding", "shape": [None, 128]}]

    # The ONNX model computes what the generating Keras model computes: the CSV loader put
    # every value back where it came from (transposes included).
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (3, 96, 96, 3)).astype(np.float32)
    got = manifest.session("openface").run(None, {"input": x})[0]
    want = np.asarray(model(x, training=False))
    assert np.abs(got - want).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "inception_4a_pool_bn_v.csv is missing"),
        ("short", "conv1_w.csv: 9407 values, expected 9408"),
        ("text", "dense_b.csv: value 5 ('abc') is not a number"),
    ],
)
def test_openface_bad_csv_is_named(openface_weights, tmp_path, export_cli, damage, message):
    csv_dir, _ = openface_weights
    broken = tmp_path / "csv"
    shutil.copytree(csv_dir, broken)
    if damage == "missing":
        (broken / "inception_4a_pool_bn_v.csv").unlink()
    elif damage == "short":
        path = broken / "conv1_w.csv"
        path.write_text(path.read_text().rsplit(",", 1)[0] + "\n")
    else:
        path = broken / "dense_b.csv"
        values = path.read_text().strip().split(",")
        values[4] = "abc"
        path.write_text(",".join(values))
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--only", "openface", "--openface-weights", broken)
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1, stderr
    assert onnx_leftovers(out) == []


def test_openface_needs_its_flag(tmp_path, export_cli):
    code, _, stderr = export_cli("--out", tmp_path / "m", "--only", "openface")
    assert code == 2 and "--openface-weights DIR" in stderr
