"""INT8 FaceNet (`--only facenet_int8`): exported, verified against the float model, in the manifest.

The fast tests quantise a small generated encoder that stands in for `facenet` (same input and
manifest contract), calibrated on real LFW crops cut by the exported MTCNN; the slow test
quantises the real FaceNet.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("mtcnn")
onnx = pytest.importorskip("onnx")


def _small_encoder(path: Path, seed: int = 0) -> None:
    """A tiny NHWC 160x160x3 -> unit 128-D conv net, written as ONNX (stands in for FaceNet)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(0, scale, shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w1", "b1"], ["c1"], kernel_shape=[3, 3], strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w4"], ["proj"]),
        helper.make_node("LpNormalization", ["proj"], ["embedding"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes, "small_encoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 160, 160, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, 128])],
        [init("w1", (16, 3, 3, 3), 0.3), init("b1", (16,), 0.1), init("w2", (32, 16, 3, 3), 0.1),
         init("b2", (32,), 0.1), init("w3", (32, 32, 3, 3), 0.1), init("b3", (32,), 0.1),
         init("w4", (32, 128), 0.2)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def float_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with the exported MTCNN and a small generated `facenet`."""
    from facedoor.models import sha256_file
    from facedoor_export.cli import main

    out = tmp_path_factory.mktemp("quant") / "models"
    assert main(["--out", str(out), "--only", "mtcnn"]) == 0
    _small_encoder(out / "facenet.onnx")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["models"]["facenet"] = {
        "kind": "encoder", "file": "facenet.onnx", "sha256": sha256_file(out / "facenet.onnx"),
        "input": {"name": "input", "shape": [None, 160, 160, 3], "layout": "NHWC", "dtype": "float32"},
        "outputs": [{"name": "embedding", "shape": [None, 128]}],
        "preprocessing": {"color": "RGB", "normalize": "per_image_standardization", "mean": [0, 0, 0], "scale": 1.0},
        "embedding_dim": 128, "threshold": 0.7, "l2_normalized": True, "architecture": "small test encoder",
        "weights": {"source": "generated", "sha256": "0" * 64, "untrained": True},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _quantize(export_cli, out: Path, lfw: Path, *extra: str) -> tuple[int, str, str]:
    return export_cli("--out", out, "--only", "facenet_int8", "--calibration-dir", lfw,
                      "--calibration-images", "64", *extra)


def test_int8_export_is_verified_and_hash_pinned(export_cli, float_models: Path, shared_dir: Path,
                                                 tmp_path: Path) -> None:
    from facedoor.embed import Encoder
    from facedoor.models import Manifest
    from facedoor_export import quantize

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    code, stdout, err = _quantize(export_cli, out, shared_dir / "data/faces/lfw-devtrain")
    assert code == 0, err
    assert "INT8 vs float embedding L2 over" in stdout
    manifest = Manifest.load(out)
    entry, source = manifest.entry("facenet_int8"), manifest.entry("facenet")
    assert manifest.verify("facenet_int8") == out / "facenet_int8.onnx"
    assert entry.kind == "encoder" and entry.preprocessing == source.preprocessing
    assert entry.input_shape == source.input_shape and entry.layout == source.layout
    assert entry.embedding_dim == 128 and entry.threshold == 0.7
    q = entry.extra("quantization")
    assert q["format"] == "QDQ" and q["calibration_crops"] >= 32 and q["check_crops"] >= 1
    assert q["weights"] == f"{quantize.weight_type('auto')} per-channel"  # int8 where this CPU has VNNI
    assert q["l2_median"] <= quantize.TOLERANCE_MEDIAN and q["l2_max"] <= quantize.TOLERANCE_MAX
    assert entry.weights["sha256"] == source.sha256
    graph = onnx.load(out / "facenet_int8.onnx").graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    # the stem's first two convolutions and the head from the MatMul on stay float, the rest is INT8
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert [n.input[1] in dequantized for n in graph.node if n.op_type == "Conv"] == [False, False, True]
    matmul = next(n for n in graph.node if n.op_type == "MatMul")
    assert matmul.input[1] == "w4" and matmul.output[0] == "proj"  # float weights, nothing quantises its output
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in ("proj", "embedding")]
    # Transpose, 2 x (Conv, Relu); MatMul, LpNormalization
    assert q["float_nodes"] == "7: the first 2 convolutions, the head from the bottleneck"

    # the daemon's encoder runs it like the float one, and the embeddings agree within the tolerance
    crops = np.random.default_rng(0).integers(0, 256, (4, 160, 160, 3), dtype=np.uint8)
    a, b = Encoder(manifest, "facenet", 1)(crops), Encoder(manifest, "facenet_int8", 1)(crops)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert np.linalg.norm(a - b, axis=1).max() <= quantize.TOLERANCE_MAX

    # up to date: skipped
    code, stdout, _ = _quantize(export_cli, out, shared_dir / "data/faces/lfw-devtrain")
    assert code == 0 and "up to date" in stdout


def test_int8_over_the_tolerance_is_refused_and_nothing_written(
        export_cli, float_models: Path, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from facedoor_export import quantize

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(quantize, "TOLERANCE_MEDIAN", 0.0)
    code, _, err = _quantize(export_cli, out, shared_dir / "data/faces/lfw-devtrain")
    assert code == 2 and "INT8 embeddings differ from the float model" in err
    assert (out / "manifest.json").read_text() == before
    assert not list(out.glob("*int8*")) and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_int8_weight_type_is_chosen_and_recorded(export_cli, float_models: Path, shared_dir: Path, tmp_path: Path,
                                                 weights: str) -> None:
    """`--int8-weights`: the quantised weights have that type in the model, and the manifest says so."""
    from onnx import numpy_helper

    from facedoor.models import Manifest

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    code, _, err = _quantize(export_cli, out, shared_dir / "data/faces/lfw-devtrain", "--int8-weights", weights)
    assert code == 0, err
    assert Manifest.load(out).entry("facenet_int8").extra("quantization")["weights"] == f"{weights} per-channel"
    graph = onnx.load(out / "facenet_int8.onnx").graph
    conv_weights = {n.input[1] for n in graph.node if n.op_type == "Conv"}
    feeding = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    dtypes = {numpy_helper.to_array(i).dtype.name for i in graph.initializer if i.name in
              {feeding.get(w) for w in conv_weights}}
    assert dtypes == {weights}


def test_an_encoder_with_no_convolutions_past_the_float_stem_is_refused(tmp_path: Path) -> None:
    """`float_nodes` keeps the first two convolutions in float: a model with no third has nothing to quantise."""
    from facedoor_export.errors import ExportError
    from facedoor_export.quantize import float_nodes

    _small_encoder(tmp_path / "three.onnx")
    model = onnx.load(tmp_path / "three.onnx")
    assert len(float_nodes(model)) == 7
    del model.graph.node[5:7]  # the third Conv and its Relu
    model.graph.node[5].input[0] = "r2"
    with pytest.raises(ExportError, match="has 2 convolutions, expected more than 2"):
        float_nodes(model)


def test_int8_needs_the_float_model(export_cli, tmp_path: Path) -> None:
    code, _, err = export_cli("--out", tmp_path / "empty", "--only", "facenet_int8")
    assert code == 2 and "needs the float facenet and mtcnn" in err


def test_int8_in_the_same_run_as_the_models_it_needs(export_cli, float_models: Path, shared_dir: Path,
                                                    tmp_path: Path) -> None:
    """`--only facenet_int8,mtcnn`: MTCNN is built first and committed, then quantisation reads it."""
    from facedoor.models import Manifest

    out = tmp_path / "models"
    out.mkdir()
    shutil.copy(float_models / "facenet.onnx", out)
    manifest = json.loads((float_models / "manifest.json").read_text())
    manifest["models"] = {"facenet": manifest["models"]["facenet"]}  # the float encoder only, no detector
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, err = _quantize(export_cli, out, shared_dir / "data/faces/lfw-devtrain", "--only", "mtcnn")
    assert code == 0, err
    assert stdout.index("mtcnn: done") < stdout.index("facenet_int8: done")
    entries = Manifest.load(out).entries
    assert {"facenet", "facenet_int8", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"} <= set(entries)
    assert Manifest.load(out).verify("facenet_int8") == out / "facenet_int8.onnx"


def test_calibration_people_are_not_in_the_pairs(shared_dir: Path) -> None:
    from facedoor_export.quantize import pair_people, photo_split

    root = shared_dir / "data/faces/lfw-devtrain"
    calib, check = photo_split(root, 300, 100)
    people = pair_people(root)
    assert len(people) > 1000 and len(calib) == 300 and len(check) == 100
    names = [p.parent.name for p in calib + check]
    assert not set(names) & people and len(set(names)) == len(names)


@pytest.mark.slow
def test_real_facenet_int8(real_models: Path, shared_dir: Path, tmp_path: Path, export_cli) -> None:
    from facedoor.models import Manifest

    out = tmp_path / "models"
    shutil.copytree(real_models, out)
    code, _, err = export_cli("--out", out, "--only", "facenet_int8", "--force")
    assert code == 0, err
    q = Manifest.load(out).entry("facenet_int8").extra("quantization")
    print(f"\nreal FaceNet INT8 vs float: median L2 {q['l2_median']:.4f}, max {q['l2_max']:.4f} "
          f"over {q['check_crops']} held-out LFW crops")


def test_default_calibration_is_the_celebrity_set(export_cli, float_models: Path, celebrity_dir: Path,
                                                  tmp_path: Path) -> None:
    """Without --calibration-dir a fresh machine calibrates on the 5-celebrity set of the FaceNet sdist:
    train/ photos and their mirror images; val/ photos and theirs are the check set."""
    from facedoor.models import Manifest
    from facedoor_export import quantize

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    code, stdout, err = export_cli("--out", out, "--only", "facenet_int8")
    assert code == 0, err
    assert "5-celebrity set" in stdout
    q = Manifest.load(out).entry("facenet_int8").extra("quantization")
    train = sum(1 for _ in (celebrity_dir / "train").glob("*/*.jpg"))
    assert q["calibration_set"] == quantize.CELEBRITIES
    assert q["calibration_crops"] % 2 == 0 and 0.8 * train <= q["calibration_crops"] / 2 <= train
    assert q["check_crops"] % 2 == 0 and q["check_crops"] > 0
    code, stdout, _ = export_cli("--out", out, "--only", "facenet_int8")
    assert code == 0 and "up to date" in stdout
    # another calibration set is another model: rebuilt, and recorded
    code, stdout, err = _quantize(export_cli, out, float_models.parent / "missing")
    assert code == 2 and "calibration photos not found" in err


@pytest.mark.parametrize(("dot_product", "expected"), [
    (True, ["facenet", "mtcnn", "facenet_int8"]), (False, ["facenet", "mtcnn"])])
def test_default_build_adds_int8_where_the_cpu_has_a_dot_product(
        monkeypatch: pytest.MonkeyPatch, dot_product: bool, expected: list[str]) -> None:
    """INT8 becomes the default only where it pays (VNNI, dotprod), calibrated on the photos every
    fresh machine has (the 5-celebrity set): benchmarks/quantization.py shows it keeps the rule."""
    from facedoor_export import cli

    monkeypatch.setattr(cli, "int8_dot_product", lambda: dot_product)
    assert [g.name for g in cli._parse_only(None, None)] == expected
    assert [g.name for g in cli._parse_only(None, "float")] == ["facenet", "mtcnn"]
    assert [g.name for g in cli._parse_only(None, "int8")] == ["facenet", "mtcnn", "facenet_int8"]
    assert [g.name for g in cli._parse_only(["mtcnn"])] == ["mtcnn"]  # --only is what runs


def test_encoder_choice_is_the_manifest_default_and_the_store_pins_it(
        export_cli, float_models: Path, shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--encoder int8 makes the INT8 encoder what a config without recognition.encoder runs; a store
    enrolled with the float one then refuses, saying what to do; --encoder float goes back."""
    from facedoor.cli import main as facedoor
    from facedoor.models import Manifest

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    assert Manifest.load(out).encoder_name(None) == "facenet"  # a manifest without default_encoder
    photos = sorted(str(p) for p in (shared_dir / "data/faces/lfw10/Colin_Powell").glob("*.jpg"))[:3]
    base = ["--models", str(out), "--store", str(tmp_path / "door.db")]
    assert facedoor([*base, "enroll", "colin", *photos]) == 0

    code, stdout, err = _quantize(export_cli, out, shared_dir / "data/faces/lfw-devtrain", "--encoder", "int8")
    assert code == 0, err
    assert "default encoder: facenet_int8" in stdout
    manifest = Manifest.load(out)
    assert manifest.default_encoder == "facenet_int8" and manifest.encoder_name(None) == "facenet_int8"
    assert manifest.encoder_name("facenet") == "facenet"
    code, _, _ = export_cli("--out", out, "--only", "mtcnn")  # a later run without --encoder keeps it
    assert code == 0 and Manifest.load(out).default_encoder == "facenet_int8"

    capsys.readouterr()
    assert facedoor([*base, "identify", photos[0]]) == 2
    err = capsys.readouterr().err
    assert "another encoder" in err and "--replace" in err and "--encoder float" in err

    code, stdout, err = export_cli("--out", out, "--only", "mtcnn", "--encoder", "float")
    assert code == 0 and Manifest.load(out).default_encoder == "facenet"
    assert facedoor([*base, "identify", photos[0]]) == 0


def test_encoder_choice_needs_its_model(export_cli, float_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "models"
    out.mkdir()
    code, _, err = export_cli("--out", out, "--only", "mtcnn", "--encoder", "float")
    assert code == 2 and "--encoder float: facenet is not in" in err
    assert not (out / "manifest.json").exists()


def test_manifest_default_encoder_must_be_one_of_its_models(float_models: Path, tmp_path: Path) -> None:
    from facedoor.models import Manifest, ModelError

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**raw, "default_encoder": "facenet_int8"}))
    with pytest.raises(ModelError, match="default_encoder 'facenet_int8' is not one of its models"):
        Manifest.load(out)


def test_default_build_keeps_float_when_int8_fails_its_check(
        export_cli, float_models: Path, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The INT8 FaceNet that `auto` adds by itself is an optimisation: when it fails the float check the
    export still succeeds, says so, and leaves the float encoder the default (nothing INT8 written)."""
    from facedoor.models import Manifest
    from facedoor_export import cli, quantize

    out = tmp_path / "models"
    shutil.copytree(float_models, out)
    int8_group = next(g for g in cli.GROUPS if g.name == "facenet_int8")
    # the default build's INT8 step
    monkeypatch.setattr(cli, "_parse_only", lambda only, encoder=None: [int8_group])
    monkeypatch.setattr(cli, "int8_dot_product", lambda: True)
    monkeypatch.setattr(quantize, "TOLERANCE_MEDIAN", 0.0)
    code, stdout, err = export_cli("--out", out, "--calibration-dir", shared_dir / "data/faces/lfw-devtrain",
                                   "--calibration-images", "64")
    assert code == 0, err
    assert "warning" in err and "INT8 embeddings differ" in err and "float facenet stays the default" in err
    assert "default encoder: facenet" in stdout and not list(out.glob("*int8*"))
    assert Manifest.load(out).default_encoder == "facenet"
    # asked for explicitly, the same failure is an error
    code, _, err = export_cli("--out", out, "--encoder", "int8", "--calibration-dir",
                              shared_dir / "data/faces/lfw-devtrain", "--calibration-images", "64")
    assert code == 2 and "INT8 embeddings differ" in err
