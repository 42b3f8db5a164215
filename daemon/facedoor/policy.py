"""Unlock decisions on face tracks: fused evidence per visit, not per photo.

Pure logic, no I/O and no clock of its own: every track carries capture times (seconds on a
monotonic clock), so tests replay any timeline exactly. Rules:

- after an unlock, `cooldown_s` of cooldown for that person (one visit, one unlock);
- an unknown face yields a "deny" event with reason "unknown", at most one per
  `unknown_interval_s`; it never unlocks;
- `retract()` re-arms the cooldown or rate limit of a decision that could not be delivered.

`TrackPolicy` (see `facedoor.track`) decides on one face track:

- nothing before the track has `min_good_frames` good frames;
- unlock when the track's fused embedding is strictly below the threshold for one person AND
  the majority of its good frames were nearest to that same person AND, with a cohort stored,
  no cohort face is within `cohort_margin` of the member's distance (else a rate-limited deny
  with reason "lookalike", and the track decides nothing more) AND, with the liveness gate
  on, the track's liveness verdict is "live" (undecided: wait; "spoof": a rate-limited deny with
  reason "spoof", never an unlock) AND no unknown face is near the door (`companions: deny`:
  a deny with reason "companion"; `allow`: only counted) AND the member's second factor, if
  `second_factor` asks for one, is there (`facedoor.factors.check_second_factor`: "wait"
  decides nothing; "missing" is a rate-limited deny with reason "second_factor" saying which
  factor; the face still unlocks when the factor comes while it is in view). The decision carries the fused
  embedding and says whether it may become a door template (`door_templates` > 0 and the fused
  distance below `door_template_below`);
- unknown when the fused embedding matches nobody; fused match and per-frame majority that
  disagree decide nothing (more frames will tell).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from facedoor.config import PolicyConfig
from facedoor.factors import FactorCheck, FactorEvidence, check_second_factor
from facedoor.match import Gallery
from facedoor.track import Track


@dataclass(frozen=True)
class Decision:
    """An event to publish: an unlock for an identity, or a deny (unknown face, look-alike, spoof, companion,
    second factor missing)."""

    decision: Literal["unlock", "deny"]
    reason: Literal["match", "unknown", "lookalike", "spoof", "companion", "second_factor"]
    identity: str | None       # the matched person (also for a look-alike, spoof or companion deny)
    distance: float | None     # of the track's fused embedding to the nearest enrolled one
    threshold: float
    frames: int                # good frames nearest the identity (unknown: all good frames)
    window: int                # all the track's frames
    faces: int                 # faces in the deciding frame
    t: float                   # capture time of the deciding frame
    track: int | None = None   # the deciding face track
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)  # the track's fused embedding
    template: bool = False     # a confident unlock whose embedding may be stored as a door template
    unknown_near: int = 0      # unknown faces near the door beside the deciding one
    live_score: float | None = None  # the track's mean liveness score (None: gate off)
    second_factor: FactorCheck | None = None  # unlock: the factor that did it; second_factor deny: what was missing


class TrackPolicy:
    """Decides on face tracks: fused embedding below the threshold, backed by the per-frame majority,
    live, with no stranger beside; one unlock per visit (cooldown), rate-limited denies."""

    def __init__(self, cfg: PolicyConfig, threshold: float):
        self.cfg = cfg
        self.threshold = float(threshold)
        self._cooldown_until: dict[str, float] = {}
        self._next_deny: dict[str, float] = {}  # per deny reason

    def in_cooldown(self, identity: str, now: float) -> bool:
        """True while IDENTITY may not be unlocked again."""
        return self._cooldown_until.get(identity, float("-inf")) > now

    def retract(self, decision: Decision) -> None:
        """Undo the cooldown/rate limit of a decision that could not be delivered."""
        if decision.decision == "unlock" and decision.identity is not None:
            self._cooldown_until.pop(decision.identity, None)
        else:
            self._next_deny.pop(decision.reason, None)

    def matched(self, track: Track, gallery: Gallery | None) -> str | None:
        """The member TRACK's fused embedding is strictly below the threshold for, with enough good frames
        and no cohort face within `cohort_margin` (a look-alike counts as a stranger beside a member)."""
        fused = track.embedding
        if track.good < self.cfg.min_good_frames or fused is None or gallery is None or track.state.get("lookalike"):
            return None
        nearest = gallery.nearest(fused)
        if not nearest.distance < self.threshold or self._lookalike(gallery, fused, nearest.distance):
            return None
        return nearest.identity

    def _lookalike(self, gallery: Gallery, fused: np.ndarray, distance: float) -> bool:
        """Whether a cohort face is within `cohort_margin` of the member's DISTANCE from FUSED."""
        return gallery.cohort_distance(fused) <= distance + self.cfg.cohort_margin

    def decide(self, track: Track, gallery: Gallery | None, *, liveness: str | None = None,
               live_score: float | None = None, unknown_near: int = 0,
               factors: FactorEvidence | None = None) -> Decision | None:
        """The decision TRACK supports now against GALLERY (None: nobody matches), if any.

        LIVENESS is the track's verdict ("live", "spoof", "undecided"; None: gate off),
        UNKNOWN_NEAR the unknown faces near the door beside this one and FACTORS what the door
        heard of second factors (None: nothing)."""
        fused = track.embedding
        if track.good < self.cfg.min_good_frames or fused is None or track.state.get("lookalike"):
            return None
        nearest = gallery.nearest(fused) if gallery is not None else None
        distance = nearest.distance if nearest is not None else float("inf")
        t = track.t_last

        def deny(reason: Literal["unknown", "lookalike", "spoof", "companion", "second_factor"],
                 identity: str | None, frames: int, factor: FactorCheck | None = None) -> Decision | None:
            if t < self._next_deny.get(reason, float("-inf")):
                return None
            self._next_deny[reason] = t + self.cfg.unknown_interval_s
            return Decision("deny", reason, identity, distance, self.threshold, frames, track.frames, track.faces,
                            t, track.id, fused, False, unknown_near, live_score, factor)

        if nearest is None or nearest.identity is None or not distance < self.threshold:
            return deny("unknown", None, track.good)
        name, votes = track.majority()
        if name != nearest.identity or 2 * votes <= track.good or self.in_cooldown(name, t):
            return None
        if gallery is not None and self._lookalike(gallery, fused, distance):
            track.state["lookalike"] = True  # doubt about this face holds for the rest of its track
            return deny("lookalike", name, votes)
        if liveness == "spoof":
            return deny("spoof", name, votes)
        if liveness == "undecided":
            return None
        if unknown_near and self.cfg.companions == "deny":
            return deny("companion", name, votes)
        factor = check_second_factor(name, t, track.t_first, factors, self.cfg.second_factor)
        if factor.state == "wait":
            return None
        if factor.state == "missing":
            return deny("second_factor", name, votes, factor)
        self._cooldown_until[name] = t + self.cfg.cooldown_s
        template = self.cfg.door_templates > 0 and distance < self.cfg.door_template_below
        return Decision("unlock", "match", name, distance, self.threshold, votes, track.frames, track.faces, t,
                        track.id, fused, template, unknown_near, live_score, factor)
