"""`facedoor-export --only antispoof`: MiniFASNet files copied, hash-pinned, checked, and refused when tampered."""
from __future__ import annotations

import json
import shutil

import pytest

from facedoor.models import Manifest, ModelError, sha256_file

NAMES = {"antispoof_v2": "MiniFASNetV2.onnx", "antispoof_v1se": "MiniFASNetV1SE.onnx"}


def test_files_are_pinned_in_the_manifest(antispoof_models, shared_dir):
    manifest = Manifest.load(antispoof_models)
    assert sorted(manifest.entries) == sorted(NAMES)
    raw = json.loads((antispoof_models / "manifest.json").read_text())["models"]
    for name, filename in NAMES.items():
        entry = manifest.entry(name)
        source = shared_dir / "models/antispoof" / filename
        assert entry.kind == "antispoof" and entry.layout == "NCHW"
        assert entry.input_shape == (1, 3, 80, 80) and entry.preprocessing.color == "BGR"
        assert entry.sha256 == sha256_file(source) == raw[name]["weights"]["sha256"]
        assert manifest.verify(name).read_bytes() == source.read_bytes()
        assert raw[name]["outputs"][0]["shape"] == [1, 3]
    assert raw["antispoof_v2"]["crop_scale"] == 2.7 and raw["antispoof_v1se"]["crop_scale"] == 4.0


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
