"""Presentation-attack detection (liveness): per-frame cues from the models, evidence and a verdict per track.

Per frame, `LivenessModel.observe(image, face, turn)` runs the models and returns `Cues` (no decision):
- the passive score: one of two Silent-Face MiniFASNet classifiers (V2 on the face box scaled 2.7
  around its centre, V1SE on 4.0; 80x80 BGR crops, 0-255, NCHW; class 1 = live), its live
  probability in [0, 1]; texture only, which does not carry to new print and screen media;
- the face mesh and the iris landmarks of one eye (facedoor.landmarks): cues that do not depend on texture.
The track's TURN (its frame count) picks the MiniFASNet and the eye, alternating: each frame costs
one of each, not both, and over a track's frames the mean passive score is still both models' and
the gaze spread both eyes' (with the exporter's PRelu rewrite, `benchmarks/liveness.py
--timing-only`: 25 -> 10 ms a face on one core).

Per track, `TrackLiveness.add(cues)` keeps the evidence of the last `window` frames; its `state`
comes from pure functions: `track_features` (passive logit, blink depth from the eye aspect ratio,
iris movement, non-planar motion: the homography residual of the 468 mesh points between frames
`LAG` apart, the head rotation and the face's global motion between them) and `judge` (a noisy
AND, `FusionRule`: the texture part and a logistic motion part must both pass, fitted by
`benchmarks/liveness.py`, plus two hard rules: a track whose points fit one plane or stand still
is never live, whatever the rest says). `facedoor.judge` keeps one TrackLiveness per member track.

The models come from the hash-checked manifest (antispoof: `facedoor-export --only antispoof
--antispoof-dir DIR`; landmarks: `--only landmarks`). `liveness.enabled` is auto (on when all are
exported, else off with one log line), true (the door refuses to start without them) or false.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facedoor.landmarks import MODELS as LANDMARK_MODELS
from facedoor.landmarks import (
    FaceMesh,
    Mesh,
    Pose,
    eye_aspect_ratio,
    global_motion,
    head_pose,
    homography_residual,
    iris_offset,
    rotation_deg,
)
from facedoor.models import Manifest, ModelError

log = logging.getLogger(__name__)

INPUT_SIZE = 80
LIVE_CLASS = 1
# Manifest entry -> the scale of the face box its network was trained on (Silent-Face file names);
# `facedoor-export` records it in the entry as `crop_scale`, which is what the gate reads.
MODEL_SCALES: dict[str, float] = {"antispoof_v2": 2.7, "antispoof_v1se": 4.0}

Verdict = Literal["live", "spoof", "undecided"]
Box = Sequence[float] | np.ndarray  # x1, y1, x2, y2 in image pixels


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
    import cv2  # not at import time: `facedoor list` reads the gate's state without OpenCV

    h, w = image_bgr.shape[:2]
    x1, y1, x2, y2 = crop_box(box, scale, w, h)
    patch = image_bgr[y1:y2, x1:x2]
    patch = cv2.resize(patch, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(patch.transpose(2, 0, 1)[None], dtype=np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Cues:
    """What the models saw of one face in one frame: the passive live score and the landmarks (None: no mesh)."""

    passive: float
    mesh: Mesh | None


class LivenessModel:
    """The gate's models: both MiniFASNet sessions and the face mesh; `observe` runs one frame's share on one face."""

    def __init__(self, sessions: Sequence[tuple[str, Any, float]], mesh: FaceMesh | None = None):
        self.sessions = [(name, session, scale, session.get_inputs()[0].name) for name, session, scale in sessions]
        self.mesh = mesh

    @classmethod
    def from_manifest(cls, manifest: Manifest, threads: int | None = 1) -> LivenessModel:
        """Open every model after its hash check, the MiniFASNets at the crop scale their entry records."""
        sessions = []
        for name in MODEL_SCALES:
            entry = manifest.entry(name)
            scale = entry.extra("crop_scale")
            if entry.kind != "antispoof" or not isinstance(scale, (int, float)) or scale <= 0:
                raise ModelError(f"model {name!r}: kind {entry.kind!r}, crop_scale {scale!r}; expected an "
                                 "antispoof entry with a crop_scale (re-run facedoor-export --only antispoof)")
            sessions.append((name, manifest.session(name, threads, layout_optimization=True), float(scale)))
        return cls(sessions, mesh=FaceMesh.from_manifest(manifest, threads))

    def live_probability(self, image_bgr: np.ndarray, box: Box, model: int) -> float:
        """The live probability in [0, 1] that MiniFASNet number MODEL (`MODEL_SCALES` order) gives the face at
        detector BOX (x1, y1, x2, y2 pixels) of IMAGE_BGR."""
        _, session, scale, input_name = self.sessions[model]
        logits = session.run(None, {input_name: crop_input(image_bgr, box, scale)})[0]
        return float(_softmax(np.asarray(logits, dtype=np.float64).reshape(-1))[LIVE_CLASS])

    def observe(self, image_bgr: np.ndarray, face: Any, turn: int = 0) -> Cues:
        """The cues of FACE (a detector face: `.box`, `.landmarks` with the eyes first) in IMAGE_BGR at its
        track's TURN: the mesh, MiniFASNet and iris `turn % 2` (see the module doc)."""
        eye = turn % 2
        mesh = self.mesh.mesh(image_bgr, face.box, face.landmarks[:2], (eye,)) if self.mesh is not None else None
        return Cues(self.live_probability(image_bgr, face.box, turn % len(self.sessions)), mesh)


