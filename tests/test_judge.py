"""The judge on exact timelines: fused evidence, majority, cooldown, rate-limited denies, liveness,
companions (encoded, unencoded and missed), look-alikes, one gallery match per deciding track, and the
active challenge."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from facedoor.challenge import Ask, Outcome
from facedoor.config import FacedoorConfig, parse_config
from facedoor.judge import Decision, FrameSightings, Judgement, JudgeState, Rules, Seen, judge
from facedoor.landmarks import Mesh
from facedoor.liveness import Cues, configured_rule
from facedoor.match import Gallery, Match
from pose_support import head_meshes

T = 0.7
DT = 0.1


def unit(*values: float) -> np.ndarray:
    v = np.zeros(4, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


ALICE, BOB = unit(1), unit(0, 1)
GALLERY = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T)


def box(x: float, size: float = 120.0) -> np.ndarray:
    return np.array([x, 0, x + size, size], np.float32)


def seen(e: np.ndarray | None, x: float = 0.0, size: float = 120.0) -> Seen:
    """A sharp, confident face at X of SIZE pixels (E None: detected but not encoded)."""
    return Seen(box(x, size), 0.99, 500.0, e)


def alice_frames(n: int, angle: float = 0.3) -> list[np.ndarray]:
    """N frames of alice, each ANGLE radians off her enrolment on alternating sides (fused lands on her)."""
    return [unit(np.cos(angle), 0, (-1) ** i * np.sin(angle)) for i in range(n)]


def rules(cfg: FacedoorConfig | None = None, liveness_on: bool = False, **policy: object) -> Rules:
    cfg = cfg or parse_config({"policy": policy})
    return Rules.from_config(cfg, liveness_on)


def run(frames: Sequence[Sequence[Seen]], gallery: Gallery | None = GALLERY, r: Rules | None = None,
        state: JudgeState | None = None, t0: float = 0.0, live: Sequence[Cues] | None = None) -> list[Decision]:
    """Judge FRAMES DT apart from T0; LIVE: the liveness cues each frame's faces get (gate on; the last repeats)."""
    r = r or rules()
    state = state or JudgeState(r.tracking, r.quality)
    out: list[Decision] = []
    for i, faces in enumerate(frames):
        score = None if live is None else (lambda _i, _turn, s=live[min(i, len(live) - 1)]: s)
        out += judge(FrameSightings(t0 + i * DT, faces, score), state, gallery, r).decisions
    return out


def visit(embeddings: list[np.ndarray]) -> list[list[Seen]]:
    return [[seen(e)] for e in embeddings]


def test_a_track_unlocks_on_its_fused_embedding_with_a_majority() -> None:
    assert run(visit(alice_frames(2))) == []  # 2 < 3 good frames
    (d,) = run(visit(alice_frames(3)))
    assert (d.decision, d.reason, d.identity, d.frames, d.window, d.faces) == ("unlock", "match", "alice", 3, 3, 1)
    assert d.distance < 0.11 and d.t == pytest.approx(0.2) and d.threshold == T and not d.template


def test_fusion_unlocks_where_every_single_frame_is_above_the_threshold() -> None:
    a = 0.8  # each frame ~0.78 from alice, off her in two directions: above 0.7, rejected one by one
    frames = [unit(np.cos(a), 0, np.sin(a)), unit(np.cos(a), 0, 0, np.sin(a))] * 2
    assert all(np.linalg.norm(f - ALICE) >= T for f in frames)
    (d,) = run(visit(frames))
    assert d.decision == "unlock" and d.distance < T


def test_a_majority_that_disagrees_with_the_fused_match_decides_nothing() -> None:
    lean_bob = unit(0.6, 0.8)  # nearer bob frame by frame; the fused embedding stays nearest alice
    assert run(visit([ALICE, lean_bob, lean_bob, ALICE])) == []


def test_a_fused_distance_at_the_threshold_is_unknown() -> None:
    e = unit(1 - T**2 / 2, T * np.sqrt(1 - T**2 / 4), 0, 0)  # T from alice (to float precision)
    only_alice = Gallery(["alice"], ALICE[None], T)
    at = only_alice.nearest(e).distance
    assert at == pytest.approx(T, abs=1e-6)
    cfg = parse_config({"recognition": {"threshold": at}})
    (d,) = run(visit([e] * 3), only_alice, rules(cfg))
    assert (d.decision, d.reason, d.identity) == ("deny", "unknown", None)


