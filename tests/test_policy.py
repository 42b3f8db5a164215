"""The track policy on exact timelines: fused evidence, majority, cooldown, rate-limited denies,
liveness verdicts and strangers beside a member."""
from __future__ import annotations

import numpy as np
import pytest

from facedoor.config import PolicyConfig
from facedoor.match import Gallery
from facedoor.policy import TrackPolicy
from facedoor.track import Sighting, Track

T = 0.7


# -- decisions on face tracks --------------------------------------------------------------------

def track_of(embeddings: list[np.ndarray], nearest: list[str | None], t0: float = 0.0, faces: int = 1) -> Track:
    """A track of good frames 0.1 s apart with the given embeddings and per-frame nearest identities."""
    track = Track(1, t0, t0, None)  # type: ignore[arg-type]
    for i, (e, who) in enumerate(zip(embeddings, nearest)):
        s = Sighting(np.array([0, 0, 120, 120], np.float32), e, 0.99, 500.0, who)
        track.add(t0 + i / 10, s, 1.0, faces)
    return track


def unit(*values: float) -> np.ndarray:
    v = np.zeros(4, np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


ALICE, BOB = unit(1), unit(0, 1)
GALLERY = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T)


def alice_frames(n: int, angle: float = 0.3) -> list[np.ndarray]:
    """N frames of alice, each ANGLE radians off her enrolment on alternating sides (fused lands on her)."""
    return [unit(np.cos(angle), 0, (-1) ** i * np.sin(angle)) for i in range(n)]


@pytest.fixture
def tracks() -> TrackPolicy:
    return TrackPolicy(PolicyConfig(), T)  # 3 good frames, cooldown 10 s, unknown every 5 s


def test_track_unlocks_on_its_fused_embedding_with_a_majority(tracks: TrackPolicy) -> None:
    assert tracks.decide(track_of(alice_frames(2), ["alice"] * 2), GALLERY) is None  # 2 < 3 good frames
    d = tracks.decide(track_of(alice_frames(3), ["alice", "bob", "alice"]), GALLERY)
    assert d is not None
    assert (d.decision, d.reason, d.identity, d.frames, d.window, d.track) == ("unlock", "match", "alice", 2, 3, 1)
    assert d.distance < 0.11 and d.t == pytest.approx(0.2) and d.threshold == T
    assert d.embedding is not None and not d.template


def test_fusion_unlocks_where_every_single_frame_is_above_the_threshold(tracks: TrackPolicy) -> None:
    frames = alice_frames(4, angle=0.8)  # each frame ~0.78 from alice: above 0.7, rejected one by one
    assert all(np.linalg.norm(f - ALICE) >= T for f in frames)
    d = tracks.decide(track_of(frames, ["alice"] * 4), GALLERY)
    assert d is not None and d.decision == "unlock" and d.distance < T


def test_no_majority_for_the_fused_identity_decides_nothing(tracks: TrackPolicy) -> None:
    assert tracks.decide(track_of(alice_frames(4), ["alice", "bob", "bob", "alice"]), GALLERY) is None


def test_fused_distance_at_the_threshold_is_unknown() -> None:
    e = unit(1 - T**2 / 2, T * np.sqrt(1 - T**2 / 4), 0, 0)  # T from alice (to float precision)
    only_alice = Gallery(["alice"], ALICE[None], T)
    at = only_alice.nearest(e).distance
    assert at == pytest.approx(T, abs=1e-6)
    d = TrackPolicy(PolicyConfig(), at).decide(track_of([e] * 3, ["alice"] * 3), only_alice)
    assert d is not None and (d.decision, d.reason, d.identity) == ("deny", "unknown", None)


def test_unknown_track_denies_rate_limited(tracks: TrackPolicy) -> None:
    stranger = unit(0, 0, 1)
    decisions = [tracks.decide(track_of([stranger] * 3, ["alice"] * 3, t0=t), GALLERY) for t in np.arange(0, 10, 0.5)]
    denies = [d for d in decisions if d is not None]
    assert [(d.decision, d.reason) for d in denies] == [("deny", "unknown")] * 2
    assert denies[1].t - denies[0].t >= 5.0
    assert tracks.decide(track_of([stranger] * 3, [None] * 3, t0=20.0), None).reason == "unknown"  # no gallery


def test_track_cooldown_per_person_and_retract(tracks: TrackPolicy) -> None:
    first = tracks.decide(track_of(alice_frames(3), ["alice"] * 3), GALLERY)
    assert first is not None
    assert tracks.decide(track_of(alice_frames(3), ["alice"] * 3, t0=5.0), GALLERY) is None  # cooldown
    bob = tracks.decide(track_of([BOB] * 3, ["bob"] * 3, t0=5.0), GALLERY)
    assert bob is not None and bob.identity == "bob"
    tracks.retract(first)
    assert not tracks.in_cooldown("alice", 5.0)
    assert tracks.decide(track_of(alice_frames(3), ["alice"] * 3, t0=5.0), GALLERY) is not None


