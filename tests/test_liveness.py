"""Liveness gate: crop geometry, landmark geometry, the per-track judge, config and fail-closed start,
the real models on real frames, and the real daemon on a replay video and a still-image stream."""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon_support import FACEDOOR, run_gate_until, write_config
from facedoor.config import ConfigError, LivenessConfig, parse_config
from facedoor.landmarks import eye_aspect_ratio, head_pose, homography_residual, rotation_deg
from facedoor.liveness import (
    DEFAULT_RULE,
    FEATURES,
    INPUT_SIZE,
    Cues,
    FrameEvidence,
    LivenessModel,
    LivenessUnavailable,
    TrackLiveness,
    configured_rule,
    crop_box,
    crop_input,
    gate_status,
    judge,
    load_liveness,
    track_features,
)
from facedoor.models import Manifest, ModelError
from pose_support import synthetic_face, turned

VIDEOS = ("data", "antispoof", "videos")

# -- crop geometry (Silent-Face: scale around the centre, scale capped to fit, shifted inside) ----


@pytest.mark.parametrize(("box", "scale", "size", "expected"), [
    # centred: 100x100 box at (150, 150) grows to 270x270
    ((100, 100, 200, 200), 2.7, (640, 480), (15, 15, 285, 285)),
    # crosses the left and top borders: shifted right by 75 and down by 65, never cut
    ((10, 20, 110, 120), 2.7, (640, 480), (0, 0, 270, 270)),
    # crosses the right and bottom borders: 320x280 shifted left by 110 and up by 95
    ((550, 400, 630, 470), 4.0, (640, 480), (320, 200, 640, 480)),
    # too tall for 4.0: scale capped at (481 - 1) / 240 = 2, then shifted up by 79
    ((200, 200, 360, 440), 4.0, (641, 481), (120, 1, 440, 481)),
])
def test_crop_box_matches_hand_computed_boxes(box, scale, size, expected):
    assert crop_box(box, scale, *size) == expected


def test_crop_box_stays_inside_the_image_for_any_box():
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(100, 1000, 2))
        x1, y1 = rng.uniform(-50, w), rng.uniform(-50, h)
        box = (x1, y1, x1 + rng.uniform(5, w), y1 + rng.uniform(5, h))
        for scale in (2.7, 4.0):
            left, top, right, bottom = crop_box(box, scale, w, h)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h


def test_crop_input_is_nchw_bgr_0_255():
    image = np.zeros((480, 640, 3), np.uint8)
    image[:] = (10, 20, 250)  # B, G, R
    x = crop_input(image, (100, 100, 200, 200), 2.7)
    assert x.shape == (1, 3, INPUT_SIZE, INPUT_SIZE) and x.dtype == np.float32
    assert [float(x[0, c].mean()) for c in range(3)] == [10.0, 20.0, 250.0]


def test_crop_input_samples_the_scaled_region():
    image = np.zeros((480, 640, 3), np.uint8)
    image[15:285, 15:285] = 255  # exactly the 2.7 crop of the box below
    x = crop_input(image, (100, 100, 200, 200), 2.7)
    assert x.min() == 255.0
    assert crop_input(image, (100, 100, 200, 200), 4.0).min() == 0.0  # 4.0 also sees the dark border


# -- landmark geometry ---------------------------------------------------------------------------


def _project(points: np.ndarray, yaw_deg: float, distance: float = 800.0, focal: float = 600.0) -> np.ndarray:
    """Pinhole image (N, 2) of 3-D POINTS (pixels, centred) turned by YAW_DEG about the vertical axis."""
    yaw = math.radians(yaw_deg)
    r = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    p = (points - points.mean(axis=0)) @ r.T
    return focal * p[:, :2] / (distance + p[:, 2:]) + 320


