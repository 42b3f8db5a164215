"""The decision policy on exact timelines: k of n, window, cooldown, unknown rate limit."""
from __future__ import annotations

import pytest

from facedoor.config import PolicyConfig
from facedoor.policy import Observation, Policy

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
