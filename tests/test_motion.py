"""Idle gating: motion and a face wake the gate within one detector period; light and noise do not."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from facedoor.config import ConfigError, IdleConfig, parse_config
from facedoor.motion import IdleGate, MotionDetector

FPS = 15.0
W, H = 640, 480


def door_scene(seed: int = 0) -> np.ndarray:
    """A still 640x480 'door' scene: wall gradient, door, frame, a plant, some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    wall = 150 + 40 * x / W - 30 * y / H
    scene = np.repeat(wall[..., None], 3, axis=2)
    cv2.rectangle(scene, (220, 60), (420, 470), (70, 90, 120), -1)  # door
    cv2.rectangle(scene, (210, 50), (430, 470), (230, 230, 230), 8)  # frame
    cv2.circle(scene, (395, 270), 8, (40, 180, 200), -1)  # handle
    cv2.ellipse(scene, (100, 380), (45, 80), 0, 0, 360, (40, 120, 50), -1)  # plant
    scene += cv2.GaussianBlur(rng.normal(0, 12, (H, W, 3)).astype(np.float32), (5, 5), 0)
    return scene


NOISE = [np.random.default_rng(seed).normal(0, 1, (H, W, 3)).astype(np.float32) for seed in range(8)]


def frame(scene: np.ndarray, gain: float = 1.0, offset: float = 0.0, noise: float = 0.0, index: int = 0) -> np.ndarray:
    """SCENE under a global light change (GAIN, OFFSET) and sensor noise of NOISE sigma, as uint8."""
    out = scene * gain + offset
    if noise:
        out = out + noise * NOISE[index % len(NOISE)]
    return np.clip(out, 0, 255).astype(np.uint8)


def with_person(image: np.ndarray, x: int) -> np.ndarray:
    """IMAGE with a person-sized dark shape (body + head) at column X."""
    out = image.copy()
    cv2.rectangle(out, (x, 200), (x + 120, 480), (40, 40, 60), -1)
    cv2.ellipse(out, (x + 60, 160), (40, 50), 0, 0, 360, (120, 150, 190), -1)
    return out


def run(gate: IdleGate, frames: list[np.ndarray], faces_from: float | None = None,
        states: list[str] | None = None) -> list[tuple[float, bool]]:
    """Feed FRAMES at FPS; a detector pass reports a face for frames at or after FACES_FROM seconds.
    STATES, when given, receives the gate's state after each frame."""
    out = []
    for i, image in enumerate(frames):
        t = 100.0 + i / FPS
        detect = gate.should_detect(image, t)
        if detect:
            gate.observe(t, int(faces_from is not None and t >= 100.0 + faces_from))
        out.append((t, detect))
        if states is not None:
            states.append(gate.state)
    return out


def test_still_scene_with_flicker_slow_light_and_noise_stays_idle_at_the_low_rate() -> None:
    rng = np.random.default_rng(1)
    scene = door_scene()
    seconds = 20
    frames = []
    for i in range(int(seconds * FPS)):
        slow = 0.75 + 0.5 * i / (seconds * FPS)  # the sun going down or up over the run
        flicker = 1.0 + 0.15 * np.sin(2 * np.pi * 50 * i / FPS) * (i % 7 == 0)  # mains flicker, exposure steps
        frames.append(frame(scene, slow * flicker, rng.normal(0, 6), noise=4.0, index=int(rng.integers(8))))
    gate = IdleGate(detect_fps=3.0)
    states: list[str] = []
    result = run(gate, frames, states=states)
    detected = sum(d for _, d in result)
    assert set(states) == {"idle"}, f"woke up: max changed fraction {gate.motion.changed:.4f}"
    assert detected <= seconds * 3 + 1
    gaps = np.diff([t for t, d in result if d])
    assert gaps.max() <= 1 / 3 + 1 / FPS + 1e-6


