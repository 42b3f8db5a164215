"""The judge: every per-frame rule of the door in one pure function.

    judge(frame sightings, judge state, gallery snapshot, rules) -> verdicts + decisions

No I/O, no clock, no MQTT: each frame comes with its capture time (seconds on a monotonic clock),
so the door (`facedoor.service`), the benchmarks (`benchmarks/visits.py`, `benchmarks/liveness.py`)
and the tests replay any timeline through the same code and reach the same decisions. The state
(`JudgeState`: the face tracker, cooldowns, deny rate limits, per-track memory) is changed in place;
a failed delivery re-arms it through `JudgeState.retract` (a listener of the decision event).

The rules of one frame, in order:

1. Faces near the door are those at least `policy.near_ratio` of the largest face's size; only
   they decide. Every face in view is counted in the decision's `faces`.
2. Each encoded face joins its track (`facedoor.track`); each frame votes for its nearest member.
3. For every track with `policy.min_good_frames` good frames the fused embedding is matched ONCE
   (`Gallery.nearest`) into a `TrackVerdict`: its member when strictly below the threshold with no
   cohort face within `policy.cohort_margin` (else a look-alike), the majority of its frames, and,
   with the liveness gate on, the track's liveness evidence (scored only on member tracks).
4. Companions: a face near the door that is not a member counts against every other one: an
   unencoded face, a stranger's or look-alike's track, and a stranger's track this frame missed
   that is still alive (`tracking.max_gap_s`).
5. Each near track's decision: unknown (a rate-limited deny), look-alike (deny; the track decides
   nothing more), a majority that disagrees or a cooldown (nothing yet), spoof (deny), the active
   challenge with `liveness.challenge` (`facedoor.challenge`: asked once, an `Ask` in the judgement
   drawn from `JudgeState.picks`; pending decides nothing yet, wrong or timeout is a deny with reason
   challenge), liveness undecided (nothing yet), a companion (deny with `policy.companions: deny`), the member's second
   factor (`facedoor.factors.check_second_factor` on what the door heard: "wait" decides nothing
   yet, "missing" is a deny with reason second_factor), else unlock (then `policy.cooldown_s` for
   that person). A new rule is one more step here, with its test in
   tests/test_judge.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from facedoor.challenge import Answer, Ask, Outcome, TrackChallenge, draw, secure_picks
from facedoor.config import FacedoorConfig, LivenessConfig, PolicyConfig, QualityConfig, TrackingConfig
from facedoor.factors import FactorCheck, FactorEvidence, check_second_factor
from facedoor.landmarks import Pose
from facedoor.liveness import Cues, LivenessState, TrackLiveness, Verdict, configured_rule
from facedoor.match import Gallery
from facedoor.track import Sighting, Track, Tracker

DenyReason = Literal["unknown", "lookalike", "spoof", "companion", "second_factor", "challenge"]
# (face index in the frame, its track's turn) -> its liveness cues (evaluated only when needed)
LiveEvidence = Callable[[int, int], Cues]


@dataclass(frozen=True)
class Seen:
    """One face in one frame as the pipeline saw it; `embedding` is None for a face left unencoded."""

    box: np.ndarray               # (4,) x1, y1, x2, y2 in pixels
    score: float                  # detector score
    sharpness: float              # `facedoor.pipeline.sharpness` of the face
    embedding: np.ndarray | None  # (D,) L2-normalised, None when the encoder bound left it out

    @property
    def size(self) -> float:
        """The shorter side of the box in pixels."""
        return float(min(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@dataclass(frozen=True)
class FrameSightings:
    """Every face of one frame (captured at T), its liveness evidence when the gate is on, and what the
    door heard of second factors by then (None: nothing)."""

    t: float
    faces: Sequence[Seen]
    live: LiveEvidence | None = None
    factors: FactorEvidence | None = None


@dataclass(frozen=True)
class Rules:
    """What the judge needs of the configuration: one threshold, the policy, tracking, quality and the gate."""

    threshold: float
    policy: PolicyConfig
    tracking: TrackingConfig
    quality: QualityConfig
    liveness: LivenessConfig
    liveness_on: bool

    @classmethod
    def from_config(cls, cfg: FacedoorConfig, liveness_on: bool) -> Rules:
        """The rules of CFG; LIVENESS_ON says whether the gate's models are loaded."""
        return cls(cfg.recognition.threshold, cfg.policy, cfg.tracking, cfg.quality, cfg.liveness, liveness_on)


