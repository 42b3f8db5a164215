"""The decision policies on exact timelines: face tracks and k of n, cooldown, unknown rate limit."""
from __future__ import annotations

import numpy as np
import pytest

from facedoor.config import PolicyConfig
from facedoor.match import Gallery
from facedoor.policy import Observation, Policy, TrackPolicy
from facedoor.track import Sighting, Track

T = 0.7


def seen(t: float, who: str | None, distance: float | None = 0.4, faces: int = 1) -> Observation:
    """A frame at time T showing WHO (None: an unmatched face; faces=0: nobody)."""
    if faces == 0:
        return Observation(t, 0, None, None, T)
    return Observation(t, faces, who, distance, T)


def feed(policy: Policy, observations: list[Observation]) -> list:
    return [d for d in (policy.observe(o) for o in observations) if d is not None]


@pytest.fixture
def policy() -> Policy:
    return Policy(PolicyConfig())  # 3 of 5 within 2 s, cooldown 10 s, unknown every 5 s


def test_three_of_five_unlocks_once_with_its_evidence(policy: Policy) -> None:
    frames = [seen(0.0, "alice", 0.42), seen(0.1, None, 0.9), seen(0.2, "alice", 0.38), seen(0.3, "alice", 0.5)]
    decisions = feed(policy, frames)
    assert len(decisions) == 1
    d = decisions[0]
    assert (d.decision, d.reason, d.identity, d.frames, d.window) == ("unlock", "match", "alice", 3, 4)
    assert d.distance == pytest.approx(0.42)
    assert d.t == 0.3 and d.threshold == T


def test_two_of_five_is_not_enough(policy: Policy) -> None:
    frames = [seen(0.0, "alice"), seen(0.1, "bob"), seen(0.2, "alice"), seen(0.3, "bob"), seen(0.4, None, faces=0)]
    assert feed(policy, frames) == []


def test_old_votes_fall_out_of_the_frame_window(policy: Policy) -> None:
    frames = [seen(0.0, "alice"), seen(0.1, "alice")] + [seen(0.2 + i / 10, None, faces=0) for i in range(4)]
    frames.append(seen(0.7, "alice"))
    assert feed(policy, frames) == []


def test_votes_older_than_window_seconds_do_not_count(policy: Policy) -> None:
    frames = [seen(0.0, "alice"), seen(1.0, "alice"), seen(2.5, "alice")]
    assert feed(policy, frames) == []
    assert feed(policy, [seen(2.6, "alice")])[0].frames == 3


def test_cooldown_makes_one_visit_one_unlock_then_rearms(policy: Policy) -> None:
    visit = [seen(i / 10, "alice") for i in range(60)]  # 6 s in front of the door
    assert [d.identity for d in feed(policy, visit)] == ["alice"]
    later = [seen(12.0 + i / 10, "alice") for i in range(5)]
    assert [d.identity for d in feed(policy, later)] == ["alice"]


def test_cooldown_is_per_person(policy: Policy) -> None:
    frames = [seen(i / 10, "alice") for i in range(3)] + [seen(0.3 + i / 10, "bob") for i in range(3)]
    assert [d.identity for d in feed(policy, frames)] == ["alice", "bob"]


def test_a_distance_at_the_threshold_is_not_a_match(policy: Policy) -> None:
    frames = [seen(i / 10, "alice", distance=T) for i in range(5)]
    decisions = feed(policy, frames)
    assert all(d.decision == "deny" for d in decisions)


def test_unknown_face_denies_rate_limited_and_never_unlocks(policy: Policy) -> None:
    frames = [seen(i / 10, None, 1.1) for i in range(100)]  # 10 s of a stranger
    decisions = feed(policy, frames)
    assert [(d.decision, d.reason, d.identity) for d in decisions] == [("deny", "unknown", None)] * 2
    assert decisions[1].t - decisions[0].t >= 5.0


def test_no_face_frames_decide_nothing(policy: Policy) -> None:
    assert feed(policy, [seen(i / 10, None, faces=0) for i in range(50)]) == []


def test_face_count_is_reported(policy: Policy) -> None:
    frames = [seen(i / 10, "alice", faces=3) for i in range(3)]
    assert feed(policy, frames)[0].faces == 3


def test_reset_forgets_evidence_across_an_outage(policy: Policy) -> None:
    assert feed(policy, [seen(0.0, "alice"), seen(0.1, "alice")]) == []
    policy.reset()
    assert feed(policy, [seen(0.2, "alice")]) == []
    assert len(feed(policy, [seen(0.3, "alice"), seen(0.4, "alice")])) == 1


def test_retract_rearms_an_undelivered_unlock(policy: Policy) -> None:
    first = feed(policy, [seen(i / 10, "alice") for i in range(3)])[0]
    policy.retract(first)
    assert not policy.in_cooldown("alice", 0.5)
    assert len(feed(policy, [seen(0.5 + i / 10, "alice") for i in range(3)])) == 1


def test_a_person_in_cooldown_does_not_block_another(policy: Policy) -> None:
    p = Policy(PolicyConfig(frames_required=2, window_frames=5))
    feed(p, [seen(0.0, "alice"), seen(0.1, "alice")])
    decisions = feed(p, [seen(0.2, "alice"), seen(0.3, "alice"), seen(0.4, "bob"), seen(0.5, "bob")])
    assert [d.identity for d in decisions] == ["bob"]


def test_k_greater_than_n_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="frames_required"):
        PolicyConfig(frames_required=4, window_frames=3)


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