def test_a_lamp_switching_on_wakes_the_gate_at_most_for_the_hold() -> None:
    # An uneven light change looks like a local change for one frame; the background takes it
    # in, so the gate is idle again once the hold has passed.
    scene = door_scene()
    x = np.mgrid[0:H, 0:W][1].astype(np.float32)
    lit = scene * (1.3 + 0.4 * x / W)[..., None] + 20  # brighter to the right
    frames = [frame(scene)] * 10 + [frame(lit)] * 60
    gate = IdleGate(detect_fps=3.0, active_hold_s=1.0)
    states = []
    for _ in run(gate, frames):
        states.append(gate.state)
    assert states[-30:] == ["idle"] * 30


def test_a_change_of_the_whole_picture_is_light_not_motion() -> None:
    # e.g. the camera switching to its night mode: every pixel changes at once
    scene = frame(door_scene())
    night = cv2.cvtColor(cv2.cvtColor(255 - scene, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    gate = IdleGate(detect_fps=3.0)
    for _ in run(gate, [scene] * 10 + [night] * 10):
        assert gate.state == "idle"


def test_motion_wakes_at_once_and_then_every_frame_is_detected() -> None:
    scene = frame(door_scene())
    frames = [scene] * 20 + [with_person(scene, x) for x in range(-60, 400, 12)]
    gate = IdleGate(detect_fps=3.0, active_hold_s=2.0)
    result = run(gate, frames)
    entering = 20 + next(i for i, x in enumerate(range(-60, 400, 12)) if x + 120 > 0)
    first_after = next(t for t, d in result[entering:] if d)
    assert first_after - result[entering][0] <= 1 / 3  # within one idle detector period
    assert result[entering][1], "the first frame with motion goes straight to the detector"
    assert all(d for _, d in result[entering:])
    assert gate.state == "active"


def test_a_face_without_motion_wakes_the_gate_within_one_detector_period() -> None:
    # A face can appear without the motion test noticing (e.g. small and far); the low-rate
    # detector pass finds it and the gate goes to full rate.
    scene = frame(door_scene())
    gate = IdleGate(detect_fps=3.0, active_hold_s=2.0)
    appear = 2.05
    result = run(gate, [scene] * 90, faces_from=appear)
    first = next(t for t, d in result if d and t >= 100.0 + appear)
    assert first - (100.0 + appear) <= 1 / 3
    after = [d for t, d in result if t > first]
    assert after and all(after)
    assert gate.state == "active"


def test_gate_goes_idle_after_the_hold_without_motion_or_faces() -> None:
    scene = frame(door_scene())
    gate = IdleGate(detect_fps=3.0, active_hold_s=1.0)
    person = [with_person(scene, x) for x in range(0, 300, 20)]
    result = run(gate, person + [scene] * 60)
    assert gate.state == "idle"
    tail = [d for _, d in result[-30:]]
    assert 0 < sum(tail) < len(tail)


def test_disabled_gate_detects_every_frame() -> None:
    gate = IdleGate(enabled=False)
    scene = frame(door_scene())
    assert all(d for _, d in run(gate, [scene] * 10))
    assert gate.state == "active"


def test_from_config_and_validation() -> None:
    cfg = parse_config({"idle": {"detect_fps": 2, "motion_height": 32}})
    gate = IdleGate.from_config(cfg.idle)
    assert gate.period == 0.5 and gate.motion.height == 32 and gate.enabled
    assert IdleConfig().enabled is True
    with pytest.raises(ConfigError, match="idle.detect_fps"):
        parse_config({"idle": {"detect_fps": 0}})
    with pytest.raises(ConfigError, match="min_area"):
        parse_config({"idle": {"min_area": 0.7, "lightning_area": 0.6}})


def test_thumbnail_ignores_a_uniform_brightness_change() -> None:
    motion = MotionDetector()
    scene = door_scene()
    a, b = motion.thumbnail(frame(scene)), motion.thumbnail(frame(scene, 0.6, 30))
    assert a.shape == (48, 64)
    assert float(np.abs(a - b).max()) < motion.pixel_threshold
