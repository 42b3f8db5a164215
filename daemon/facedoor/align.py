"""Face alignment: from a detected face to the encoder's square input crop.

`similarity` maps the 5 landmarks onto a fixed template with a least-squares similarity
transform (rotation, uniform scale, translation; Umeyama's method in numpy), so eyes and mouth
land at the same place in every crop whatever the head roll. `box` cuts the detector's box grown
by a margin, as FaceNet's own training data was cut. Both are one `cv2.warpAffine`.
`benchmarks/accuracy.py` measures both; the config's `recognition.align` picks.
"""
from __future__ import annotations

import cv2
import numpy as np

# The widely used 5-point template (ArcFace/InsightFace) for a 112x112 crop: left eye, right
# eye, nose, left and right mouth corners (image left/right).
_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# Fraction of the crop added as border around the template / the box: FaceNet was trained on
# loose crops (box + margin), so a tight template loses forehead and chin it relies on.
SIMILARITY_PADDING = 0.0
BOX_MARGIN = 0.1


def template(size: int, padding: float = SIMILARITY_PADDING) -> np.ndarray:
    """The 5-point template for a SIZE x SIZE crop, shrunk towards the centre by PADDING on each side."""
    unit = _TEMPLATE_112 / 112.0
    return ((unit - 0.5) * (1.0 - 2.0 * padding) + 0.5) * size


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform that maps SRC points onto DST in the least-squares sense."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rotation = u @ np.diag(d) @ vt
    var = (src_c**2).sum() / len(src)
    scale = (s * d).sum() / var if var > 0 else 1.0
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def similarity_matrix(landmarks: np.ndarray, size: int, padding: float = SIMILARITY_PADDING) -> np.ndarray:
    """Image -> crop transform that puts LANDMARKS (5, 2) on the template."""
    return umeyama(landmarks, template(size, padding))


def box_matrix(box: np.ndarray, size: int, margin: float = BOX_MARGIN) -> np.ndarray:
    """Image -> crop transform for BOX (x1, y1, x2, y2) grown by MARGIN of its size on every side,
    stretched to SIZE x SIZE."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    x1, y1, w, h = x1 - margin * w, y1 - margin * h, w * (1 + 2 * margin), h * (1 + 2 * margin)
    return np.array([[size / w, 0.0, -x1 * size / w], [0.0, size / h, -y1 * size / h]])


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The SIZE x SIZE crop of IMAGE under MATRIX (bilinear, edges replicated)."""
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class Aligner:
    """Cuts encoder-ready crops with the configured method (`similarity` or `box`)."""

    def __init__(self, method: str, size: int, padding: float = SIMILARITY_PADDING, margin: float = BOX_MARGIN):
        if method not in ("similarity", "box"):
            raise ValueError(f"alignment method {method!r}: expected similarity or box")
        self.method, self.size, self.padding, self.margin = method, size, padding, margin

    def matrix(self, box: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        if self.method == "similarity":
            return similarity_matrix(landmarks, self.size, self.padding)
        return box_matrix(box, self.size, self.margin)

    def crop(self, image: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """One SIZE x SIZE x 3 crop of IMAGE (same colour order as IMAGE)."""
        return warp(image, self.matrix(box, landmarks), self.size)
