"""Dense face landmarks for the liveness gate: MediaPipe's face mesh (468 3-D points) and iris model on ONNX Runtime.

Both models come from the `mediapipe==0.10.14` wheel, converted by `facedoor-export --only landmarks`
(manifest entries `face_landmark`, `iris_landmark`); nothing of MediaPipe runs here. The mesh reads
a 192x192 RGB crop in [0, 1]: the detector's box squared, grown 1.5x around its centre and rotated
so the eyes are level (MediaPipe's detection-to-ROI rule); it returns x, y, z in crop pixels and a
face-presence logit. The iris model reads a 64x64 crop around each eye (2.3x the eye-corner span,
MediaPipe's rule; the subject's right eye mirrored, as the model was trained on left eyes).

The geometry helpers below are pure numpy: eye aspect ratio (blinks), iris offset in the eye
(gaze movement), the residual of one homography fitted to the points of two frames (a print or a
screen moves as one plane, a head does not), the rotation between two meshes (head pose change) and
the head's pose (yaw, pitch) for the active challenge (facedoor.challenge).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from facedoor.models import Manifest, ModelError

FACE_INPUT = 192
IRIS_INPUT = 64
FACE_ROI_SCALE = 1.5
IRIS_ROI_SCALE = 2.3
MODELS = ("face_landmark", "iris_landmark")
# Mesh indices (MediaPipe canonical face): per eye p1..p6 for the eye aspect ratio (outer corner,
# two upper lid points, inner corner, two lower lid points); the subject's right eye first.
EYES = ((33, 160, 158, 133, 153, 144), (263, 387, 385, 362, 380, 373))
# Rigid points for head pose and inter-ocular scale: eye corners, nose tip, chin, forehead, cheeks.
EYE_CORNERS = ((33, 133), (263, 362))
# The face's own axes for its pose: its right side (eye corners, cheek) to its left, forehead to chin.
RIGHT_SIDE, LEFT_SIDE = (33, 133, 234, 127), (263, 362, 454, 356)
FOREHEAD, CHIN = (10, 109, 338, 151), (152, 148, 377, 175)


@dataclass(frozen=True)
class Pose:
    """Where a face points, in degrees: yaw > 0 turned to the person's own left (towards the image's right
    on a camera that does not mirror), pitch > 0 chin up; 0, 0 faces the camera."""

    yaw: float
    pitch: float


@dataclass(frozen=True)
class Mesh:
    """One face's landmarks in image pixels: (468, 3) x, y, z (z in the same pixel scale) and the
    face-presence probability; `irises` (2, 2): each iris centre (subject's right eye first; NaN: that eye's
    iris was not read this frame), or None."""

    points: np.ndarray
    presence: float
    irises: np.ndarray | None = None

    @property
    def eye_distance(self) -> float:
        """Distance between the eye centres in pixels (the face's scale)."""
        centres = [self.points[list(pair), :2].mean(axis=0) for pair in EYE_CORNERS]
        return float(np.linalg.norm(centres[0] - centres[1]))


def _roi_matrix(centre: np.ndarray, size: float, angle: float, side: int) -> np.ndarray:
    """2x3 affine from crop pixels (side x side) to image pixels: the square of SIZE at CENTRE rotated by ANGLE."""
    s = size / side
    c, n = math.cos(angle) * s, math.sin(angle) * s
    half = (side - 1) / 2
    return np.array([[c, -n, centre[0] - c * half + n * half],
                     [n, c, centre[1] - n * half - c * half]], dtype=np.float64)


def _crop(image_bgr: np.ndarray, to_image: np.ndarray, side: int, mirror: bool = False) -> np.ndarray:
    """The (1, side, side, 3) float32 RGB [0, 1] crop whose pixel (u, v) is image point TO_IMAGE @ (u, v, 1)
    (warped from the BGR frame, then only the crop's channels swapped)."""
    import cv2

    m = to_image.copy()
    if mirror:  # crop column u shows the image at column side - 1 - u
        m[:, 0] = -m[:, 0]
        m[:, 2] += to_image[:, 0] * (side - 1)
    patch = cv2.warpAffine(image_bgr, m, (side, side), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT)
    return (cv2.cvtColor(patch, cv2.COLOR_BGR2RGB).astype(np.float32) * np.float32(1 / 255))[None]


def _to_image(to_image: np.ndarray, xy: np.ndarray, side: int, mirror: bool = False) -> np.ndarray:
    """Crop pixel coordinates XY (N, 2) back to image pixels."""
    xy = xy.astype(np.float64)
    if mirror:
        xy = np.stack([side - 1 - xy[:, 0], xy[:, 1]], axis=1)
    return xy @ to_image[:, :2].T + to_image[:, 2]


class FaceMesh:
    """Face mesh + iris sessions: `mesh(image_bgr, box, eyes)` -> `Mesh` in image pixels."""

    def __init__(self, face_session: Any, iris_session: Any | None):
        self.face = face_session
        self.iris = iris_session

    @classmethod
    def from_manifest(cls, manifest: Manifest, threads: int | None = 1) -> FaceMesh:
        """Open both models after their hash check; a wrong entry is a ModelError."""
        for name, side in zip(MODELS, (FACE_INPUT, IRIS_INPUT)):
            entry = manifest.entry(name)
            if entry.input_size != (side, side):
                raise ModelError(f"model {name!r} has input {entry.input_shape}, expected {side}x{side} "
                                 "(re-run facedoor-export --only landmarks)")
        return cls(*(manifest.session(name, threads, layout_optimization=True) for name in MODELS))

    def mesh(self, image_bgr: np.ndarray, box: np.ndarray, eyes: np.ndarray, iris_eyes: Sequence[int] = (0, 1)) -> Mesh:
        """Landmarks of the face at detector BOX (x1, y1, x2, y2); EYES (2, 2): its eye centres, image-left
        first. The iris model reads only the eyes in IRIS_EYES (0: the subject's right eye); the others'
        rows of `irises` are NaN."""
        (lx, ly), (rx, ry) = np.asarray(eyes, dtype=np.float64)[:2]
        angle = math.atan2(ry - ly, rx - lx)
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
        size = max(x2 - x1, y2 - y1) * FACE_ROI_SCALE
        to_image = _roi_matrix(centre, size, angle, FACE_INPUT)
        raw, flag = self.face.run(None, {"input": _crop(image_bgr, to_image, FACE_INPUT)})
        raw = np.asarray(raw, dtype=np.float64).reshape(468, 3)
        points = np.empty_like(raw)
        points[:, :2] = _to_image(to_image, raw[:, :2], FACE_INPUT)
        points[:, 2] = raw[:, 2] * size / FACE_INPUT
        presence = 1.0 / (1.0 + math.exp(-float(np.asarray(flag).reshape(-1)[0])))
        irises = self.irises(image_bgr, points, iris_eyes) if self.iris is not None else None
        return Mesh(points, presence, irises)

    def irises(self, image_bgr: np.ndarray, points: np.ndarray, eyes: Sequence[int] = (0, 1)) -> np.ndarray:
        """(2, 2) iris centres in image pixels from the iris model on each eye in EYES (NaN for the others)."""
        assert self.iris is not None
        centres = np.full((2, 2), np.nan)
        for eye in eyes:
            outer, inner = EYE_CORNERS[eye]
            a, b = points[outer, :2], points[inner, :2]
            left, right = (a, b) if a[0] <= b[0] else (b, a)
            angle = math.atan2(right[1] - left[1], right[0] - left[0])
            size = float(np.linalg.norm(b - a)) * IRIS_ROI_SCALE
            to_image = _roi_matrix((a + b) / 2, max(size, 1.0), angle, IRIS_INPUT)
            mirror = eye == 0
            _, iris = self.iris.run(None, {"input": _crop(image_bgr, to_image, IRIS_INPUT, mirror)})
            centre = np.asarray(iris, dtype=np.float64).reshape(5, 3)[:1, :2]
            centres[eye] = _to_image(to_image, centre, IRIS_INPUT, mirror)[0]
        return centres


# --- pure geometry ------------------------------------------------------------------------------

def eye_aspect_ratio(points: np.ndarray) -> float:
    """Mean eye aspect ratio of both eyes ((|p2-p6| + |p3-p5|) / 2|p1-p4|): ~0.25-0.35 open, < 0.15 closed."""
    ratios = []
    xy = points[:, :2]
    for p1, p2, p3, p4, p5, p6 in EYES:
        width = max(float(np.linalg.norm(xy[p1] - xy[p4])), 1e-6)
        ratios.append(float(np.linalg.norm(xy[p2] - xy[p6]) + np.linalg.norm(xy[p3] - xy[p5])) / (2 * width))
    return float(np.mean(ratios))


def iris_offset(points: np.ndarray, irises: np.ndarray) -> np.ndarray:
    """(2, 2) each iris centre relative to its eye's corner midpoint, in eye widths (gaze, roughly)."""
    offsets = []
    for (outer, inner), iris in zip(EYE_CORNERS, irises):
        a, b = points[outer, :2], points[inner, :2]
        offsets.append((iris - (a + b) / 2) / max(float(np.linalg.norm(b - a)), 1e-6))
    return np.array(offsets)


def _normalising(points: np.ndarray) -> np.ndarray:
    """3x3 similarity moving POINTS (N, 2) to zero mean and mean distance sqrt(2) (Hartley)."""
    mean = points.mean(axis=0)
    spread: float = max(float(np.mean(np.linalg.norm(points - mean, axis=1))), 1e-9)
    s = math.sqrt(2) / spread
    return np.array([[s, 0, -s * mean[0]], [0, s, -s * mean[1]], [0, 0, 1]])


def homography_residual(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance (pixels) of points B (N, 2) from A mapped by the homography fitted A -> B (normalised DLT).

    A printed photo or a screen is one plane: all its points follow one homography between any
    two views, up to the landmark model's noise. A head's points do not once it turns."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ta, tb = _normalising(a), _normalising(b)
    ha = np.c_[a, np.ones(len(a))] @ ta.T
    hb = np.c_[b, np.ones(len(b))] @ tb.T
    zeros = np.zeros_like(ha)
    rows = np.concatenate([np.c_[ha, zeros, -hb[:, :1] * ha], np.c_[zeros, ha, -hb[:, 1:2] * ha]])
    h = np.linalg.eigh(rows.T @ rows)[1][:, 0].reshape(3, 3)  # the null vector of the normalised system
    h = np.linalg.inv(tb) @ h @ ta
    mapped = np.c_[a, np.ones(len(a))] @ h.T
    w = mapped[:, 2:]
    if np.any(np.abs(w) < 1e-12):
        return float("inf")
    return float(np.sqrt(np.mean(np.sum((mapped[:, :2] / w - b) ** 2, axis=1))))


def global_motion(a: np.ndarray, b: np.ndarray) -> float:
    """How far points A (N, 2) moved as a whole to B: the centroid's shift (pixels) plus the scale
    change as a fraction of the spread times it. The landmark model's jitter on a still image moves
    single points far more than their centroid; a face that really moves shifts them together."""
    ca, cb = a.mean(axis=0), b.mean(axis=0)
    spread_a = float(np.sqrt(np.mean(np.sum((a - ca) ** 2, axis=1))))
    spread_b = float(np.sqrt(np.mean(np.sum((b - cb) ** 2, axis=1))))
    return float(np.linalg.norm(cb - ca)) + abs(spread_b - spread_a)


def rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (degrees) of the rotation that best maps 3-D points A onto B (Kabsch, after centring and scaling)."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    a /= max(float(np.linalg.norm(a)), 1e-9)
    b /= max(float(np.linalg.norm(b)), 1e-9)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))


def head_pose(points: np.ndarray) -> Pose:
    """The pose of a face mesh (468, 3) (x right, y down, z away from the camera, one scale): the normal of
    the face's own axes (right side to left side, forehead to chin, each the mean of 4 rigid points), so
    roll does not enter and no 3-D face model is needed. Absolute values carry the camera's angle and the
    mesh's bias; a change between two frames of one track is the head's turn."""
    across = points[list(LEFT_SIDE)].mean(axis=0) - points[list(RIGHT_SIDE)].mean(axis=0)
    down = points[list(CHIN)].mean(axis=0) - points[list(FOREHEAD)].mean(axis=0)
    normal = np.cross(down, across)  # towards the camera (-z) for a face looking into it
    nx, ny, nz = normal / max(float(np.linalg.norm(normal)), 1e-9)
    return Pose(math.degrees(math.atan2(nx, -nz)), math.degrees(math.atan2(-ny, math.hypot(nx, nz))))