def test_a_plane_fits_one_homography_and_a_turning_head_does_not(real_mesh) -> None:
    """The 468 points of a real face mesh: turned 10 degrees as a head they leave a homography by
    pixels; flattened (a photo of the same face) and turned the same way they fit one exactly."""
    head = real_mesh.points.copy()
    photo = head.copy()
    photo[:, 2] = 0.0
    assert homography_residual(_project(photo, 0), _project(photo, 10)) < 1e-6
    residual = homography_residual(_project(head, 0), _project(head, 10))
    assert residual / real_mesh.eye_distance > 5 * DEFAULT_RULE.planar_floor
    assert rotation_deg(head, head) < 1e-3
    turned = head @ np.array([[math.cos(0.2), 0, math.sin(0.2)], [0, 1, 0], [-math.sin(0.2), 0, math.cos(0.2)]]).T
    assert rotation_deg(head, turned) == pytest.approx(math.degrees(0.2), abs=0.1)


@pytest.mark.parametrize(("yaw", "pitch"), [(-30, 0), (-15, 0), (10, 0), (25, 0), (0, -15), (0, 12)])
def test_head_pose_measures_a_turn_of_a_synthetic_face(yaw: float, pitch: float) -> None:
    """A synthetic face turned and seen through a pinhole camera: the pose changes by the turn, yaw to
    the person's left positive, chin up positive, whatever the face's size and roll."""
    face = synthetic_face()
    front = head_pose(turned(face))
    assert front.yaw == pytest.approx(0.0, abs=0.5)
    for scale, roll in ((1.0, 0.0), (1.4, 15.0), (0.6, -10.0)):
        pose = head_pose(turned(face, yaw, pitch, roll, scale))
        assert pose.yaw - front.yaw == pytest.approx(yaw, abs=1.5)
        assert pose.pitch - front.pitch == pytest.approx(pitch, abs=1.5)


def test_head_pose_measures_a_turn_of_a_real_mesh(real_mesh) -> None:
    """The 468 points of apfol's real face mesh, turned in 3-D and projected again: the pose follows."""
    front = head_pose(turned(real_mesh.points))
    for yaw, pitch in ((20, 0), (-20, 0), (0, 15), (0, -15)):
        pose = head_pose(turned(real_mesh.points, yaw, pitch))
        assert pose.yaw - front.yaw == pytest.approx(yaw, abs=3.0)
        assert pose.pitch - front.pitch == pytest.approx(pitch, abs=3.0)


# -- the per-track judge (pure) --------------------------------------------------------------------


def _frames(n: int, passive: float = 0.9, ear: float = 0.3, nonplanar: float = 0.05, rotation: float = 5.0,
            motion: float = 0.3, blink_at: int | None = None) -> list[FrameEvidence]:
    return [FrameEvidence(passive, 0.1 if i == blink_at else ear, np.full((2, 2), 0.05 * (i % 3)), nonplanar,
                          rotation, motion) for i in range(n)]


def test_judge_waits_for_min_frames_then_needs_both_parts() -> None:
    rule = configured_rule()
    assert judge([], rule) == ("undecided", None)
    assert judge(_frames(rule.min_frames - 1), rule)[0] == "undecided"
    features = track_features(_frames(20, blink_at=10))
    assert features[FEATURES.index("blink")] == pytest.approx(1 - 0.1 / 0.3)
    assert rule.motion_probability(features) >= rule.motion_threshold
    verdict, score = judge(_frames(20, blink_at=10), rule)
    assert verdict == "live" and score == pytest.approx(min(0.9, rule.motion_probability(features)))
    # a face that moves like a head but whose texture says print or screen: not live, spoof after patience
    assert judge(_frames(20, passive=0.05), rule)[0] == "undecided"
    assert judge(_frames(rule.patience_frames, passive=0.05), rule)[0] == "spoof"
    # the operator's liveness.threshold is the texture part's
    assert judge(_frames(20, passive=0.5), configured_rule(threshold=0.6))[0] == "undecided"


def test_a_flat_or_still_track_is_never_live_whatever_else_it_shows() -> None:
    """The hard rules: points that fit one plane, or do not move, are never live, even with a
    perfect texture score and every motion cue saying live; spoof once patience runs out."""
    rule = replace(configured_rule(), motion_threshold=0.0, passive_threshold=0.01)
    for flat in (_frames(rule.patience_frames + 5, passive=0.999, nonplanar=0.5 * rule.planar_floor, blink_at=5),
                 _frames(rule.patience_frames + 5, passive=0.999, motion=0.5 * rule.static_floor, blink_at=5)):
        verdicts = {judge(flat[:n], rule)[0] for n in range(1, len(flat) + 1)}
        assert "live" not in verdicts and judge(flat, rule)[0] == "spoof"
    assert judge(_frames(30), rule)[0] == "live"  # the same tracks, moving as a head