def test_unknown_denies_are_rate_limited_and_a_missing_gallery_matches_nobody() -> None:
    stranger = unit(0, 0, 1)
    state, r = JudgeState(rules().tracking, rules().quality), rules()
    denies = run(visit([stranger] * 100), state=state, r=r)  # 10 s of one stranger
    assert [(d.decision, d.reason) for d in denies] == [("deny", "unknown")] * 2
    assert denies[1].t - denies[0].t >= 5.0
    (d,) = run(visit(alice_frames(3)), gallery=None)
    assert (d.decision, d.reason) == ("deny", "unknown")


def test_cooldown_per_person_and_retract() -> None:
    r = rules()
    state = JudgeState(r.tracking, r.quality)
    (first,) = run(visit(alice_frames(3)), state=state, r=r)
    state.reset()  # a new visit
    assert run(visit(alice_frames(3)), state=state, r=r, t0=5.0) == []  # cooldown
    (bob,) = run(visit([BOB] * 3), state=state, r=r, t0=6.0)
    assert bob.identity == "bob"
    state.retract(first)
    assert not state.in_cooldown("alice", 7.0)
    state.reset()
    assert [d.identity for d in run(visit(alice_frames(3)), state=state, r=r, t0=7.0)] == ["alice"]


def test_a_confident_unlock_is_marked_as_a_door_template_only_when_enabled() -> None:
    on = rules(door_templates=3, door_template_below=0.5)
    (near,) = run(visit(alice_frames(3, 0.1)), r=on)
    assert near.template
    (far,) = run(visit([unit(np.cos(0.6), 0, np.sin(0.6))] * 3), r=on)
    assert far.distance >= 0.5 and not far.template
    (off,) = run(visit(alice_frames(3, 0.1)))
    assert not off.template


