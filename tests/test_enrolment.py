"""Enrolment: frame selection (pose, diversity, one person) and `facedoor enroll --video` end to end
on real faces: the K most diverse good frames stored, or nothing."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from facedoor.cli import main
from facedoor.demo.walkup import Visitor, write_walkup
from facedoor.enrolment import Candidate, EnrolmentError, head_pose, most_diverse, one_person

FRONTAL = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], np.float32)


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_head_pose_is_zero_frontal_and_signed_when_turned() -> None:
    np.testing.assert_allclose(head_pose(FRONTAL), [0.0, 0.0], atol=1e-6)
    turned = FRONTAL.copy()
    turned[2, 0] += 12  # nose towards the right eye
    assert head_pose(turned)[0] == pytest.approx(0.3)
    down = FRONTAL.copy()
    down[2, 1] += 10
    assert head_pose(down)[1] > 0.2


def test_most_diverse_keeps_the_sharpest_and_spreads_over_poses() -> None:
    base = unit(np.ones(8))
    # ten near-identical frontal frames and three turned ones
    cands = [Candidate(i, base, np.array([0.0, 0.0]), 200.0 + i) for i in range(10)]
    cands += [Candidate(10 + i, base, np.array([yaw, 0.0]), 150.0) for i, yaw in enumerate((-0.4, 0.4, 0.8))]
    kept = most_diverse(cands, 3)
    assert 9 in [c.index for c in kept]  # the sharpest frame
    assert {c.index for c in kept} == {9, 10, 12}  # then the two farthest poses, never another frontal twin
    assert most_diverse(cands[:2], 5) == cands[:2]


def test_one_person_refuses_two_people_taking_turns() -> None:
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=128)), unit(rng.normal(size=128))
    near = [unit(a + 0.05 * rng.normal(size=128)) for _ in range(6)]
    pose = np.zeros(2)
    same = [Candidate(i, e, pose, 200.0) for i, e in enumerate(near)]
    assert len(one_person(same)) == 6
    mixed = same[:3] + [Candidate(10 + i, unit(b + 0.05 * rng.normal(size=128)), pose, 200.0) for i in range(3)]
    with pytest.raises(EnrolmentError, match="more than one person"):
        one_person(mixed)
    stray = same + [Candidate(99, b, pose, 200.0)]  # one passer-by frame is dropped, not enrolled
    assert 99 not in [c.index for c in one_person(stray)]


def photo_of(celebrity_dir: Path, name: str = "jerry_seinfeld") -> Path:
    return sorted((celebrity_dir / "train" / name).glob("*.jpg"))[0]


def _rows(store: Path) -> int:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "extra", "frames"), [
    ("--video", [], 4),
    # `--camera SOURCE` goes through the door's threaded `Camera` (a video file is paced as a live camera)
    ("--camera", ["--seconds", "30"], 3),
])
def test_enroll_from_video_or_camera_stores_the_most_diverse_frames(
        real_models: Path, celebrity_dir: Path, tmp_path: Path, capsys, source: str, extra: list[str],
        frames: int) -> None:
    photo = photo_of(celebrity_dir)
    video = tmp_path / "jerry.avi"
    write_walkup(video, [Visitor("jerry", photo)], visit_s=4.0, gap_s=0.5)
    store = tmp_path / "door.db"
    base = ["--models", str(real_models), "--store", str(store)]
    assert main([*base, "--json", "enroll", "jerry", source, str(video), *extra, "--frames", str(frames)]) == 0
    captured = capsys.readouterr()
    assert f'"enrolled": {frames}' in captured.out and _rows(store) == frames
    if source == "--camera":
        assert "look at the camera for 30 s" in captured.err
    # the enrolled person is recognised in a frame of the walk-up (a still of the video)
    assert main([*base, "verify", "jerry", str(photo)]) == 0


@pytest.mark.slow
def test_enroll_from_video_stores_nothing_on_failure(real_models: Path, celebrity_dir: Path, tmp_path: Path,
                                                     capsys) -> None:
    store = tmp_path / "door.db"
    base = ["--models", str(real_models), "--store", str(store)]
    empty = tmp_path / "empty.avi"
    write_walkup(empty, [], visit_s=1.0, gap_s=2.0)  # a doorway with nobody in it
    assert main([*base, "enroll", "nobody", "--video", str(empty)]) == 2
    assert "usable frame(s)" in capsys.readouterr().err and not store.exists()
    two = tmp_path / "two.avi"
    people = [Visitor(n, photo_of(celebrity_dir, n)) for n in ("madonna", "elton_john")]
    write_walkup(two, people, visit_s=3.0, gap_s=0.2)
    assert main([*base, "enroll", "madonna", "--video", str(two), "--frames", "3"]) == 2
    assert "more than one person" in capsys.readouterr().err and not store.exists()
    assert main([*base, "enroll", "x", str(photo_of(celebrity_dir)), "--video", str(two)]) == 2  # which one?
    assert "exactly one of them" in capsys.readouterr().err


@pytest.mark.slow
def test_enroll_at_a_camera_that_cannot_be_opened_stores_nothing(real_models: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "door.db"
    base = ["--models", str(real_models), "--store", str(store)]
    assert main([*base, "enroll", "nobody", "--camera", "rtsp://127.0.0.1:9/none", "--seconds", "1"]) == 2
    assert "usable frame(s)" in capsys.readouterr().err and not store.exists()