def test_the_gaze_spread_reads_each_eye_over_the_frames_that_read_it() -> None:
    """One eye's iris a turn (the other NaN): each eye's spread over its own frames, then their mean."""
    rng = np.random.default_rng(1)
    right, left = rng.normal(0, 0.02, (6, 2)), rng.normal(0, 0.05, (6, 2))
    nan = np.full(2, np.nan)
    frames = [FrameEvidence(0.9, 0.3, np.stack([right[i // 2], nan] if i % 2 == 0 else [nan, left[i // 2]]))
              for i in range(12)]
    expected = (np.mean(np.std(right, axis=0)) + np.mean(np.std(left, axis=0))) / 2
    assert track_features(frames)[FEATURES.index("gaze")] == pytest.approx(expected)
    assert track_features(frames[::2])[FEATURES.index("gaze")] == pytest.approx(np.mean(np.std(right, axis=0)))


def test_track_window_follows_what_the_camera_shows_now() -> None:
    track = TrackLiveness(window=3)
    assert track.state.verdict == "undecided" and track.state.score is None
    for _ in range(5):
        track.add(Cues(0.9, None))
    assert track.state.frames == 3


def test_track_refuses_scores_outside_0_1() -> None:
    with pytest.raises(ValueError, match="outside"):
        TrackLiveness().add(Cues(1.5, None))


# -- config and the gate's presence ------------------------------------------------------------------


def test_liveness_config_defaults_and_bounds() -> None:
    assert parse_config({}).liveness == LivenessConfig() and LivenessConfig().enabled == "auto"
    for value in ("auto", True, False):
        assert parse_config({"liveness": {"enabled": value}}).liveness.enabled == value
    assert configured_rule(0.7, 20).passive_threshold == 0.7 and configured_rule(0.7, 20).min_frames == 20
    for bad, key in (({"enabled": "maybe"}, "liveness.enabled"), ({"threshold": 1.0}, "liveness.threshold"),
                     ({"min_frames": 2}, "liveness.min_frames"), ({"frames": 3}, "liveness.frames: unknown key")):
        with pytest.raises(ConfigError, match=key):
            parse_config({"liveness": bad}, "door.yaml")


def test_documented_config_matches_the_defaults() -> None:
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/facedoor.yaml").read_text())
    assert LivenessConfig.model_validate(raw["liveness"]) == LivenessConfig()


def test_without_the_models_auto_is_off_with_a_log_line_and_true_refuses(tmp_path: Path, caplog) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "models": {}}))
    manifest = Manifest.load(tmp_path)
    with caplog.at_level(logging.WARNING, logger="facedoor.liveness"):
        assert load_liveness(manifest) is None
    assert "liveness gate off" in caplog.text and "face_landmark" in caplog.text and "--only antispoof" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facedoor.liveness"):
        assert load_liveness(manifest, enabled=False) is None
    assert "liveness.enabled is false" in caplog.text
    with pytest.raises(LivenessUnavailable, match="liveness.enabled is true"):
        load_liveness(manifest, enabled=True)
    assert gate_status(tmp_path).startswith("liveness: off (antispoof_v2")
    assert gate_status(tmp_path, True).startswith("liveness: the door refuses to start")
    assert gate_status(tmp_path, False).startswith("liveness: off (liveness.enabled is false)")


# -- the real models on real frames -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate(gate_models: Path) -> LivenessModel:
    """The whole gate loaded through the hash-checked manifest, as `liveness.enabled: true` loads it."""
    model = load_liveness(Manifest.load(gate_models), enabled=True)
    assert model is not None and model.mesh is not None
    return model


@pytest.fixture(scope="module")
def detector(gate_models: Path):
    """facedoor's MTCNN on the real exported models (the boxes the gate sees at the door)."""
    from facedoor.detect import MTCNNDetector

    return MTCNNDetector(Manifest.load(gate_models), 1)


def _video(shared_dir: Path, name: str, step: int = 2, count: int = 45) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(shared_dir.joinpath(*VIDEOS, name)))
    frames, index = [], 0
    while len(frames) < count:
        ok, frame = cap.read()
        if not ok:
            break
        if index % step == 0:
            frames.append(frame)
        index += 1
    cap.release()
    return frames


