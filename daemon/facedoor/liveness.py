"""Passive presentation-attack detection (liveness): MiniFASNet scores per face, evidence per track.

Two Silent-Face MiniFASNet classifiers (V2 on the face box scaled 2.7 around its centre, V1SE on
4.0; 80x80 BGR crops, values 0-255, NCHW; 3 logits, class 1 = live) each give a softmax; their
mean live probability is the face's live score in [0, 1]. The detector's box is first mapped to
the kind of box the models were trained with (`BoxCalibration`, fitted on a person-split of NUAA
by `benchmarks/liveness.py`). `TrackLiveness` keeps one face track's evidence over its frames and
turns it into a verdict: live, spoof or undecided (too few frames yet).

The models come from the hash-checked manifest (`antispoof_v2`, `antispoof_v1se`, kind
`antispoof`, exported by `facedoor-export --antispoof-dir DIR`); without them the gate is off,
and `load_liveness` says so in one log line.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from facedoor.models import Manifest, ModelError

log = logging.getLogger(__name__)

INPUT_SIZE = 80
LIVE_CLASS = 1
# Manifest entry -> the scale of the face box its network was trained on (Silent-Face file names);
# `facedoor-export` records it in the entry as `crop_scale`, which is what the gate reads.
MODEL_SCALES: dict[str, float] = {"antispoof_v2": 2.7, "antispoof_v1se": 4.0}

Verdict = Literal["live", "spoof", "undecided"]
Box = Sequence[float] | np.ndarray  # x1, y1, x2, y2 in image pixels


@dataclass(frozen=True)
class BoxCalibration:
    """How a detector box becomes the box MiniFASNet was trained on: scale around the centre, then shift.

    `scale` multiplies width and height; `shift_y` moves the centre down by that fraction of the
    (scaled) box height. The identity is right for both MTCNN and YuNet boxes: on the NUAA
    calibration people no scale or shift tried cut the log-loss by 10 % (`benchmarks/liveness.py`).
    """

    scale: float = 1.0
    shift_y: float = 0.0

    def apply(self, box: Box) -> np.ndarray:
        """The calibrated (x1, y1, x2, y2) float box."""
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        w, h = (x2 - x1) * self.scale, (y2 - y1) * self.scale
        cy += self.shift_y * h
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float64)


def crop_box(box: Box, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The (x1, y1, x2, y2) integer region of a WIDTH x HEIGHT image that a model of crop SCALE sees.

    Silent-Face geometry: the box grows by SCALE around its centre, SCALE shrunk so the region fits
    the image ((size - 1) / box side), and a region crossing a border is shifted back inside whole,
    never cut, so the face keeps its place relative to the context the model was trained on.
    """
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    box_w, box_h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    scale = min((height - 1) / box_h, (width - 1) / box_w, scale)
    new_w, new_h = box_w * scale, box_h * scale
    cx, cy = x1 + box_w / 2, y1 + box_h / 2
    left, top, right, bottom = cx - new_w / 2, cy - new_h / 2, cx + new_w / 2, cy + new_h / 2
    if left < 0:
        left, right = 0.0, right - left
    if top < 0:
        top, bottom = 0.0, bottom - top
    if right > width:
        left, right = left - (right - width), float(width)
    if bottom > height:
        top, bottom = top - (bottom - height), float(height)
    return int(left), int(top), int(right), int(bottom)


