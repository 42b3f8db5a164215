"""The real Keras FaceNet (fetched from PyPI, exported once): parity and the Happy House check."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _encode(session, entry, path: Path) -> np.ndarray:
    """Embed one 96x96 Happy House crop, preprocessed exactly as the manifest says."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    if entry.preprocessing.color == "RGB":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    h, w = entry.input_size
    x = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    pre = entry.preprocessing
    if pre.normalize == "per_image_standardization":
        x = (x - x.mean()) / max(float(x.std()), 1.0 / np.sqrt(x.size))
    else:
        x = (x - np.asarray(pre.mean, np.float32)) * pre.scale
    return session.run(None, {entry.input_name: x[None]})[0][0]


def test_real_facenet_manifest_and_parity(real_models):
    from facedoor.sources import FACENET_SHA256

    body = json.loads((real_models / "manifest.json").read_text())["models"]["facenet"]
    assert body["weights"]["sha256"] == FACENET_SHA256 and body["weights"]["untrained"] is False
    assert body["parity_max_abs_diff"] < 1e-4
    assert body["params"] == 22_808_144


def test_happy_house(real_models, shared_dir, capsys):
    from facedoor.models import Manifest

    manifest = Manifest.load(real_models)
    entry = manifest.entry("facenet")
    session = manifest.session("facenet")
    house = shared_dir / "data" / "happyhouse"
    residents = {p.stem: _encode(session, entry, p) for p in sorted(house.iterdir())
                 if p.suffix in {".jpg", ".png"} and not p.stem.startswith("camera")}
    assert {"younes", "kian", "benoit"} <= set(residents)

    def distances(camera: str) -> dict[str, float]:
        e = _encode(session, entry, house / camera)
        return {name: float(np.linalg.norm(e - v)) for name, v in residents.items()}

    cam0, cam2 = distances("camera_0.jpg"), distances("camera_2.jpg")
    with capsys.disabled():
        print(f"\nHappy House: camera_0 -> younes {cam0['younes']:.3f} (nearest "
              f"{min(cam0, key=cam0.get)}); camera_2 -> kian {cam2['kian']:.3f}, "
              f"benoit {cam2['benoit']:.3f}")
    assert min(cam0, key=cam0.get) == "younes" and cam0["younes"] < 0.7
    assert cam2["kian"] >= 0.7