@pytest.fixture(scope="module")
def real_mesh(gate, detector, shared_dir: Path):
    """The mesh of apfol's face in the first frame of his live video."""
    frame = _video(shared_dir, "apfol_live.webm", count=1)[0]
    face = detector.detect(frame, 40)[0]
    return gate.observe(frame, face).mesh


def test_gate_reads_the_crop_scales_and_refuses_a_wrong_entry(gate, gate_models: Path, tmp_path: Path) -> None:
    assert [(name, scale) for name, _, scale, _ in gate.sessions] == [("antispoof_v2", 2.7), ("antispoof_v1se", 4.0)]
    out = tmp_path / "models"
    shutil.copytree(gate_models, out)
    raw = json.loads((out / "manifest.json").read_text())
    del raw["models"]["antispoof_v1se"]["crop_scale"]
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="crop_scale"):
        load_liveness(Manifest.load(out))


def test_observe_finds_the_face_its_eyes_and_irises(gate, detector, shared_dir: Path) -> None:
    frame = _video(shared_dir, "apfol_live.webm", count=1)[0]
    face = detector.detect(frame, 40)[0]
    cues = gate.observe(frame, face)
    assert 0.0 <= cues.passive <= 1.0 and cues.mesh is not None and cues.mesh.presence > 0.9
    x1, y1, x2, y2 = face.box
    inside = ((cues.mesh.points[:, 0] > x1 - 20) & (cues.mesh.points[:, 0] < x2 + 20)
              & (cues.mesh.points[:, 1] > y1 - 40) & (cues.mesh.points[:, 1] < y2 + 20))
    assert inside.mean() > 0.95
    assert 0.15 < eye_aspect_ratio(cues.mesh.points) < 0.45  # eyes open
    for turn in (0, 1):  # a turn reads one eye's iris (subject's right eye = image left, first), the other's is NaN
        irises = gate.observe(frame, face, turn).mesh.irises
        assert irises is not None and np.isnan(irises[1 - turn]).all()
        iris, eye = irises[turn], face.landmarks[turn]
        assert np.linalg.norm(iris - eye) < 0.25 * cues.mesh.eye_distance, (turn, iris, eye)


def test_the_turns_alternate_the_two_minifasnets(gate, detector, shared_dir: Path) -> None:
    """Each frame runs one MiniFASNet, by the track's turn: both models' scores reach the track, one a frame."""
    frame = _video(shared_dir, "apfol_live.webm", count=1)[0]
    face = detector.detect(frame, 40)[0]
    by_model = [gate.live_probability(frame, face.box, m) for m in range(2)]
    assert abs(by_model[0] - by_model[1]) > 1e-6  # two different models
    track = TrackLiveness()
    for expected in by_model * 2:
        assert track.add(gate.observe(frame, face, track.turn)).frames == track.turn
        assert track.frames[-1].passive == pytest.approx(expected)


def _track(gate, detector, frames: list[np.ndarray]) -> list[str]:
    track = TrackLiveness()
    verdicts = []
    for frame in frames:
        faces = detector.detect(frame, 40)
        if faces:
            verdicts.append(track.add(gate.observe(frame, faces[0], track.turn)).verdict)
    return verdicts


def test_a_still_photo_streamed_as_the_camera_is_never_live(gate, detector, shared_dir: Path) -> None:
    """A real live frame injected as the whole stream (a frozen or injected camera): flat, never live;
    the same frame with fresh sensor noise on every frame (a print held perfectly still): never live."""
    frame = _video(shared_dir, "tranvanluyt_live.mp4", count=1)[0]
    frozen = _track(gate, detector, [frame] * (DEFAULT_RULE.patience_frames + 2))
    assert "live" not in frozen and frozen[-1] == "spoof"
    rng = np.random.default_rng(1)
    noisy = [np.clip(frame + rng.normal(0, 3.0, frame.shape), 0, 255).astype(np.uint8) for _ in range(30)]
    assert "live" not in _track(gate, detector, noisy)


