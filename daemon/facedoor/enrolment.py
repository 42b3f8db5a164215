"""Enrolment: photos, or the frames of a camera or video, through the same quality gates, then
one store transaction.

The command line (`facedoor enroll`) and the demo enrol photos through `embed_photos`, so a photo
that one of them would reject the other rejects too. At the door (`facedoor enroll NAME --camera`
or `--video FILE`) every sampled frame passes the same gates (`frame_candidates`), frames of
anyone but the main person are refused (`one_person`), and the K most diverse good frames are
kept (`most_diverse`): the enrolment then shares the door camera's light and angle.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedoor.images import ImageError, read_image
from facedoor.pipeline import FacePipeline, PhotoRejected

SAME_PERSON_DISTANCE = 1.0  # L2; FaceNet's equal-error point on LFW is ~1.05: beyond it, another person


class EnrolmentError(ValueError):
    """Enrolment from a camera or video cannot go ahead; the message says why (nothing was stored)."""


@dataclass
class EnrolmentPhotos:
    """The outcome of checking photos: embeddings of the usable ones, reasons for the others."""

    paths: list[Path] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """(N, D) embeddings of the usable photos, for `EmbeddingStore.enroll`."""
        return np.stack(self.embeddings)


def embed_photos(pipeline: FacePipeline, paths: Sequence[Path], *, limit: int | None = None,
                 on_reject: Callable[[Path, str], None] | None = None) -> EnrolmentPhotos:
    """Check and embed PATHS in order (at most LIMIT usable ones); ON_REJECT hears each rejection."""
    result = EnrolmentPhotos()
    for path in paths:
        if limit is not None and len(result.paths) >= limit:
            break
        try:
            image, sha = read_image(path)
            face = pipeline.enrolment_face(image)
        except (ImageError, PhotoRejected) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            result.rejected.append((path, reason))
            if on_reject is not None:
                on_reject(path, reason)
            continue
        assert face.embedding is not None
        result.paths.append(path)
        result.embeddings.append(face.embedding)
        result.hashes.append(sha)
    return result


@dataclass(frozen=True)
class Candidate:
    """A frame that passed the enrolment gates: its embedding, head pose and sharpness."""

    index: int
    embedding: np.ndarray
    pose: np.ndarray       # (yaw, pitch) proxies from the 5 landmarks, ~0 for a frontal face
    sharpness: float


def head_pose(landmarks: np.ndarray) -> np.ndarray:
    """(yaw, pitch) proxies: the nose's offset from the eyes' midpoint, in eye distances (yaw), and its
    height between the eyes and the mouth (pitch, ~0.5 frontal), so poses of one face compare."""
    left, right, nose, mouth_l, mouth_r = (landmarks[i].astype(np.float64) for i in range(5))
    eyes, mouth = (left + right) / 2, (mouth_l + mouth_r) / 2
    eye_dist = max(float(np.linalg.norm(right - left)), 1e-6)
    face_h = max(float(mouth[1] - eyes[1]), 1e-6)
    return np.array([(nose[0] - eyes[0]) / eye_dist, (nose[1] - eyes[1]) / face_h - 0.5])


def most_diverse(candidates: Sequence[Candidate], k: int) -> list[Candidate]:
    """K candidates spread over poses and appearance: the sharpest first, then each time the one
    farthest (pose + embedding distance) from those already kept (farthest-point sampling)."""
    if len(candidates) <= k:
        return list(candidates)
    kept = [max(candidates, key=lambda c: c.sharpness)]
    while len(kept) < k:
        def spread(c: Candidate) -> float:
            return min(float(np.linalg.norm(c.pose - o.pose) + np.linalg.norm(c.embedding - o.embedding))
                       for o in kept)
        kept.append(max((c for c in candidates if c not in kept), key=spread))
    return sorted(kept, key=lambda c: c.index)


def one_person(candidates: Sequence[Candidate], max_distance: float = SAME_PERSON_DISTANCE) -> list[Candidate]:
    """The candidates close to their medoid; raises EnrolmentError when a large share is not
    (two people took turns in front of the camera: enrolling both under one name lets one in)."""
    if len(candidates) < 2:
        return list(candidates)
    emb = np.stack([c.embedding for c in candidates])
    dist = np.linalg.norm(emb[:, None, :] - emb[None, :, :], axis=-1)
    medoid = int(np.argmin(dist.sum(axis=1)))
    close = [c for c, d in zip(candidates, dist[medoid]) if d < max_distance]
    if len(close) < 2 * len(candidates) / 3:
        raise EnrolmentError(f"the frames show more than one person ({len(candidates) - len(close)} of "
                             f"{len(candidates)} usable frames differ from the rest); enrol one person at a time")
    return close


def frame_candidates(pipeline: FacePipeline, frames: Iterable[np.ndarray],
                     on_frame: Callable[[int, str | None], None] | None = None) -> list[Candidate]:
    """Every frame through the photo gates (one face, size, sharpness); ON_FRAME hears each result."""
    from facedoor.pipeline import sharpness

    found = []
    for i, image in enumerate(frames):
        try:
            face = pipeline.enrolment_face(image)
        except PhotoRejected as exc:
            if on_frame is not None:
                on_frame(i, str(exc))
            continue
        assert face.embedding is not None
        found.append(Candidate(i, face.embedding, head_pose(face.landmarks), sharpness(image, face)))
        if on_frame is not None:
            on_frame(i, None)
    return found