@dataclass(frozen=True)
class Decision:
    """An event to publish: an unlock for an identity, or a deny (unknown face, look-alike, spoof, companion,
    second factor missing, challenge failed)."""

    decision: Literal["unlock", "deny"]
    reason: Literal["match", "unknown", "lookalike", "spoof", "companion", "second_factor", "challenge"]
    identity: str | None       # the matched person (also for a look-alike, spoof or companion deny)
    distance: float            # of the track's fused embedding to the nearest enrolled one (inf: nobody)
    threshold: float
    frames: int                # good frames nearest the identity (unknown: all good frames)
    window: int                # all the track's frames
    faces: int                 # every face in view in the deciding frame
    t: float                   # capture time of the deciding frame
    track: int                 # the deciding face track
    face: int                  # index of the deciding face in the frame's sightings
    embedding: np.ndarray = field(compare=False, repr=False)  # the track's fused embedding
    unknown_near: int = 0      # faces near the door beside the deciding one that match no member
    companions: tuple[int, ...] = ()  # indexes of those faces in the frame (a missed track has none)
    live_score: float | None = None   # the track's liveness score (None: gate off or no evidence)
    liveness: Literal["on", "off"] = "off"  # whether the liveness gate ran
    template: bool = False     # a confident unlock whose embedding may be stored as a door template
    second_factor: FactorCheck | None = None  # unlock: the factor that did it; second_factor deny: what was missing
    challenge: Outcome | None = None  # the track's active challenge (None: none asked)


@dataclass(frozen=True)
class TrackVerdict:
    """What one frame made of one face track: its match, computed once, and the evidence beside it."""

    track: int
    face: int                  # index of its face in the frame's sightings
    near: bool                 # near the door: it decides and counts as a companion
    good: int                  # good frames so far
    nearest: str | None        # nearest member of the fused embedding (None: undecidable or nobody enrolled)
    distance: float            # to that member (inf when undecidable)
    majority: tuple[str | None, int]  # the member most good frames were nearest to, and how many
    cohort_gap: float          # nearest cohort face's distance minus `distance` (inf without a cohort)
    lookalike: bool            # a cohort face within `cohort_margin`: never this member
    member: str | None         # the member it matches: enough frames, below the threshold, not a look-alike
    liveness: LivenessState | None  # None: the gate is off (or the track matches nobody yet)
    pose: Pose | None = None        # the head's pose this frame, from the gate's mesh (None: no mesh)


@dataclass
class _Memory:
    """What the judge remembers of one track between frames."""

    lookalike: bool = False              # doubt about this face holds for the rest of its track
    member: str | None = None            # its member at its last verdict (for frames that miss it)
    liveness: TrackLiveness | None = None
    challenge: TrackChallenge | None = None  # asked once per track


@dataclass(frozen=True)
class Judgement:
    """One frame's verdicts (one per encoded face), the decisions to deliver and the challenges to ask."""

    verdicts: tuple[TrackVerdict, ...]
    decisions: tuple[Decision, ...]
    asks: tuple[Ask, ...] = ()


class JudgeState:
    """The judge's memory across frames: face tracks, cooldowns, deny rate limits, per-track verdicts, and
    PICKS, the random numbers challenges are drawn from (`secrets` unless a test injects its own)."""

    def __init__(self, tracking: TrackingConfig, quality: QualityConfig, picks: Iterator[int] | None = None):
        self.tracker = Tracker(tracking, quality)
        self.picks = picks if picks is not None else secure_picks()
        self.cooldown_until: dict[str, float] = {}
        self.next_deny: dict[str, float] = {}
        self.memory: dict[int, _Memory] = {}

    def reset(self) -> None:
        """Forget every face track (camera or broker gap, store change, error): evidence never spans one."""
        self.tracker.reset()
        self.memory.clear()

    def retract(self, decision: Decision) -> None:
        """Undo the cooldown or rate limit of DECISION, which could not be delivered."""
        if decision.decision == "unlock" and decision.identity is not None:
            self.cooldown_until.pop(decision.identity, None)
        else:
            self.next_deny.pop(decision.reason, None)

    def in_cooldown(self, identity: str, t: float) -> bool:
        """True while IDENTITY may not be unlocked again."""
        return self.cooldown_until.get(identity, float("-inf")) > t