def test_confident_unlock_is_marked_as_a_door_template_only_when_enabled() -> None:
    on = TrackPolicy(PolicyConfig(door_templates=3, door_template_below=0.5), T)
    near = on.decide(track_of(alice_frames(3, 0.1), ["alice"] * 3), GALLERY)
    assert near is not None and near.template
    far = on.decide(track_of([unit(np.cos(0.6), 0, np.sin(0.6))] * 3, ["alice"] * 3, t0=20.0), GALLERY)
    assert far is not None and far.distance >= 0.5 and not far.template


def test_liveness_undecided_waits_spoof_denies_live_unlocks(tracks: TrackPolicy) -> None:
    frames = track_of(alice_frames(3), ["alice"] * 3)
    assert tracks.decide(frames, GALLERY, liveness="undecided") is None
    spoof = tracks.decide(frames, GALLERY, liveness="spoof", live_score=0.05)
    assert spoof is not None and (spoof.decision, spoof.reason, spoof.identity) == ("deny", "spoof", "alice")
    assert spoof.live_score == 0.05 and not tracks.in_cooldown("alice", 1.0)  # a spoof never starts a visit
    assert tracks.decide(frames, GALLERY, liveness="spoof") is None  # rate-limited
    live = tracks.decide(frames, GALLERY, liveness="live", live_score=0.9)
    assert live is not None and live.decision == "unlock" and live.live_score == 0.9


def test_a_stranger_beside_a_member_blocks_the_unlock_unless_allowed() -> None:
    frames = track_of(alice_frames(3), ["alice"] * 3)
    strict = TrackPolicy(PolicyConfig(), T)  # companions: deny (the default)
    d = strict.decide(frames, GALLERY, unknown_near=1)
    assert d is not None and (d.decision, d.reason, d.identity, d.unknown_near) == ("deny", "companion", "alice", 1)
    assert strict.decide(frames, GALLERY) is not None  # alone: let in
    lenient = TrackPolicy(PolicyConfig(companions="allow"), T)
    d = lenient.decide(frames, GALLERY, unknown_near=2)
    assert d is not None and d.decision == "unlock" and d.unknown_near == 2  # let in, and reported


def test_matched_needs_enough_good_frames_and_a_fused_match(tracks: TrackPolicy) -> None:
    assert tracks.matched(track_of(alice_frames(3), ["alice"] * 3), GALLERY) == "alice"
    assert tracks.matched(track_of(alice_frames(2), ["alice"] * 2), GALLERY) is None
    assert tracks.matched(track_of([unit(0, 0, 1)] * 3, ["alice"] * 3), GALLERY) is None
    assert tracks.matched(track_of(alice_frames(3), ["alice"] * 3), None) is None


def test_a_visit_as_near_a_cohort_face_as_its_member_is_denied_as_a_lookalike() -> None:
    """A cohort face within `cohort_margin` of the member's distance vetoes the unlock; farther, it does not."""
    visit = unit(np.cos(0.5), 0, np.sin(0.5))  # 0.49 from alice

    def frames() -> Track:  # a fresh track per policy (a look-alike verdict stays with its track)
        return track_of([visit] * 3, ["alice"] * 3)

    lookalike = unit(np.cos(0.5), 0, np.sin(0.5), 0.65)  # 0.57 from the visit: farther, but within 0.49 + 0.2
    elsewhere = unit(0, 0, 0, 1)  # 1.41 from it
    near = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T, cohort=np.stack([elsewhere, lookalike]))
    d = TrackPolicy(PolicyConfig(), T).decide(frames(), near)
    assert d is not None and (d.decision, d.reason, d.identity) == ("deny", "lookalike", "alice")
    assert d.distance < float(np.linalg.norm(lookalike - visit)) <= d.distance + 0.2
    far = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T, cohort=np.stack([elsewhere]))
    d = TrackPolicy(PolicyConfig(), T).decide(frames(), far)
    assert d is not None and d.decision == "unlock"
    d = TrackPolicy(PolicyConfig(cohort_margin=0.0), T).decide(frames(), near)  # no margin: nearer alice wins
    assert d is not None and d.decision == "unlock"
    policy = TrackPolicy(PolicyConfig(), T)  # beside another member, a look-alike counts as a stranger
    assert (policy.matched(frames(), near), policy.matched(frames(), far)) == (None, "alice")


def test_a_track_found_a_lookalike_never_unlocks_later() -> None:
    """Doubt holds for the rest of the track: frames that later pull the fused embedding onto the
    member (and away from the cohort face) do not open the door."""
    visit = unit(np.cos(0.5), 0, np.sin(0.5))
    lookalike = unit(np.cos(0.5), 0, np.sin(0.5), 0.65)
    gallery = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), T, cohort=lookalike[None])
    policy = TrackPolicy(PolicyConfig(), T)
    track = track_of([visit] * 3, ["alice"] * 3)
    first = policy.decide(track, gallery)
    assert first is not None and first.reason == "lookalike"
    s = Sighting(np.array([0, 0, 120, 120], np.float32), ALICE, 0.99, 500.0, "alice")
    for i in range(20):
        track.add(0.3 + i / 10, s, 1.0, 1)
    assert gallery.cohort_distance(track.embedding) > gallery.nearest(track.embedding).distance + 0.2  # clear now
    assert policy.decide(track, gallery) is None
    assert TrackPolicy(PolicyConfig(), T).decide(track_of([ALICE] * 3, ["alice"] * 3), gallery).decision == "unlock"