def cues(n: int, passive: float, depth: float = 1.0) -> list[Cues]:
    """N frames of a synthetic 468-point face (an ellipsoid, flat when DEPTH is 0) that sways and turns."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(468, 3)) * np.array([40.0, 50.0, 30.0 * depth])
    out = []
    for i in range(n):
        yaw = np.radians(12 * np.sin(i / 3))
        r = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
        p = points @ r.T
        xy = 600 * p[:, :2] / (500 + p[:, 2:]) + np.array([320 + 4 * i, 240])
        out.append(Cues(passive, Mesh(np.c_[xy, p[:, 2]], 1.0)))
    return out


def test_liveness_undecided_waits_spoof_denies_live_unlocks() -> None:
    gate = rules(liveness_on=True)  # evidence from the frames where the track matches a member
    head, rule = cues(60, 0.9), configured_rule()
    first = rule.min_frames + 1  # the track matches from its 2nd frame
    assert run(visit(alice_frames(first)), r=gate, live=head) == []  # min_frames - 1 frames of evidence: undecided
    (live,) = run(visit(alice_frames(first + 1)), r=gate, live=head)
    assert (live.decision, live.identity, live.liveness) == ("unlock", "alice", "on") and live.live_score > 0.5
    for attack in (cues(60, 0.05), cues(60, 0.9, depth=0.0)):  # a screen's texture; a photo's plane
        decisions = run(visit(alice_frames(rule.patience_frames + 2)), r=gate, live=attack)
        assert [(d.decision, d.reason, d.identity, d.liveness) for d in decisions] == [("deny", "spoof", "alice", "on")]
    assert run(visit(alice_frames(60)), r=gate) == []  # the gate is on but gave no evidence: never an unlock


def test_a_stranger_beside_a_member_blocks_the_unlock_unless_allowed() -> None:
    stranger = unit(0, 0, 1)
    frames = [[seen(a, 0), seen(stranger, 300)] for a in alice_frames(3)]
    decisions = run(frames)
    companion = [d for d in decisions if d.identity == "alice"]
    assert [(d.decision, d.reason, d.unknown_near, d.companions, d.faces) for d in companion] == \
        [("deny", "companion", 1, (1,), 2)]
    lenient = [d for d in run(frames, r=rules(companions="allow")) if d.identity == "alice"]
    assert [(d.decision, d.unknown_near) for d in lenient] == [("unlock", 1)]  # let in, and reported


def test_an_unencoded_face_near_the_door_is_a_companion_and_a_far_one_is_only_counted() -> None:
    near = [[seen(a, 0), seen(None, 300, 100)] for a in alice_frames(3)]
    (d,) = run(near)
    assert (d.reason, d.unknown_near, d.companions, d.faces) == ("companion", 1, (1,), 2)
    far = [[seen(a, 0), seen(None, 300, 40)] for a in alice_frames(3)]
    (d,) = run(far)
    assert (d.decision, d.unknown_near, d.faces) == ("unlock", 0, 2)


def test_a_tailgater_a_step_behind_is_a_companion_by_default() -> None:
    """A stranger at 0.4 of the member's face size (2.5x the distance: one step behind) is near the
    door with the default near_ratio; one at 0.3 (3.3x) is not, and both are counted in `faces`."""
    stranger = unit(0, 0, 1)
    (d,) = [d for d in run([[seen(a, 0), seen(stranger, 300, 48)] for a in alice_frames(3)]) if d.identity]
    assert (d.decision, d.reason, d.unknown_near, d.faces) == ("deny", "companion", 1, 2)
    (d,) = [d for d in run([[seen(a, 0), seen(stranger, 300, 36)] for a in alice_frames(3)]) if d.identity]
    assert (d.decision, d.unknown_near, d.faces) == ("unlock", 0, 2)


def test_a_strangers_track_the_detector_missed_this_frame_still_counts() -> None:
    stranger = unit(0, 0, 1)
    frames = [[seen(stranger, 300)] for _ in range(3)] + [[seen(a, 0)] for a in alice_frames(3)]
    decisions = [d for d in run(frames) if d.identity == "alice"]
    assert [(d.reason, d.unknown_near, d.companions) for d in decisions] == [("companion", 1, ())]


def test_a_visit_as_near_a_cohort_face_as_its_member_is_denied_as_a_lookalike_for_the_rest_of_its_track() -> None:
    v = unit(np.cos(0.5), 0, np.sin(0.5))  # 0.49 from alice
    lookalike = unit(np.cos(0.5), 0, np.sin(0.5), 0.65)  # 0.57 from the visit: farther, but within 0.49 + 0.2
    elsewhere = unit(0, 0, 0, 1)
    near = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T, cohort=np.stack([elsewhere, lookalike]))
    far = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T, cohort=elsewhere[None])
    (d,) = run(visit([v] * 3), near)
    assert (d.decision, d.reason, d.identity) == ("deny", "lookalike", "alice")
    assert [d.decision for d in run(visit([v] * 3), far)] == ["unlock"]
    assert [d.decision for d in run(visit([v] * 3), near, rules(cohort_margin=0.0))] == ["unlock"]
    # Doubt holds: later frames that pull the fused embedding onto alice do not open the door.
    assert run(visit([v] * 3 + [ALICE] * 20), near) == [d]


class CountingGallery(Gallery):
    """A gallery that counts `nearest` calls."""

    calls = 0

    def nearest(self, embedding: np.ndarray) -> Match:
        CountingGallery.calls += 1
        return super().nearest(embedding)


def test_the_gallery_is_matched_once_per_deciding_track_per_frame() -> None:
    gallery = CountingGallery(["alice", "bob"], np.stack([ALICE, BOB]), T)
    r = rules()
    state = JudgeState(r.tracking, r.quality)
    stranger = unit(0, 0, 1)
    for i, a in enumerate(alice_frames(6)):
        CountingGallery.calls = 0
        out: Judgement = judge(FrameSightings(i * DT, [seen(a, 0), seen(stranger, 300), seen(None, 600, 90)]),
                               state, gallery, r)
        deciding = sum(v.good >= r.policy.min_good_frames for v in out.verdicts)
        assert CountingGallery.calls == deciding == (0 if i < 2 else 2)


def test_each_frame_votes_for_the_nearest_member_of_each_encoded_face() -> None:
    r = rules()
    state = JudgeState(r.tracking, r.quality)
    out = judge(FrameSightings(0.0, [seen(unit(0.3, 1), 0), seen(None, 300)]), state, GALLERY, r)
    (v,) = out.verdicts
    assert (v.face, v.near, v.good, v.majority, v.member) == (0, True, 1, ("bob", 1), None)
    assert judge(FrameSightings(0.1, [seen(unit(0.3, 1), 0)]), state, None, r).verdicts[0].majority == ("bob", 1)


# -- the active challenge (liveness.challenge) -------------------------------------------------------


def challenged(yaws: Sequence[float], mode: str = "always", picks: Sequence[int] = (1, 0),
               pitches: Sequence[float] | None = None, liveness_on: bool = True) -> tuple[list[Decision], list[Ask]]:
    """Alice's visit with the challenge MODE on, one frame DT apart per yaw of her head (degrees to her left;
    PITCHES default: a nod, the motion the gate wants); the judge draws from PICKS (1, 0: id 1, left)."""
    r = Rules.from_config(parse_config({"liveness": {"challenge": mode}}), liveness_on)
    state = JudgeState(r.tracking, r.quality, picks=itertools.cycle(picks))
    decisions: list[Decision] = []
    asks: list[Ask] = []
    meshes = head_meshes(list(yaws), None if pitches is None else list(pitches))
    for i, (e, mesh) in enumerate(zip(alice_frames(len(yaws)), meshes)):
        out = judge(FrameSightings(i * DT, [seen(e)], lambda _i, _turn, m=mesh: Cues(0.9, m)), state, GALLERY, r)
        decisions += out.decisions
        asks += out.asks
    return decisions, asks


def outcome(d: Decision) -> tuple[str, str, str | None]:
    return d.decision, d.reason, d.challenge.answer if d.challenge is not None else None


def test_a_member_who_turns_as_asked_is_let_in_once_the_gate_says_live() -> None:
    """Asked on the track's first member frame (always), once; the turn answers two frames later, the
    unlock waits for the gate's own verdict (its 10th frame of evidence)."""
    decisions, asks = challenged([0] * 6 + [25] * 20)
    (ask,) = asks
    assert (ask.id, ask.direction, ask.t, ask.timeout_s) == ("0000000000000001", "left", pytest.approx(0.2), 5.0)
    (d,) = decisions
    assert outcome(d) == ("unlock", "match", "passed") and d.identity == "alice"
    assert d.challenge == Outcome(ask.id, "left", "passed") and d.t == pytest.approx(1.1)


