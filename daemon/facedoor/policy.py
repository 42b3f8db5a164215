"""The unlock decision policy: k of the last n processed frames, a time window and cooldowns.

Pure logic, no I/O and no clock of its own: every observation carries its capture time (seconds
on a monotonic clock), so tests replay any timeline exactly. Rules:

- unlock when at least `frames_required` of the last `window_frames` processed frames, all
  captured within `window_s` of the newest, identify the same enrolled person below the
  threshold, and that person is not in cooldown; then `cooldown_s` of cooldown for that person
  (one visit, one unlock);
- an unknown face (detected, not matched) needs the same k-of-n support and yields a "deny"
  event with reason "unknown", at most one per `unknown_interval_s`; it never unlocks;
- frames without a face count as processed frames: they push older votes out of the window;
- `reset()` forgets the window (camera or broker outage: evidence never spans a gap).
"""
from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass
from typing import Literal

from facedoor.config import PolicyConfig

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
    distance: float | None     # median distance over the supporting frames
    threshold: float
    frames: int                # supporting frames used for the decision
    window: int                # frames considered
    faces: int                 # faces in the deciding frame
    t: float                   # capture time of the deciding frame


class Policy:
    """Turns a stream of per-frame observations into rare, well-supported decisions."""

    def __init__(self, cfg: PolicyConfig):
        self.cfg = cfg
        self._window: deque[Observation] = deque(maxlen=cfg.window_frames)
        self._cooldown_until: dict[str, float] = {}
        self._next_unknown = float("-inf")

    def reset(self) -> None:
        """Forget the frame window (cooldowns stay: they record unlocks that were delivered)."""
        self._window.clear()

    def in_cooldown(self, identity: str, now: float) -> bool:
        return self._cooldown_until.get(identity, float("-inf")) > now

    def retract(self, decision: Decision) -> None:
        """Undo the cooldown/rate limit of a decision that could not be delivered."""
        if decision.decision == "unlock" and decision.identity is not None:
            self._cooldown_until.pop(decision.identity, None)
        elif decision.reason == "unknown":
            self._next_unknown = float("-inf")

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
            if obs.t < self._next_unknown:
                return None
            self._next_unknown = obs.t + self.cfg.unknown_interval_s
            return Decision("deny", "unknown", None, distance, obs.threshold, count, len(recent), obs.faces, obs.t)
        if self.in_cooldown(key, obs.t):
            return None
        self._cooldown_until[key] = obs.t + self.cfg.cooldown_s
        return Decision("unlock", "match", key, distance, obs.threshold, count, len(recent), obs.faces, obs.t)

    @staticmethod
    def _vote(obs: Observation) -> str | None:
        if obs.faces == 0 or obs.distance is None:
            return None
        if obs.identity is not None and obs.distance < obs.threshold:
            return obs.identity
        return UNKNOWN
