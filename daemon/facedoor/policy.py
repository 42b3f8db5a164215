"""Unlock decisions: on face tracks (fused evidence per visit), or k of the last n frames.

Pure logic, no I/O and no clock of its own: every observation and track carries capture times
(seconds on a monotonic clock), so tests replay any timeline exactly. Both policies share:

- after an unlock, `cooldown_s` of cooldown for that person (one visit, one unlock);
- an unknown face yields a "deny" event with reason "unknown", at most one per
  `unknown_interval_s`; it never unlocks;
- `retract()` re-arms the cooldown or rate limit of a decision that could not be delivered.

`TrackPolicy` (see `facedoor.track`) decides on one face track:

- nothing before the track has `min_good_frames` good frames;
- unlock when the track's fused embedding is strictly below the threshold for one person AND
  the majority of its good frames were nearest to that same person; the decision carries the
  fused embedding and says whether it may become a door template (`door_templates` > 0 and
  the fused distance below `door_template_below`);
- unknown when the fused embedding matches nobody; fused match and per-frame majority that
  disagree decide nothing (more frames will tell).

`Policy` is the older per-frame vote: unlock when at least `frames_required` of the last
`window_frames` processed frames, all captured within `window_s` of the newest, identify the
same enrolled person below the threshold; an unknown face needs the same support; frames without
a face push older votes out of the window; `reset()` forgets the window (evidence never spans a
camera or broker gap).
"""
from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from facedoor.config import PolicyConfig
from facedoor.match import Gallery
from facedoor.track import Track

UNKNOWN = "\0unknown"  # vote key of a detected face that matched nobody (not a valid name)


@dataclass(frozen=True)
class Observation:
    """What one processed frame showed: the largest face's best match, or no face."""

    t: float                   # capture time, monotonic seconds
    faces: int                 # faces detected in the frame
    identity: str | None       # matched identity (distance < threshold), None when unknown/no face
    distance: float | None     # distance to the nearest enrolled embedding, None without a face
    threshold: float


@dataclass(frozen=True)
class Decision:
    """An event to publish: an unlock for an identity, or a deny for an unknown face."""

    decision: Literal["unlock", "deny"]
    reason: Literal["match", "unknown"]
    identity: str | None
    distance: float | None     # k of n: median over the supporting frames; track: of the fused embedding
    threshold: float
    frames: int                # supporting frames (k of n: votes; track: good frames nearest the identity)
    window: int                # frames considered (k of n: the window; track: all its frames)
    faces: int                 # faces in the deciding frame
    t: float                   # capture time of the deciding frame
    track: int | None = None   # the deciding face track (TrackPolicy)
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)  # the track's fused embedding
    template: bool = False     # a confident unlock whose embedding may be stored as a door template


class _Limits:
    """Per-person cooldown after an unlock and the rate limit of unknown events."""

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self._cooldown_until: dict[str, float] = {}
        self._next_unknown = float("-inf")

    def in_cooldown(self, identity: str, now: float) -> bool:
        """True while IDENTITY may not be unlocked again."""
        return self._cooldown_until.get(identity, float("-inf")) > now

    def retract(self, decision: Decision) -> None:
        """Undo the cooldown/rate limit of a decision that could not be delivered."""
        if decision.decision == "unlock" and decision.identity is not None:
            self._cooldown_until.pop(decision.identity, None)
        elif decision.reason == "unknown":
            self._next_unknown = float("-inf")

    def _allow_unlock(self, identity: str, t: float) -> bool:
        """Start IDENTITY's cooldown at T and return True, unless it is in cooldown."""
        if self.in_cooldown(identity, t):
            return False
        self._cooldown_until[identity] = t + self.cfg.cooldown_s
        return True

    def _allow_unknown(self, t: float) -> bool:
        """Start the unknown rate limit at T and return True, unless it is running."""
        if t < self._next_unknown:
            return False
        self._next_unknown = t + self.cfg.unknown_interval_s
        return True


class TrackPolicy(_Limits):
    """Decides on face tracks: fused embedding below the threshold, backed by the per-frame majority."""

    def __init__(self, cfg: PolicyConfig, threshold: float):
        super().__init__(cfg)
        self.threshold = float(threshold)

    def decide(self, track: Track, gallery: Gallery | None) -> Decision | None:
        """The decision TRACK supports now against GALLERY (None: nobody matches), if any."""
        fused = track.embedding
        if track.good < self.cfg.min_good_frames or fused is None:
            return None
        nearest = gallery.nearest(fused) if gallery is not None else None
        distance = nearest.distance if nearest is not None else float("inf")
        t = track.t_last
        if nearest is None or nearest.identity is None or not distance < self.threshold:
            if not self._allow_unknown(t):
                return None
            return Decision("deny", "unknown", None, distance, self.threshold, track.good, track.frames,
                            track.faces, t, track.id, fused)
        name, votes = track.majority()
        if name != nearest.identity or 2 * votes <= track.good or not self._allow_unlock(name, t):
            return None
        template = self.cfg.door_templates > 0 and distance < self.cfg.door_template_below
        return Decision("unlock", "match", name, distance, self.threshold, votes, track.frames, track.faces, t,
                        track.id, fused, template)


class Policy(_Limits):
    """Turns a stream of per-frame observations into rare, well-supported decisions (k of n)."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__(cfg)
        self._window: deque[Observation] = deque(maxlen=cfg.window_frames)

    def reset(self) -> None:
        """Forget the frame window (cooldowns stay: they record unlocks that were delivered)."""
        self._window.clear()

    def observe(self, obs: Observation) -> Decision | None:
        """Add one processed frame; return the decision it completes, if any."""
        self._window.append(obs)
        recent = [o for o in self._window if obs.t - o.t <= self.cfg.window_s]
        votes = Counter(key for o in recent if (key := self._vote(o)) is not None)
        for key, count in votes.most_common():
            if count < self.cfg.frames_required:
                break
            decision = self._decide(key, count, recent, obs)
            if decision is not None:
                self._window.clear()
                return decision
        return None

    def _decide(self, key: str, count: int, recent: list[Observation], obs: Observation) -> Decision | None:
        """The decision for KEY's k-of-n support, or None while rate-limited or in cooldown."""
        distances = [o.distance for o in recent if self._vote(o) == key and o.distance is not None]
        distance = statistics.median(distances)
        if key == UNKNOWN:
            if not self._allow_unknown(obs.t):
                return None
            return Decision("deny", "unknown", None, distance, obs.threshold, count, len(recent), obs.faces, obs.t)
        if not self._allow_unlock(key, obs.t):
            return None
        return Decision("unlock", "match", key, distance, obs.threshold, count, len(recent), obs.faces, obs.t)

    @staticmethod
    def _vote(obs: Observation) -> str | None:
        if obs.faces == 0 or obs.distance is None:
            return None
        if obs.identity is not None and obs.distance < obs.threshold:
            return obs.identity
        return UNKNOWN