REQUIRED_MODELS = (*MODEL_SCALES, *LANDMARK_MODELS)


class LivenessUnavailable(ModelError):
    """liveness.enabled is true but the gate's models are not exported: the door must not start."""


def load_liveness(manifest: Manifest, enabled: bool | str = "auto", threads: int | None = 1,
                  required: str | None = None) -> LivenessModel | None:
    """The gate, or None (logged once, plainly) when off.

    ENABLED "auto": on when every model is in the manifest, else off with a log line; True: the
    models must be there (LivenessUnavailable otherwise: the door refuses to start); False: off.
    REQUIRED: why the models must be there whatever ENABLED says (`LivenessConfig.required`, e.g.
    the challenge is on). A model that is listed but missing, tampered with or unloadable is a
    ModelError, as for every model."""
    required = required or ("liveness.enabled is true" if enabled is True else None)
    if enabled is False and required is None:
        log.warning("liveness gate off: liveness.enabled is false; printed photos and screens are NOT rejected")
        return None
    missing = [name for name in REQUIRED_MODELS if name not in manifest.entries]
    if missing:
        hint = (f"{', '.join(missing)} not in {manifest.directory / 'manifest.json'} (export them with "
                f"`facedoor-export --out {manifest.directory} --only antispoof,landmarks --antispoof-dir DIR`)")
        if required is not None:
            raise LivenessUnavailable(f"{required} but {hint}")
        log.warning("liveness gate off: %s; printed photos and screens are NOT rejected", hint)
        return None
    started = time.monotonic()
    model = LivenessModel.from_manifest(manifest, threads)
    log.info("liveness gate on: %s loaded in %.2f s", ", ".join(REQUIRED_MODELS), time.monotonic() - started)
    return model


def gate_status(models: Path, enabled: bool | str = "auto", required: str | None = None, challenge: str = "off") -> str:
    """One line for `facedoor list`: whether the door's gate runs ("liveness: on|off ...") and why, and
    the active challenge when it is on (`liveness.challenge`), from the config and manifest.json only
    (no model is opened, OpenCV is not loaded)."""
    required = required or ("liveness.enabled is true" if enabled is True else None)
    if enabled is False and required is None:
        return "liveness: off (liveness.enabled is false): printed photos and screens are NOT rejected"
    try:
        listed = Manifest.load(models).entries
    except ModelError as exc:
        return f"liveness: off ({exc})"
    missing = [name for name in REQUIRED_MODELS if name not in listed]
    if not missing:
        return "liveness: on" + (f", challenge {challenge}" if challenge != "off" else "")
    if required is not None:
        return f"liveness: the door refuses to start ({required}; {', '.join(missing)} not exported)"
    return f"liveness: off ({', '.join(missing)} not exported): printed photos and screens are NOT rejected"


# --- per track: evidence and verdict --------------------------------------------------------------

