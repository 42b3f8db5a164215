"""`facedoor-export --only landmarks`: MediaPipe's face mesh and iris TFLite models converted to ONNX, pinned,
parity-checked on a real face against the TFLite interpreter; and options that would be silently ignored refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.landmarks import FACE_INPUT, FaceMesh, _crop, _roi_matrix
from facedoor.models import Manifest, ModelError
from facedoor_export import mediapipe_landmarks


def test_models_are_pinned_in_the_manifest(gate_models: Path) -> None:
    manifest = Manifest.load(gate_models)
    raw = json.loads((gate_models / "manifest.json").read_text())["models"]
    for name, (member, sha256, side, outputs, kind) in mediapipe_landmarks.MODELS.items():
        entry = manifest.entry(name)
        assert entry.kind == kind and entry.layout == "NHWC" and entry.input_shape == (1, side, side, 3)
        assert entry.preprocessing.color == "RGB" and entry.preprocessing.scale == pytest.approx(1 / 255)
        assert raw[name]["weights"]["sha256"] == sha256 and raw[name]["weights"]["wheel_sha256"] == \
            mediapipe_landmarks.WHEEL_SHA256 and member in raw[name]["weights"]["source"]
        assert [o["name"] for o in raw[name]["outputs"]] == list(outputs)
        assert raw[name]["parity_reference"] == "tf.lite.Interpreter"
        assert 0 <= raw[name]["parity_max_abs_diff"] <= mediapipe_landmarks.TOLERANCE_PX
        manifest.verify(name)


def test_onnx_matches_tflite_on_a_real_face(gate_models: Path, shared_dir: Path) -> None:
    """The converted mesh on a real NUAA face crop: the same 468 points as MediaPipe's own TFLite model."""
    import tensorflow as tf

    wheel = mediapipe_landmarks.fetch_wheel()
    member, sha256 = mediapipe_landmarks.MODELS["face_landmark"][:2]
    interpreter = tf.lite.Interpreter(model_content=mediapipe_landmarks.read_member(wheel, member, sha256))
    interpreter.allocate_tensors()
    image = cv2.imread(str(sorted((shared_dir / "data/antispoof/nuaa/live").glob("0004_*.jpg"))[0]))
    crop = _crop(image, _roi_matrix(np.array([320.0, 220.0]), 330.0, 0.0, FACE_INPUT), FACE_INPUT)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], crop)
    interpreter.invoke()
    want = interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(468, 3)
    mesh = FaceMesh.from_manifest(Manifest.load(gate_models))
    got = np.asarray(mesh.face.run(None, {"input": crop})[0]).reshape(468, 3)
    assert np.abs(got - want).max() < 1e-3
    assert want[:, :2].min() > 0 and want[:, :2].max() < FACE_INPUT  # a face really was found in the crop


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path, export_cli) -> None:
    fake = tmp_path / mediapipe_landmarks.WHEEL
    fake.write_bytes(b"PK\x05\x06" + bytes(18))
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--only", "landmarks", "--mediapipe-wheel", fake)
    assert code == 2 and "SHA-256" in stderr and mediapipe_landmarks.WHEEL in stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.onnx"))


def test_a_member_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    from facedoor_export.errors import ExportError

    wheel = mediapipe_landmarks.fetch_wheel()
    member = mediapipe_landmarks.MODELS["face_landmark"][0]
    with pytest.raises(ExportError, match="expected"):
        mediapipe_landmarks.read_member(wheel, member, "0" * 64)


@pytest.mark.parametrize(("option", "group"), [("--antispoof-dir", "antispoof"), ("--mediapipe-wheel", "landmarks")])
def test_an_option_of_a_group_not_exported_is_refused(option: str, group: str, tmp_path: Path, export_cli) -> None:
    """`--antispoof-dir DIR` alone used to export the default groups and ignore DIR: now it is refused."""
    out = tmp_path / "models"
    code, _, stderr = export_cli("--out", out, "--only", "mtcnn", option, tmp_path)
    assert code == 2 and option in stderr and f"--only {group}" in stderr
    assert not out.exists() or not list(out.iterdir())


def test_up_to_date_models_are_skipped_and_a_tampered_one_refused(gate_models: Path, tmp_path: Path,
                                                                 export_cli) -> None:
    out = tmp_path / "models"
    shutil.copytree(gate_models, out)
    code, stdout, _ = export_cli("--out", out, "--only", "landmarks")
    assert code == 0 and stdout.count("up to date, skipped") == 2
    path = out / "iris_landmark.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        FaceMesh.from_manifest(Manifest.load(out))
