"""Liveness gate: crop geometry, the real MiniFASNet models on NUAA photos, track evidence, config."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.config import ConfigError, LivenessConfig, parse_config
from facedoor.liveness import (
    INPUT_SIZE,
    BoxCalibration,
    LivenessModel,
    TrackLiveness,
    crop_box,
    crop_input,
    load_liveness,
)
from facedoor.models import Manifest, ModelError

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


def test_calibration_scales_then_shifts_the_box():
    assert BoxCalibration().apply((100, 100, 200, 200)).tolist() == [100, 100, 200, 200]
    # 1.2: 120x120 around (150, 150); shift 0.1 of the new height moves it down 12
    assert np.allclose(BoxCalibration(1.2, 0.1).apply((100, 100, 200, 200)), [90, 102, 210, 222])


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


# -- track evidence ---------------------------------------------------------------------------------


def test_track_is_undecided_until_min_frames():
    track = TrackLiveness(threshold=0.6, min_frames=3)
    assert track.state.verdict == "undecided" and track.state.score is None
    assert track.add(0.9).verdict == "undecided"
    assert track.add(0.8).verdict == "undecided"
    state = track.add(0.7)
    assert state.verdict == "live" and state.frames == 3 and state.score == pytest.approx(0.8)


def test_track_verdict_is_the_mean_against_the_threshold():
    track = TrackLiveness(threshold=0.6, min_frames=2)
    track.add(0.95)
    assert track.add(0.2).verdict == "spoof"  # mean 0.575 < 0.6: one confident frame is not enough
    assert track.add(0.65).verdict == "live"  # mean 0.6 reaches it


def test_track_window_follows_what_the_camera_shows_now():
    track = TrackLiveness(threshold=0.5, min_frames=2, window=3)
    for score in (0.1, 0.1, 0.1):
        state = track.add(score)
    assert state.verdict == "spoof"
    for score in (0.9, 0.9, 0.9):
        state = track.add(score)
    assert state.verdict == "live" and state.frames == 3


def test_track_refuses_scores_outside_0_1():
    with pytest.raises(ValueError, match="outside"):
        TrackLiveness(threshold=0.5, min_frames=1).add(1.5)


# -- config ------------------------------------------------------------------------------------------


def test_liveness_config_defaults_and_bounds():
    config = parse_config({})
    assert config.liveness == LivenessConfig()
    assert config.liveness.enabled and 0 < config.liveness.threshold < 1 and config.liveness.min_frames >= 1
    assert parse_config({"liveness": {"enabled": False, "threshold": 0.3, "min_frames": 5}}).liveness.min_frames == 5
    for bad, key in (({"threshold": 1.0}, "liveness.threshold"), ({"threshold": 0}, "liveness.threshold"),
                     ({"min_frames": 0}, "liveness.min_frames"), ({"min_frames": 101}, "liveness.min_frames"),
                     ({"frames": 3}, "liveness.frames: unknown key")):
        with pytest.raises(ConfigError, match=key):
            parse_config({"liveness": bad}, "door.yaml")


def test_documented_config_matches_the_defaults():
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/facedoor.yaml").read_text())
    assert LivenessConfig.model_validate(raw["liveness"]) == LivenessConfig()


# -- the gate's absence -----------------------------------------------------------------------------


def test_gate_is_off_with_a_log_line_without_the_models(tmp_path, caplog):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "models": {}}))
    with caplog.at_level(logging.WARNING, logger="facedoor.liveness"):
        assert load_liveness(Manifest.load(tmp_path)) is None
    assert "liveness gate off" in caplog.text and "antispoof_v2" in caplog.text and "--antispoof-dir" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facedoor.liveness"):
        assert load_liveness(Manifest.load(tmp_path), enabled=False) is None
    assert "liveness.enabled is false" in caplog.text


# -- the real models on real photos -----------------------------------------------------------------


@pytest.fixture(scope="module")
def gate(antispoof_models: Path) -> LivenessModel:
    """The gate loaded through the hash-checked manifest."""
    model = load_liveness(Manifest.load(antispoof_models))
    assert model is not None
    return model


def test_gate_reads_the_crop_scales_from_the_manifest(gate, antispoof_models, tmp_path):
    assert [(name, scale) for name, _, scale, _ in gate.sessions] == [("antispoof_v2", 2.7), ("antispoof_v1se", 4.0)]
    out = tmp_path / "models"
    shutil.copytree(antispoof_models, out)
    raw = json.loads((out / "manifest.json").read_text())
    del raw["models"]["antispoof_v1se"]["crop_scale"]
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="crop_scale"):
        load_liveness(Manifest.load(out))


@pytest.fixture(scope="module")
def detector(real_models: Path):
    """facedoor's MTCNN on the real exported models (the boxes the gate sees at the door)."""
    from facedoor.detect import MTCNNDetector

    return MTCNNDetector(Manifest.load(real_models))


def _nuaa_faces(shared_dir: Path, detector, folder: str, subject: str, count: int):
    paths = sorted((shared_dir / "data/antispoof/nuaa" / folder).glob(f"{subject}_*.jpg"))[::7][:count]
    faces = []
    for path in paths:
        image = cv2.imread(str(path))
        found = detector.detect(image, 40)
        assert found, path
        faces.append((image, found[0].box))
    return faces


def test_real_live_faces_score_above_printed_photos(gate, shared_dir, detector):
    """NUAA subject 0004 (not a calibration subject): every live photo outscores every print."""
    live = [gate.score(image, box) for image, box in _nuaa_faces(shared_dir, detector, "live", "0004", 4)]
    prints = [gate.score(image, box) for image, box in _nuaa_faces(shared_dir, detector, "print", "0004", 4)]
    assert all(0.0 <= s <= 1.0 for s in live + prints)
    assert min(live) > max(prints), (live, prints)
    threshold = LivenessConfig().threshold
    assert np.mean(live) >= threshold > np.mean(prints)


@pytest.mark.parametrize("clip", ["apfol_live.webm", "apfol_spoof.webm", "tranvanluyt_live.mp4",
                                  "tranvanluyt_spoof.mp4"])
def test_replay_clip_tracks_are_judged_spoof_and_live_clips_live(gate, shared_dir, detector, clip):
    """A track of 6 frames (one every half second) per clip, at the default config; these two people
    were never used to choose the threshold."""
    config = LivenessConfig()
    track = TrackLiveness(config.threshold, config.min_frames)
    cap = cv2.VideoCapture(str(shared_dir / "data/antispoof/videos" / clip))
    index = 0
    while track.state.frames < 6:
        ok, frame = cap.read()
        assert ok, f"{clip}: ran out of frames with faces"
        if index % 15 == 0 and (faces := detector.detect(frame, 40)):
            track.add(gate.score(frame, faces[0].box))
        index += 1
    cap.release()
    assert track.state.verdict == ("spoof" if "spoof" in clip else "live"), track.state
