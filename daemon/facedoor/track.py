"""Face tracks: the same face followed across frames, its embeddings fused by quality.

Pure logic, no I/O and no clock of its own: every frame comes with its capture time (seconds
on a monotonic clock), so tests replay any timeline exactly. Rules:

- a face continues the track whose last box it overlaps most (IoU >= `iou_min`), less a quarter
  of the embedding distance to the track's last frame, so near-ties (two people crossing) go
  to the same face;
- a face of enough quality (size, sharpness and detector score at or above the floor) is a
  "good frame": its L2-normalised embedding joins the track's fused embedding with weight
  size x sharpness x score (each saturating at `full_*`), and its nearest enrolled identity
  is counted; frames below the floor only keep the track alive;
- a good frame farther than `swap_distance` from the track's fused embedding ends the track
  and starts a new one (a face swap at the door never inherits another person's evidence);
- a track unseen for more than `max_gap_s` ends; `reset()` ends all (camera or broker gap).

What the door makes of a track (its match, liveness, the decision) is the judge's (facedoor.judge).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from facedoor.config import QualityConfig, TrackingConfig


@dataclass(frozen=True)
class Sighting:
    """One face in one frame, as the tracker needs it."""

    box: np.ndarray          # (4,) x1, y1, x2, y2 in pixels
    embedding: np.ndarray    # (D,) L2-normalised
    score: float             # detector score
    sharpness: float         # `facedoor.pipeline.sharpness` of the face
    nearest: str | None      # nearest enrolled identity whatever its distance (None: empty gallery)

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels (as `Face.size`)."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = float(w * h)
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0


def quality_weight(s: Sighting, cfg: QualityConfig) -> float:
    """The fusion weight of a sighting: 0 below the quality floor, else size x sharpness x score in (0, 1]."""
    if s.size < cfg.min_face_size or s.sharpness < cfg.min_sharpness or s.score < cfg.min_detect_score:
        return 0.0
    return min(1.0, s.size / cfg.full_face_size) * min(1.0, s.sharpness / cfg.full_sharpness) * min(1.0, s.score)


@dataclass
class Track:
    """One face followed across frames: fused embedding, good-frame count, per-frame nearest votes."""

    id: int
    t_first: float
    t_last: float
    last: Sighting
    faces: int = 0           # faces in the frame that last updated the track
    frames: int = 0          # every frame that showed this face
    good: int = 0            # frames at or above the quality floor
    votes: Counter[str] = field(default_factory=Counter)  # nearest identity per good frame
    _sum: np.ndarray | None = None

    @property
    def embedding(self) -> np.ndarray | None:
        """The quality-weighted mean of the good frames' embeddings, L2-normalised; None without one."""
        if self._sum is None:
            return None
        norm = float(np.linalg.norm(self._sum))
        return (self._sum / norm).astype(np.float32) if norm > 0 else None

    def majority(self) -> tuple[str | None, int]:
        """The identity most good frames were nearest to, and how many."""
        if not self.votes:
            return None, 0
        name, count = self.votes.most_common(1)[0]
        return name, count

    def add(self, t: float, s: Sighting, weight: float, faces: int) -> None:
        """Record one frame of this face."""
        self.t_last, self.last, self.faces = t, s, faces
        self.frames += 1
        if weight <= 0:
            return
        self.good += 1
        if s.nearest is not None:
            self.votes[s.nearest] += 1
        e = np.asarray(s.embedding, dtype=np.float64) * weight
        self._sum = e if self._sum is None else self._sum + e


class Tracker:
    """Follows faces across frames; `update` returns the tracks the frame continued or started."""

    def __init__(self, cfg: TrackingConfig, quality: QualityConfig):
        self.cfg = cfg
        self.quality = quality
        self.tracks: list[Track] = []
        self._next_id = 1

    def reset(self) -> None:
        """End every track (camera or broker gap, store reload: evidence never spans it)."""
        self.tracks.clear()

    def update(self, t: float, sightings: list[Sighting]) -> list[Track]:
        """Add one processed frame (captured at T) with its faces; return their tracks, in SIGHTINGS order."""
        self.tracks = [tr for tr in self.tracks if t - tr.t_last <= self.cfg.max_gap_s]
        assigned = self._assign(sightings)
        result = []
        for i, s in enumerate(sightings):
            weight = quality_weight(s, self.quality)
            track = assigned.get(i)
            if track is not None and weight > 0 and self._swapped(track, s):
                self.tracks.remove(track)
                track = None
            if track is None:
                track = Track(self._next_id, t, t, s)
                self._next_id += 1
                self.tracks.append(track)
            track.add(t, s, weight, len(sightings))
            result.append(track)
        return result

    def _assign(self, sightings: list[Sighting]) -> dict[int, Track]:
        """Greedy matching of sightings to live tracks by IoU, embedding distance breaking near-ties."""
        pairs = []
        for i, s in enumerate(sightings):
            for track in self.tracks:
                overlap = iou(track.last.box, s.box)
                if overlap >= self.cfg.iou_min:
                    distance = float(np.linalg.norm(np.asarray(track.last.embedding) - np.asarray(s.embedding)))
                    pairs.append((overlap - 0.25 * distance, i, track))
        pairs.sort(key=lambda p: p[0], reverse=True)
        assigned: dict[int, Track] = {}
        taken: set[int] = set()
        for _, i, track in pairs:
            if i not in assigned and track.id not in taken:
                assigned[i] = track
                taken.add(track.id)
        return assigned

    def _swapped(self, track: Track, s: Sighting) -> bool:
        """True when a good frame is too far from the track's fused embedding to be the same person."""
        fused = track.embedding
        if fused is None:
            return False
        return float(np.linalg.norm(fused - np.asarray(s.embedding, dtype=np.float32))) > self.cfg.swap_distance