FEATURES = ("passive", "blink", "gaze", "nonplanar", "pose", "motion")
MOTION_FEATURES = FEATURES[1:]
LAG = 6  # frames between the two views compared for planarity, head rotation and motion
SMOOTH = 3  # frames averaged at each end of the motion measurement


@dataclass(frozen=True)
class FusionRule:
    """The per-track rule, a noisy AND of two parts and two hard rules (all fitted or chosen by
    `benchmarks/liveness.py` on its training sources; see README "Photos and screens"):

    - texture: the track's mean MiniFASNet live score reaches `passive_threshold`;
    - motion: a logistic rule over `MOTION_FEATURES` (`weights`, `bias`) reaches `motion_threshold`:
      the face blinks, looks around, turns as a head (its points leave one homography);
    - never live while the points fit one plane (non-planar residual below `planar_floor` eye
      distances) or stand still (global motion below `static_floor`).

    Motion cannot stop a replay of a live video (the replayed face blinks and turns), and texture
    does not carry to new media: each part vetoes, neither is enough alone."""

    weights: tuple[float, ...]
    bias: float
    motion_threshold: float
    passive_threshold: float
    planar_floor: float = 0.004
    static_floor: float = 0.05
    min_frames: int = LAG + SMOOTH + 1
    patience_frames: int = 45

    def hard_no(self, features: np.ndarray) -> bool:
        """True when the hard rules forbid live whatever the parts say: the points fit one plane or stand still."""
        return bool(features[FEATURES.index("nonplanar")] < self.planar_floor
                    or features[FEATURES.index("motion")] < self.static_floor)

    def motion_probability(self, features: np.ndarray) -> float:
        """The motion part's live probability for one track's feature vector (`FEATURES` order)."""
        z = float(np.dot(self.weights, features[1:]) + self.bias)
        return float(1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0))))


# `benchmarks/liveness.py --fit-all` on every source (NUAA, both replay-video people, injected stills);
# its leave-one-source-out table in the README says how such a rule does on a source it never saw.
DEFAULT_RULE = FusionRule(weights=(-3.5233, 99.9704, 95.9847, 0.3908, -0.5101), bias=-3.9322,
                          motion_threshold=0.547, passive_threshold=0.340)


def configured_rule(threshold: float | None = None, min_frames: int | None = None) -> FusionRule:
    """DEFAULT_RULE with the operator's `liveness.threshold` (the texture part's) / `liveness.min_frames`."""
    rule = DEFAULT_RULE
    if threshold is not None:
        rule = replace(rule, passive_threshold=threshold)
    if min_frames is not None:
        rule = replace(rule, min_frames=min_frames, patience_frames=max(rule.patience_frames, min_frames))
    return rule


@dataclass(frozen=True)
class FrameEvidence:
    """One frame's cues reduced to what the verdict needs (a few floats; the mesh is not kept)."""

    passive: float
    ear: float | None = None  # eye aspect ratio
    gaze: np.ndarray | None = None  # (2, 2) iris offsets in eye widths
    nonplanar: float | None = None  # homography residual against the frame LAG before, in eye distances
    rotation: float | None = None  # head rotation (degrees) against the frame LAG before
    motion: float | None = None  # the face's shift and scale change against the frame LAG before (eye distances)
    pose: Pose | None = None  # the head's yaw and pitch (for the active challenge, facedoor.challenge)


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