def crop_input(image_bgr: np.ndarray, box: Box, scale: float) -> np.ndarray:
    """The (1, 3, 80, 80) float32 BGR 0-255 NCHW input for a model of crop SCALE at BOX."""
    h, w = image_bgr.shape[:2]
    x1, y1, x2, y2 = crop_box(box, scale, w, h)
    patch = image_bgr[y1:y2, x1:x2]
    patch = cv2.resize(patch, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(patch.transpose(2, 0, 1)[None], dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class LivenessModel:
    """Both MiniFASNet sessions: `score(image, box)` is the mean live probability of the two."""

    def __init__(self, sessions: Sequence[tuple[str, Any, float]], calibration: BoxCalibration | None = None):
        self.sessions = [(name, session, scale, session.get_inputs()[0].name) for name, session, scale in sessions]
        self.calibration = calibration or BoxCalibration()

    @classmethod
    def from_manifest(cls, manifest: Manifest, threads: int | None = 1) -> LivenessModel:
        """Open both models after their hash check, at the crop scale their manifest entry records."""
        sessions = []
        for name in MODEL_SCALES:
            entry = manifest.entry(name)
            scale = entry.extra("crop_scale")
            if entry.kind != "antispoof" or not isinstance(scale, (int, float)) or scale <= 0:
                raise ModelError(f"model {name!r}: kind {entry.kind!r}, crop_scale {scale!r}; expected an "
                                 "antispoof entry with a crop_scale (re-run facedoor-export --only antispoof)")
            sessions.append((name, manifest.session(name, threads), float(scale)))
        return cls(sessions)

    def probabilities(self, image_bgr: np.ndarray, box: Box) -> np.ndarray:
        """(models, 3) softmax of each model for the face at detector BOX."""
        calibrated = self.calibration.apply(box)
        probs = []
        for _, session, scale, input_name in self.sessions:
            logits = session.run(None, {input_name: crop_input(image_bgr, calibrated, scale)})[0]
            probs.append(_softmax(np.asarray(logits, dtype=np.float64).reshape(-1)))
        return np.stack(probs)

    def score(self, image_bgr: np.ndarray, box: Box) -> float:
        """Live score in [0, 1] of the face at detector BOX (x1, y1, x2, y2 pixels) of IMAGE_BGR."""
        return float(self.probabilities(image_bgr, box)[:, LIVE_CLASS].mean())


def load_liveness(manifest: Manifest, enabled: bool = True, threads: int | None = 1) -> LivenessModel | None:
    """The gate, or None (logged once, plainly) when disabled or its models are not in the manifest.

    A model that is listed but missing, tampered with or unloadable is a ModelError, as for every model."""
    if not enabled:
        log.warning("liveness gate off: liveness.enabled is false; printed photos and screens are NOT rejected")
        return None
    missing = [name for name in MODEL_SCALES if name not in manifest.entries]
    if missing:
        log.warning("liveness gate off: %s not in %s (export them with `facedoor-export --out %s --only antispoof "
                    "--antispoof-dir DIR`); printed photos and screens are NOT rejected",
                    ", ".join(missing), manifest.directory / "manifest.json", manifest.directory)
        return None
    started = time.monotonic()
    model = LivenessModel.from_manifest(manifest, threads)
    log.info("liveness gate on: %s loaded in %.2f s", ", ".join(MODEL_SCALES), time.monotonic() - started)
    return model


@dataclass(frozen=True)
class LivenessState:
    """A track's liveness verdict and the evidence behind it (for the decision, logs and audit)."""

    verdict: Verdict
    score: float | None  # mean live score over the track's frames, None before any frame
    frames: int


@dataclass
class TrackLiveness:
    """Liveness evidence of one face track: feed each good frame's live score, read the verdict.

    The verdict is "undecided" until MIN_FRAMES scores are in, then "live" when their mean is at
    least THRESHOLD, else "spoof". Only the last WINDOW scores count, so a track that starts on a
    photo and turns to a real face (or back) follows what the camera shows now.
    """

    threshold: float
    min_frames: int
    window: int = 30
    scores: list[float] = field(default_factory=list)

    def add(self, score: float) -> LivenessState:
        """Record one frame's live score and return the updated state."""
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"live score {score!r} outside [0, 1]")
        self.scores.append(float(score))
        del self.scores[:-self.window]
        return self.state

    @property
    def state(self) -> LivenessState:
        """The verdict from the scores so far."""
        if not self.scores:
            return LivenessState("undecided", None, 0)
        mean = float(np.mean(self.scores))
        if len(self.scores) < self.min_frames:
            return LivenessState("undecided", mean, len(self.scores))
        return LivenessState("live" if mean >= self.threshold else "spoof", mean, len(self.scores))
