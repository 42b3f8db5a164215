"""Only the faces that decide are encoded: a crowded frame costs a bounded number of encoder rows."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.align import Aligner
from facedoor.detect import Face
from facedoor.pipeline import FacePipeline


class CountingEncoder:
    """Stands in for the ONNX encoder: counts calls and batch rows, returns unit vectors."""

    name, sha256, dim, size = "counting", "0" * 64, 8, 32

    def __init__(self) -> None:
        self.calls = 0
        self.rows = 0

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.rows += len(crops)
        out = np.zeros((len(crops), self.dim), np.float32)
        out[:, 0] = 1.0
        return out


class FixedDetector:
    """Returns the given faces for any frame."""

    name = "fixed"

    def __init__(self, faces: list[Face]):
        self.faces = faces

    def detect(self, image_bgr: np.ndarray, min_face_size: int) -> list[Face]:
        return [Face(f.box.copy(), f.score, f.landmarks.copy()) for f in self.faces]


def _face(x: float, y: float, side: float) -> Face:
    box = np.array([x, y, x + side, y + side], np.float32)
    lm = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32) * side + [x, y]
    return Face(box=box, score=0.99, landmarks=lm.astype(np.float32))


def _thirty_faces() -> list[Face]:
    """A 6 x 5 crowd: one 150 px face near the door, two of ~100 px beside it, 27 small ones behind."""
    faces = [_face(20, 20, 150), _face(200, 20, 100), _face(320, 20, 90)]
    faces += [_face(20 + 70 * (i % 9), 200 + 70 * (i // 9), 40 + i) for i in range(27)]
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


def _pipeline(detector: object, encoder: CountingEncoder, max_faces: int = 3, ratio: float = 0.5) -> FacePipeline:
    return FacePipeline(detector, Aligner("similarity", encoder.size), encoder, 20, max_faces, ratio)


def test_thirty_faces_encode_at_most_the_bound_in_one_call() -> None:
    encoder = CountingEncoder()
    pipeline = _pipeline(FixedDetector(_thirty_faces()), encoder)
    frame = np.zeros((480, 640, 3), np.uint8)
    faces = pipeline.analyze(frame)
    assert len(faces) == 30, "every face is still counted"
    assert encoder.calls == 1 and encoder.rows == 3
    encoded = [f for f in faces if f.embedding is not None]
    assert [f.size for f in encoded] == [150, 100, 90]
    assert faces[0].embedding is not None, "the largest face always decides"


def test_ratio_and_bound() -> None:
    faces = _thirty_faces()
    encoder = CountingEncoder()
    assert len(_pipeline(FixedDetector(faces), encoder, max_faces=1).deciding(faces)) == 1
    assert len(_pipeline(FixedDetector(faces), encoder, max_faces=32, ratio=0.5).deciding(faces)) == 3
    # ratio 0.25: faces of at least 37.5 px, i.e. all 30, but never more than max_faces
    assert len(_pipeline(FixedDetector(faces), encoder, max_faces=10, ratio=0.25).deciding(faces)) == 10
    assert _pipeline(FixedDetector([]), encoder).deciding([]) == []


@pytest.mark.slow
def test_a_generated_crowd_through_real_mtcnn_encodes_at_most_the_bound(real_models: Path, shared_dir: Path) -> None:
    from facedoor.detect import MTCNNDetector
    from facedoor.models import Manifest

    photos = sorted((shared_dir / "data/faces/lfw10").glob("*/*.jpg"))[:30]
    frame = np.full((720, 1280, 3), 120, np.uint8)
    for i, path in enumerate(photos):
        face = cv2.imread(str(path))[60:190, 60:190]  # 130 px around the face
        side = 200 if i == 0 else 110
        face = cv2.resize(face, (side, side))
        x, y = (20, 20) if i == 0 else (240 + 115 * ((i - 1) % 9), 20 + 115 * ((i - 1) // 9))
        if i and y + side > 720:
            x, y = 20 + 115 * (i % 2), 240 + 115 * ((i - 27) // 2 + 2)
        frame[y : y + side, x : x + side] = face
    encoder = CountingEncoder()
    pipeline = _pipeline(MTCNNDetector(Manifest.load(real_models)), encoder)
    faces = pipeline.analyze(frame)
    assert len(faces) >= 20, f"the crowd was found ({len(faces)} faces)"
    assert encoder.calls == 1 and encoder.rows <= 3