def _p90(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(np.percentile(present, 90)) if present else 0.0


def track_features(frames: Sequence[FrameEvidence]) -> np.ndarray:
    """The feature vector (`FEATURES` order) of a track's frames: pure, for the judge and the benchmark.

    passive: logit of the mean passive score; blink: 1 - min / median of the eye aspect ratio (a
    blink dips it by half); gaze: the spread of the iris offsets (eye widths, each eye over the frames
    that read it, then averaged); nonplanar, pose and
    motion: the 90th percentiles of the homography residuals (eye distances), head rotations
    (degrees) and global motions (`global_motion`) between frames LAG apart."""
    passive = _logit(float(np.mean([f.passive for f in frames]))) if frames else 0.0
    ears = np.array([f.ear for f in frames if f.ear is not None])
    blink = float(1 - ears.min() / max(float(np.median(ears)), 1e-6)) if len(ears) >= 3 else 0.0
    gazes = np.array([f.gaze for f in frames if f.gaze is not None]).reshape(-1, 2, 2)  # NaN: eye not read
    read = np.sum(~np.isnan(gazes[:, :, 0]), axis=0)
    spreads = [float(np.mean(np.nanstd(gazes[:, eye], axis=0))) for eye in range(2) if read[eye] >= 2]
    gaze = float(np.mean(spreads)) if len(gazes) >= 3 and spreads else 0.0
    return np.array([passive, blink, gaze, _p90([f.nonplanar for f in frames]), _p90([f.rotation for f in frames]),
                     _p90([f.motion for f in frames])])


def judge(frames: Sequence[FrameEvidence], rule: FusionRule) -> tuple[Verdict, float | None]:
    """A track's verdict and live score (the lower of the texture and motion parts) from its frames:
    pure (no models, no clock).

    Undecided before `min_frames`; never live while the points fit one plane or stand still; live
    when both parts reach their thresholds; spoof when they have not after `patience_frames` (until
    then undecided: a member who has not moved yet is not turned away)."""
    if not frames:
        return "undecided", None
    features = track_features(frames)
    passive = float(np.mean([f.passive for f in frames]))
    motion = rule.motion_probability(features)
    score = min(passive, motion)
    if len(frames) < rule.min_frames:
        return "undecided", score
    if passive >= rule.passive_threshold and motion >= rule.motion_threshold and not rule.hard_no(features):
        return "live", score
    return ("spoof" if len(frames) >= rule.patience_frames else "undecided"), score


@dataclass(frozen=True)
class LivenessState:
    """A track's liveness verdict and the evidence behind it (for the decision, logs and audit)."""

    verdict: Verdict
    score: float | None  # the lower of the texture and motion parts (0-1), None before any frame
    frames: int


@dataclass
class TrackLiveness:
    """Liveness evidence of one face track: `add` each frame's cues, read `state` (from `judge`).

    Only the last WINDOW frames count, so a track that starts on a photo and turns to a real face
    (or back) follows what the camera shows now; the landmarks of the last LAG frames are kept to
    compare each new frame with the one LAG before."""

    rule: FusionRule = DEFAULT_RULE
    window: int = 60
    frames: list[FrameEvidence] = field(default_factory=list)
    recent: list[Mesh | None] = field(default_factory=list)
    turn: int = 0  # frames added so far: the next frame's `LivenessModel.observe` turn

    def add(self, cues: Cues) -> LivenessState:
        """Record one frame's cues and return the updated state."""
        if not 0.0 <= cues.passive <= 1.0:
            raise ValueError(f"live score {cues.passive!r} outside [0, 1]")
        self.turn += 1
        self.frames.append(self.evidence(cues))
        del self.frames[:-self.window]
        return self.state

    def evidence(self, cues: Cues) -> FrameEvidence:
        """CUES reduced to a FrameEvidence, comparing its mesh with the one LAG frames before."""
        self.recent.append(cues.mesh)
        del self.recent[:-(LAG + SMOOTH)]
        mesh = cues.mesh
        if mesh is None:
            return FrameEvidence(cues.passive)
        before = self.recent[-1 - LAG] if len(self.recent) > LAG else None
        nonplanar = rotation = motion = None
        if before is not None:
            scale = max(mesh.eye_distance, 1.0)
            nonplanar = homography_residual(before.points[:, :2], mesh.points[:, :2]) / scale
            rotation = rotation_deg(before.points, mesh.points)
            if len(self.recent) == LAG + SMOOTH and all(m is not None for m in self.recent):
                # SMOOTH frames averaged at each end: the landmark model's jitter cancels, real motion stays
                now = np.mean([m.points[:, :2] for m in self.recent[-SMOOTH:] if m is not None], axis=0)
                then = np.mean([m.points[:, :2] for m in self.recent[:SMOOTH] if m is not None], axis=0)
                motion = global_motion(then, now) / scale
        gaze = iris_offset(mesh.points, mesh.irises) if mesh.irises is not None else None
        return FrameEvidence(cues.passive, eye_aspect_ratio(mesh.points), gaze, nonplanar, rotation, motion,
                             head_pose(mesh.points))

    @property
    def state(self) -> LivenessState:
        """The verdict from the frames so far."""
        verdict, score = judge(self.frames, self.rule)
        return LivenessState(verdict, score, len(self.frames))
