"""Alignment: Umeyama similarity, template, box crop, and what alignment buys on a rotated face."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.align import Aligner, box_matrix, similarity_matrix, template, umeyama, warp


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def test_umeyama_recovers_a_known_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(5, 2))
    truth = _similarity(23.0, 1.7, -40.0, 12.5)
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(umeyama(src, dst), truth, atol=1e-9)
    # agrees with OpenCV's estimator on noisy points
    noisy = dst + rng.normal(scale=0.5, size=dst.shape)
    cv_matrix, _ = cv2.estimateAffinePartial2D(src, noisy, method=cv2.LMEDS)
    np.testing.assert_allclose(umeyama(src, noisy), cv_matrix, atol=0.05 * np.abs(truth).max())


def test_umeyama_never_mirrors() -> None:
    src = np.array([[0, 0], [10, 0], [5, 5], [2, 9], [8, 9]], float)
    mirrored = src * [-1, 1]
    m = umeyama(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0


def test_template_scales_with_encoder_size() -> None:
    t160, t96 = template(160), template(96)
    np.testing.assert_allclose(t160 / 160, t96 / 96, atol=1e-6)
    assert t160[0, 0] < t160[2, 0] < t160[1, 0]  # left eye, nose, right eye
    # padding shrinks towards the centre
    assert np.ptp(template(160, 0.2)[:, 0]) < np.ptp(t160[:, 0])


def test_landmarks_land_on_the_template() -> None:
    truth = _similarity(-15.0, 0.6, 30.0, 50.0)
    inverse = cv2.invertAffineTransform(truth)
    landmarks = template(160) @ inverse[:, :2].T + inverse[:, 2]
    m = similarity_matrix(landmarks, 160)
    mapped = landmarks @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped, template(160), atol=1e-6)


def test_box_matrix_maps_box_with_margin() -> None:
    m = box_matrix(np.array([100, 50, 200, 170]), 160, margin=0.1)
    corners = np.array([[90, 38, 1], [210, 182, 1]], float) @ m.T
    np.testing.assert_allclose(corners, [[0, 0], [160, 160]], atol=1e-9)


def test_aligner_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="similarity or box"):
        Aligner("affine", 160)


def test_warp_output_size_and_dtype() -> None:
    image = np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8)
    crop = warp(image, box_matrix(np.array([10, 10, 80, 100]), 96), 96)
    assert crop.shape == (96, 96, 3) and crop.dtype == np.uint8


@pytest.mark.slow
def test_similarity_alignment_undoes_head_roll(real_models: Path, shared_dir: Path) -> None:
    """A face rotated by 25 degrees: the aligned crop's embedding stays close to the upright one;
    the box crop's moves much further."""
    from facedoor.config import parse_config
    from facedoor.pipeline import FacePipeline

    pipeline = FacePipeline.from_config(parse_config({"models": str(real_models)}))
    image = cv2.imread(str(sorted((shared_dir / "data/faces/lfw10/Colin_Powell").glob("*.jpg"))[1]))
    rotated = cv2.warpAffine(image, cv2.getRotationMatrix2D((125, 125), 25, 1.0), (250, 250),
                             borderMode=cv2.BORDER_REPLICATE)
    shifts = {}
    for method in ("similarity", "box"):
        pipeline.aligner = Aligner(method, pipeline.encoder.size)
        upright = pipeline.encode(image, pipeline.detect_still(image)[:1])[0]
        tilted = pipeline.encode(rotated, pipeline.detect_still(rotated)[:1])[0]
        shifts[method] = float(np.linalg.norm(upright - tilted))
    assert shifts["similarity"] < 0.5 < shifts["box"], shifts
