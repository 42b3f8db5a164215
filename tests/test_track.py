"""Face tracks on exact timelines: crossing people, a face swap, gaps, quality-weighted fusion."""
from __future__ import annotations

import numpy as np
import pytest

from facedoor.config import QualityConfig, TrackingConfig
from facedoor.track import Sighting, Tracker, iou, quality_weight

CFG, Q = TrackingConfig(), QualityConfig()  # floor: 40 px, sharpness 100, score 0.9; swap beyond 1.1; gap 1 s


def unit(seed: int, dim: int = 128) -> np.ndarray:
    """A random L2-normalised embedding (distinct seeds are ~1.41 apart)."""
    v = np.random.default_rng(seed).normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def near(e: np.ndarray, seed: int, spread: float = 0.3) -> np.ndarray:
    """An embedding of the same person as E: E plus noise, re-normalised (about SPREAD away)."""
    v = e + spread * unit(seed, e.shape[0])
    return (v / np.linalg.norm(v)).astype(np.float32)


def face(x: float, emb: np.ndarray, who: str | None = None, *, size: float = 120, sharp: float = 500,
         score: float = 0.99, y: float = 100) -> Sighting:
    return Sighting(np.array([x, y, x + size, y + size], np.float32), emb, score, sharp, who)


def test_iou() -> None:
    a = np.array([0, 0, 10, 10], np.float32)
    assert iou(a, a) == pytest.approx(1.0)
    assert iou(a, np.array([5, 0, 15, 10], np.float32)) == pytest.approx(50 / 150)
    assert iou(a, np.array([20, 20, 30, 30], np.float32)) == 0.0


def test_one_face_moving_is_one_track_with_fused_embedding() -> None:
    tracker, alice = Tracker(CFG, Q), unit(1)
    tracks = [tracker.update(i / 10, [face(100 + 5 * i, near(alice, 100 + i), "alice")])[0] for i in range(10)]
    assert len({t.id for t in tracks}) == 1
    track = tracks[-1]
    assert (track.frames, track.good, track.majority()) == (10, 10, ("alice", 10))
    assert np.linalg.norm(track.embedding) == pytest.approx(1.0)
    assert np.linalg.norm(track.embedding - alice) < 0.2  # fusion averages the noise away


def test_two_people_crossing_keep_their_tracks() -> None:
    tracker, alice, bob = Tracker(CFG, Q), unit(1), unit(2)
    ids: dict[str, set[int]] = {"alice": set(), "bob": set()}
    for i in range(21):  # alice walks right, bob left; their boxes overlap mid-way
        xa, xb = 50 + 15 * i, 350 - 15 * i
        sightings = [face(xa, near(alice, 200 + i, 0.2), "alice"), face(xb, near(bob, 300 + i, 0.2), "bob")]
        ta, tb = tracker.update(i / 10, sightings)
        ids["alice"].add(ta.id)
        ids["bob"].add(tb.id)
        assert ta.id != tb.id
    assert len(ids["alice"]) == 1 and len(ids["bob"]) == 1
    (a_track,) = [t for t in tracker.tracks if t.id in ids["alice"]]
    assert a_track.majority() == ("alice", 21)


def test_a_face_swap_in_the_same_box_splits_the_track() -> None:
    tracker, alice, mallory = Tracker(CFG, Q), unit(1), unit(3)
    first = [tracker.update(i / 10, [face(100, near(alice, i), "alice")])[0] for i in range(5)]
    second = [tracker.update(0.5 + i / 10, [face(100, near(mallory, 50 + i), "alice")])[0] for i in range(5)]
    assert len({t.id for t in first}) == 1 and len({t.id for t in second}) == 1
    assert first[0].id != second[0].id
    swapped = second[-1]
    assert swapped.good == 5 and np.linalg.norm(swapped.embedding - mallory) < 0.3  # nothing of alice's


def test_a_gap_ends_the_track() -> None:
    tracker, alice = Tracker(CFG, Q), unit(1)
    before = tracker.update(0.0, [face(100, alice, "alice")])[0]
    tracker.update(0.9, [])
    assert tracker.update(1.0, [face(100, alice, "alice")])[0].id == before.id  # within max_gap_s
    after = tracker.update(2.5, [face(100, alice, "alice")])[0]
    assert after.id != before.id and after.frames == 1


def test_reset_ends_every_track() -> None:
    tracker, alice = Tracker(CFG, Q), unit(1)
    before = tracker.update(0.0, [face(100, alice, "alice")])[0]
    tracker.reset()
    assert tracker.tracks == []
    assert tracker.update(0.1, [face(100, alice, "alice")])[0].id != before.id


def test_fusion_weights_favour_sharp_large_frames() -> None:
    tracker, alice, other = Tracker(CFG, Q), unit(1), unit(4)
    # Two good but small, soft frames lean toward OTHER; one large, sharp frame is alice.
    toward = alice * 0.6 + other * 0.4
    toward /= np.linalg.norm(toward)
    tracker.update(0.0, [face(100, toward, size=90, sharp=120)])
    tracker.update(0.1, [face(100, toward, size=90, sharp=120)])
    track = tracker.update(0.2, [face(100, alice, size=112, sharp=600)])[0]
    assert (track.frames, track.good) == (3, 3)
    assert quality_weight(face(0, alice, size=90, sharp=120), Q) == pytest.approx(90 / 112 * 120 / 400 * 0.99)
    assert quality_weight(face(0, alice, size=112, sharp=600), Q) == pytest.approx(0.99)
    plain_mean = (2 * toward + alice) / np.linalg.norm(2 * toward + alice)
    assert np.linalg.norm(track.embedding - alice) < 0.5 * np.linalg.norm(plain_mean - alice)


@pytest.mark.parametrize("low", [{"size": 30}, {"sharp": 60}, {"score": 0.5}])
def test_frames_below_the_quality_floor_do_not_count(low: dict) -> None:
    tracker, alice, mallory = Tracker(CFG, Q), unit(1), unit(3)
    tracker.update(0.0, [face(100, alice, "alice", size=40)])
    track = tracker.update(0.1, [face(100, mallory, "mallory", **{"size": 40, **low})])[0]  # no swap, no vote
    assert (track.frames, track.good, track.majority()) == (2, 1, ("alice", 1))
    assert np.allclose(track.embedding, alice, atol=1e-6)
    assert quality_weight(face(0, alice, **low), Q) == 0.0


def test_a_track_of_only_poor_frames_has_no_embedding() -> None:
    track = Tracker(CFG, Q).update(0.0, [face(100, unit(1), size=30)])[0]
    assert track.good == 0 and track.embedding is None and track.majority() == (None, 0)
