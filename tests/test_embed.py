"""Encoding: preprocessing exactly as the manifest says, batches in one run, unit-length output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.embed import Encoder, preprocess
from facedoor.models import Manifest, ModelError, Preprocessing, int8_dot_product


def pre(color: str = "RGB", normalize: str = "per_image_standardization", mean=(0.0, 0.0, 0.0),
        scale: float = 1.0) -> Preprocessing:
    return Preprocessing(color=color, normalize=normalize, mean=mean, scale=scale)


def test_per_image_standardization_and_rgb() -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    original = crops.copy()
    x = preprocess(crops, pre())
    # standardised in place on its own copy: the crops stay as they were, the tensor is ORT-ready
    assert x.dtype == np.float32 and x.flags.c_contiguous and np.array_equal(crops, original)
    for i in range(3):
        rgb = crops[i, ..., ::-1].astype(np.float64)
        expected = (rgb - rgb.mean()) / max(rgb.std(), 1 / np.sqrt(rgb.size))
        np.testing.assert_allclose(x[i], expected, atol=1e-5)
    # a flat crop does not divide by zero
    flat = preprocess(np.full((1, 8, 8, 3), 7, np.uint8), pre())
    assert np.all(flat == 0)


def test_affine_and_bgr() -> None:
    crops = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    affine = pre(color="BGR", normalize="affine", mean=(10.0, 20.0, 30.0), scale=0.5)
    np.testing.assert_allclose(preprocess(crops, affine), (crops - np.array([10, 20, 30])) * 0.5)


@pytest.fixture(scope="module")
def face_crops(shared_dir: Path) -> np.ndarray:
    paths = sorted((shared_dir / "data/happyhouse").glob("*.jpg"))[:5]
    return np.stack([cv2.resize(cv2.imread(str(p)), (160, 160)) for p in paths])


@pytest.mark.slow
def test_batch_equals_one_by_one_and_unit_length(real_models: Path, face_crops: np.ndarray) -> None:
    encoder = Encoder(Manifest.load(real_models), "facenet")
    assert (encoder.size, encoder.dim, encoder.entry.threshold) == (160, 128, 0.7)
    batch = encoder(face_crops)
    single = np.concatenate([encoder(c[None]) for c in face_crops])
    assert batch.shape == (5, 128) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert encoder(face_crops[:0]).shape == (0, 128)


@pytest.mark.slow
def test_preprocessing_comes_from_the_manifest(real_models: Path, tmp_path: Path, face_crops: np.ndarray) -> None:
    """Change the recorded colour order and the embeddings change: nothing is hard-coded."""
    models = tmp_path / "models"
    shutil.copytree(real_models, models)
    manifest_path = models / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    rgb = Encoder(Manifest.load(models), "facenet")(face_crops)
    raw["models"]["facenet"]["preprocessing"]["color"] = "BGR"
    manifest_path.write_text(json.dumps(raw))
    bgr = Encoder(Manifest.load(models), "facenet")(face_crops)
    assert np.linalg.norm(rgb - bgr, axis=1).min() > 0.05
    reference = Encoder(Manifest.load(models), "facenet")(face_crops[..., ::-1].copy())
    np.testing.assert_allclose(reference, rgb, atol=1e-5)  # BGR of swapped pixels == RGB of the originals


def test_detector_entry_is_not_an_encoder(real_models: Path) -> None:
    with pytest.raises(ModelError, match="not a face encoder"):
        Encoder(Manifest.load(real_models), "mtcnn_onet")


@pytest.mark.slow
def test_layout_optimised_session_matches_plain_and_falls_back(
    real_models: Path, face_crops: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The encoder's child-optimised graph computes what the plain graph does; a failed child only warns."""
    manifest = Manifest.load(real_models)
    x = preprocess(face_crops, manifest.entry("facenet").preprocessing)
    plain = manifest.session("facenet").run(None, {"input": x})[0]
    optimised_session = manifest.session("facenet", layout_optimization=True)
    np.testing.assert_allclose(optimised_session.run(None, {"input": x})[0], plain, atol=1e-5)
    monkeypatch.setattr("facedoor.models.sys.executable", "/bin/false")
    with caplog.at_level("WARNING", logger="facedoor.models"):
        fallback = manifest.session("facenet", layout_optimization=True)
    assert "layout optimisation failed" in caplog.text
    np.testing.assert_allclose(fallback.run(None, {"input": x})[0], plain, atol=1e-5)


def test_session_workers_spin_only_while_a_run_lasts(real_models: Path) -> None:
    """Workers left spinning after a run starve the door's capture thread (benchmarks/daemon.py)."""
    manifest = Manifest.load(real_models)
    for layout_optimization in (False, True):
        options = manifest.session("mtcnn_onet", 2, layout_optimization=layout_optimization).get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert options.intra_op_num_threads == 2


@pytest.mark.parametrize(("field", "value", "named"), [
    ("color", None, "preprocessing.color"),           # missing: never guessed
    ("normalize", "zscore", "preprocessing.normalize"),  # unknown
    ("scale", None, "preprocessing.scale"),
])
def test_manifest_missing_or_bad_contract_field_is_refused_by_name(real_models: Path, tmp_path: Path, field: str,
                                                                   value, named: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    raw = json.loads((real_models / "manifest.json").read_text())
    if value is None:
        del raw["models"]["facenet"]["preprocessing"][field]
    else:
        raw["models"]["facenet"]["preprocessing"][field] = value
    (models / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=f"'facenet'.*{named}"):
        Manifest.load(models)


@pytest.mark.parametrize(("cpuinfo", "expected"), [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx_vnni\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", False),                      # AVX2, no VNNI
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n", True),     # Arm with dotprod
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),                # Raspberry Pi 4
])
def test_int8_dot_product_reads_the_cpu_flags(cpuinfo: str, expected: bool) -> None:
    assert int8_dot_product(cpuinfo) is expected


def test_int8_weights_on_a_cpu_without_a_dot_product_are_warned_about(
        real_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import facedoor.embed

    models = tmp_path / "models"
    shutil.copytree(real_models, models)
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"]["facenet"]["quantization"] = {"weights": "int8 per-channel"}
    (models / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(facedoor.embed, "int8_dot_product", lambda: False)
    Encoder(Manifest.load(models), "facenet", 1)
    assert "no 8-bit dot product" in caplog.text and "--int8-weights uint8" in caplog.text
    caplog.clear()
    monkeypatch.setattr(facedoor.embed, "int8_dot_product", lambda: True)
    Encoder(Manifest.load(models), "facenet", 1)
    assert "dot product" not in caplog.text