# -- the real daemon ------------------------------------------------------------------------------


def _spoof(d: dict) -> bool:
    return d["reason"] == "spoof" and d["identity"] == "apfol"


@pytest.mark.parametrize("clip", ["apfol_spoof.webm", "apfol_live.webm"])
def test_the_daemon_never_lets_a_replay_in_and_lets_the_live_person_in(clip: str, gate_door, shared_dir: Path,
                                                                      mosquitto, tmp_path: Path) -> None:
    """The enrolled person's own face replayed on a screen held to the camera: denied as a spoof, never
    let in; his live webcam video: let in (the gate does not simply refuse everyone)."""
    models, store = gate_door
    config = write_config(tmp_path / "facedoor.yaml", models, store, mosquitto.port,
                          liveness={"enabled": True}, policy={"unknown_interval_s": 1.0})
    replay = "spoof" in clip
    decisions, daemon, _ = run_gate_until(config, shared_dir.joinpath(*VIDEOS, clip), mosquitto,
                                   _spoof if replay else (lambda d: d["decision"] == "unlock"))
    assert "liveness gate on" in daemon.log()
    unlocks = [d for d in decisions if d["decision"] == "unlock"]
    if replay:
        assert unlocks == [] and any(_spoof(d) for d in decisions), decisions
    else:
        assert [d["identity"] for d in unlocks] == ["apfol"], decisions
        assert unlocks[0]["live_score"] > 0


def test_the_daemon_never_lets_a_still_image_stream_in(gate_door, shared_dir: Path, mosquitto,
                                                       tmp_path: Path) -> None:
    """apfol's own live frame as the whole stream (an injected or frozen camera): denied as a spoof, never
    let in, although its texture is a live face's."""
    models, store = gate_door
    frame = _video(shared_dir, "apfol_live.webm", count=1)[0]
    video = tmp_path / "still.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (frame.shape[1], frame.shape[0]))
    for _ in range(45):
        writer.write(frame)
    writer.release()
    config = write_config(tmp_path / "facedoor.yaml", models, store, mosquitto.port, liveness={"enabled": True})
    decisions, _, _ = run_gate_until(config, video, mosquitto, _spoof)
    assert not [d for d in decisions if d["decision"] == "unlock"] and any(_spoof(d) for d in decisions), decisions


def test_the_daemon_refuses_to_start_when_the_gate_is_asked_for_without_its_models(
        real_models: Path, tmp_path: Path) -> None:
    """liveness.enabled: true and a manifest without the gate's models: exit 2 with one line, no door."""
    config = write_config(tmp_path / "facedoor.yaml", real_models, tmp_path / "none.db", 1, liveness={"enabled": True})
    started = time.monotonic()
    proc = subprocess.run([str(FACEDOOR), "--config", str(config), "run", "--source", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "liveness.enabled is true" in last and "antispoof_v2" in last, proc.stderr[-2000:]
    assert time.monotonic() - started < 120


def test_facedoor_list_says_whether_the_gate_runs(gate_models: Path, real_models: Path, tmp_path: Path,
                                                  capsys) -> None:
    from facedoor.cli import main

    store = tmp_path / "door.db"
    for models, enabled, challenge, expected in (
            (gate_models, "auto", "off", "liveness: on\n"),
            (gate_models, "auto", "on_doubt", "liveness: on, challenge on_doubt\n"),
            (real_models, "auto", "off", "liveness: off (antispoof_v2"),
            (real_models, "true", "off", "liveness: the door refuses to start"),
            (real_models, "auto", "always", "liveness: the door refuses to start (liveness.challenge is always"),
            (gate_models, "false", "off", "liveness: off (liveness.enabled is false)")):
        config = tmp_path / "facedoor.yaml"
        config.write_text(f"models: {models}\nstore: {store}\nliveness:\n  enabled: {enabled}\n"
                          f"  challenge: {challenge}\n")
        main(["--config", str(config), "list"])
        assert capsys.readouterr().err.startswith(expected)