def _votes(gallery: Gallery | None, embeddings: list[np.ndarray]) -> list[str | None]:
    """Each embedding's nearest member whatever its distance (one matrix product for the frame)."""
    if gallery is None or len(gallery) == 0 or not embeddings:
        return [None] * len(embeddings)
    best = gallery.distances(np.stack(embeddings)).argmin(axis=1)
    return [gallery.names[i] for i in best]


def _verdict(track: Track, face: int, near: bool, memory: _Memory, gallery: Gallery | None, rules: Rules,
             live: LiveEvidence | None) -> TrackVerdict:
    """Match TRACK's fused embedding once and gather its evidence."""
    fused = track.embedding
    majority = track.majority()
    if track.good < rules.policy.min_good_frames or fused is None or gallery is None:
        return TrackVerdict(track.id, face, near, track.good, None, float("inf"), majority, float("inf"),
                            memory.lookalike, None, None)
    nearest = gallery.nearest(fused)
    cohort_gap = gallery.cohort_distance(fused) - nearest.distance
    lookalike = memory.lookalike or cohort_gap <= rules.policy.cohort_margin
    below = nearest.identity is not None and nearest.distance < rules.threshold
    member = nearest.identity if below and not lookalike else None
    memory.member = member
    state = pose = None
    if rules.liveness_on and member is not None:
        if memory.liveness is None:
            memory.liveness = TrackLiveness(configured_rule(rules.liveness.threshold, rules.liveness.min_frames))
        if live is not None:
            memory.liveness.add(live(face, memory.liveness.turn))
            pose = memory.liveness.frames[-1].pose
        state = memory.liveness.state
    return TrackVerdict(track.id, face, near, track.good, nearest.identity, nearest.distance, majority,
                        cohort_gap, lookalike, member, state, pose)


def _challenge(v: TrackVerdict, track: Track, memory: _Memory, state: JudgeState, rules: Rules, t: float,
               live: Verdict | None, asks: list[Ask]) -> Answer | None:
    """The answer to the track's challenge at T; None while `liveness.challenge` wants none of it (always:
    every member track; on_doubt: one the gate has not called live `challenge_after_s` into the track, or
    without the gate at all). Asked once (into ASKS) as soon as the mesh gives the pose to measure the
    turn from; pending until then."""
    cfg = rules.liveness
    if memory.challenge is None:
        doubt = live is None or (live == "undecided" and t - track.t_first >= cfg.challenge_after_s)
        if cfg.challenge == "off" or (cfg.challenge == "on_doubt" and not doubt):
            return None
        if v.pose is None:
            return "pending"
        memory.challenge = TrackChallenge(draw(state.picks, track.id, t, v.pose, cfg.challenge_directions,
                                               cfg.challenge_timeout_s))
        asks.append(memory.challenge.ask)
    return memory.challenge.see(t, v.pose, cfg.challenge_directions, cfg.challenge_degrees)