def test_a_turn_the_other_way_is_denied_and_never_let_in() -> None:
    decisions, asks = challenged([0] * 6 + [25] * 34, picks=(1, 1))  # asked right, turns left
    assert [a.direction for a in asks] == ["right"]
    assert [outcome(d) for d in decisions] == [("deny", "challenge", "wrong")]  # once: rate limited
    assert decisions[0].t == pytest.approx(0.7) and decisions[0].identity == "alice"


def test_a_face_that_does_not_turn_is_denied_when_the_challenge_times_out() -> None:
    """A head that only nods (the gate calls it live) but never turns: denied at the first frame after
    the ask's 5 s, never let in."""
    decisions, _ = challenged([0] * 70)
    assert [outcome(d) for d in decisions] == [("deny", "challenge", "timeout")]
    assert decisions[0].t == pytest.approx(5.3)


def test_a_turn_made_before_the_ask_does_not_answer() -> None:
    """A replay that turned left before the door asked: held, it never answers (timeout); turning back
    it answers the other way (wrong). The pose at the ask is the reference."""
    held, _ = challenged([25] * 70)
    assert [outcome(d) for d in held] == [("deny", "challenge", "timeout")]
    back, _ = challenged([25] * 3 + [0] * 20)
    assert [outcome(d) for d in back] == [("deny", "challenge", "wrong")]


def test_on_doubt_asks_only_a_track_the_gate_has_not_called_live_in_time() -> None:
    """on_doubt: a head that moves is live before challenge_after_s (1.5 s): let in, never asked. A face
    that stands still is undecided, asked at 1.5 s, and let in once it turns as asked (the turn is
    also the motion the gate wanted); turning the other way is a deny."""
    decisions, asks = challenged([0] * 20, mode="on_doubt")
    assert asks == [] and [outcome(d) for d in decisions] == [("unlock", "match", None)]
    still = [0.0] * 30
    decisions, asks = challenged([0] * 20 + [25] * 10, mode="on_doubt", pitches=still)
    (ask,) = asks
    assert ask.t == pytest.approx(1.5) and [outcome(d) for d in decisions] == [("unlock", "match", "passed")]
    decisions, _ = challenged([0] * 20 + [-25] * 10, mode="on_doubt", pitches=still)
    assert [outcome(d) for d in decisions] == [("deny", "challenge", "wrong")]


def test_a_challenge_without_the_gate_never_unlocks() -> None:
    """No mesh, no pose to measure a turn: nothing is asked and nothing opens (the door refuses to start
    this way; the judge fails closed anyway)."""
    for mode in ("always", "on_doubt"):
        assert challenged([0] * 6 + [25] * 60, mode=mode, liveness_on=False) == ([], [])
