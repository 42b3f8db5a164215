"""A synthetic 3-D face mesh that turns on demand: 468 points as the face mesh returns them (x, y image
pixels, z depth away from the camera on the same scale), for the head-pose and challenge tests."""
from __future__ import annotations

import math

import numpy as np

from facedoor.landmarks import CHIN, FOREHEAD, LEFT_SIDE, RIGHT_SIDE, Mesh

# The points head_pose reads, placed as on a real face (pixels, centred, x to the image's right,
# y down, z away from the camera); the rest lie on the front of an ellipsoid.
ANCHORS = {
    **dict(zip(RIGHT_SIDE, [(-45, -20, 10), (-15, -20, 12), (-72, 10, 48), (-68, -25, 50)])),
    **dict(zip(LEFT_SIDE, [(45, -20, 10), (15, -20, 12), (72, 10, 48), (68, -25, 50)])),
    **dict(zip(FOREHEAD, [(0, -80, 5), (-25, -75, 10), (25, -75, 10), (0, -62, 0)])),
    **dict(zip(CHIN, [(0, 90, 12), (-15, 88, 16), (15, 88, 16), (0, 80, 6)])),
}


def synthetic_face(seed: int = 0) -> np.ndarray:
    """(468, 3) points of a face looking into the camera, centred on the origin."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=(468, 3))
    direction[:, 2] = -np.abs(direction[:, 2])  # the half facing the camera
    points = direction / np.linalg.norm(direction, axis=1, keepdims=True) * np.array([75.0, 95.0, 55.0])
    points[:, 2] += 55.0
    for index, xyz in ANCHORS.items():
        points[index] = xyz
    return points


def turned(points: np.ndarray, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, scale: float = 1.0,
           centre: tuple[float, float] = (320.0, 240.0), distance: float = 800.0, focal: float = 600.0) -> np.ndarray:
    """POINTS tilted by ROLL about the face's own forward axis, then turned by YAW degrees to the person's
    left (the nose towards the image's right), then PITCH chin up, SCALEd, seen by a pinhole camera
    DISTANCE away: (468, 3) image x, y and depth z in pixels, as the face mesh reports them."""
    y, p, r = (math.radians(a) for a in (yaw, pitch, roll))
    about_y = np.array([[math.cos(y), 0, -math.sin(y)], [0, 1, 0], [math.sin(y), 0, math.cos(y)]])
    about_x = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    about_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    q = (points - points.mean(axis=0)) * scale @ (about_x @ about_y @ about_z).T
    xy = focal * q[:, :2] / (distance + q[:, 2:]) + np.asarray(centre)
    return np.c_[xy, q[:, 2] * focal / distance]


def head_meshes(yaws: list[float], pitches: list[float] | None = None, step_px: float = 4.0) -> list[Mesh]:
    """One mesh per frame of the synthetic face at YAWS (degrees; PITCHES default: a nod of +-10 degrees,
    the motion the liveness gate looks for), drifting STEP_PX pixels a frame to the right."""
    pitches = pitches if pitches is not None else [10 * math.sin(i / 2) for i in range(len(yaws))]
    face = synthetic_face()
    return [Mesh(turned(face, yaw, pitch, centre=(320 + step_px * i, 240)), 1.0)
            for i, (yaw, pitch) in enumerate(zip(yaws, pitches))]