def _decide(v: TrackVerdict, track: Track, memory: _Memory, state: JudgeState, rules: Rules, t: float,
            faces: int, companions: tuple[int, ...], factors: FactorEvidence | None, asks: list[Ask]
            ) -> Decision | None:
    """The decision of one near track, if it supports one now (a challenge it asks goes into ASKS)."""
    fused = track.embedding
    if v.good < rules.policy.min_good_frames or fused is None or memory.lookalike:
        return None
    score = v.liveness.score if v.liveness is not None else None

    def make(decision: Literal["unlock", "deny"], reason: Literal["match"] | DenyReason, identity: str | None,
             frames: int, template: bool = False, factor: FactorCheck | None = None) -> Decision:
        return Decision(decision=decision, reason=reason, identity=identity, distance=v.distance,
                        threshold=rules.threshold, frames=frames, window=track.frames, faces=faces, t=t,
                        track=track.id, face=v.face, embedding=fused, unknown_near=len(companions),
                        companions=tuple(i for i in companions if i >= 0), live_score=score,
                        liveness="on" if rules.liveness_on else "off", template=template, second_factor=factor,
                        challenge=memory.challenge.outcome if memory.challenge is not None else None)

    def deny(reason: DenyReason, identity: str | None, frames: int, factor: FactorCheck | None = None
             ) -> Decision | None:
        if t < state.next_deny.get(reason, float("-inf")):
            return None
        state.next_deny[reason] = t + rules.policy.unknown_interval_s
        return make("deny", reason, identity, frames, factor=factor)

    if v.nearest is None or not v.distance < rules.threshold:
        return deny("unknown", None, v.good)
    name, votes = v.majority
    if name != v.nearest or 2 * votes <= v.good or state.in_cooldown(name, t):
        return None
    if v.lookalike:
        memory.lookalike = True
        return deny("lookalike", name, votes)
    live = v.liveness.verdict if v.liveness is not None else None
    if live == "spoof":
        return deny("spoof", name, votes)
    answer = _challenge(v, track, memory, state, rules, t, live, asks)
    if answer in ("wrong", "timeout"):
        return deny("challenge", name, votes)
    if answer == "pending" or live == "undecided":
        return None
    if companions and rules.policy.companions == "deny":
        return deny("companion", name, votes)
    factor = check_second_factor(name, t, track.t_first, factors, rules.policy.second_factor)
    if factor.state == "wait":
        return None
    if factor.state == "missing":
        return deny("second_factor", name, votes, factor)
    state.cooldown_until[name] = t + rules.policy.cooldown_s
    template = rules.policy.door_templates > 0 and v.distance < rules.policy.door_template_below
    return make("unlock", "match", name, votes, template, factor)


def judge(frame: FrameSightings, state: JudgeState, gallery: Gallery | None, rules: Rules) -> Judgement:
    """Judge one frame: track its faces, match each deciding track once, apply every rule in order.

    GALLERY None means the store could not be read: nobody matches (fail closed)."""
    faces = list(frame.faces)
    near_size = rules.policy.near_ratio * max((f.size for f in faces), default=0.0)
    encoded = [i for i, f in enumerate(faces) if f.embedding is not None]
    votes = _votes(gallery, [faces[i].embedding for i in encoded])  # type: ignore[misc]
    sightings = [Sighting(faces[i].box, faces[i].embedding, faces[i].score, faces[i].sharpness, vote)  # type: ignore[arg-type]
                 for i, vote in zip(encoded, votes)]
    tracks = state.tracker.update(frame.t, sightings)
    alive = {tr.id for tr in state.tracker.tracks}
    for gone in state.memory.keys() - alive:
        del state.memory[gone]
    verdicts = [_verdict(track, i, faces[i].size >= near_size, state.memory.setdefault(track.id, _Memory()),
                         gallery, rules, frame.live)
                for i, track in zip(encoded, tracks)]
    # Faces near the door that match no member: negative keys stand for faces without a track.
    strangers = {v.track: v.face for v in verdicts if v.near and v.member is None}
    strangers.update({-1 - i: i for i, f in enumerate(faces) if f.size >= near_size and f.embedding is None})
    seen = {tr.id for tr in tracks}
    missed = [-1 for tr in state.tracker.tracks
              if tr.id not in seen and tr.last.size >= near_size and tr.good >= rules.policy.min_good_frames
              and state.memory.get(tr.id, _Memory()).member is None]
    decisions = []
    asks: list[Ask] = []
    for v, track in zip(verdicts, tracks):
        if not v.near:
            continue
        companions = tuple(i for key, i in strangers.items() if key != v.track) + tuple(missed)
        decision = _decide(v, track, state.memory[track.id], state, rules, frame.t, len(faces), companions,
                           frame.factors, asks)
        if decision is not None:
            decisions.append(decision)
    return Judgement(tuple(verdicts), tuple(decisions), tuple(asks))
