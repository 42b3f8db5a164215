"""The active challenge: the pure answer rule, the random draw, config and fail-closed start, and the real
daemon asking a replay video and a still stream (real Mosquitto), which never get in."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import pytest
import yaml

from daemon_support import FACEDOOR, run_gate_until, write_config
from facedoor.challenge import SUSTAIN_FRAMES, TEXTS, Ask, TrackChallenge, answer, draw, moved, secure_picks
from facedoor.config import ConfigError, parse_config
from facedoor.landmarks import Pose
from facedoor.liveness import LivenessUnavailable, gate_status, load_liveness
from facedoor.message import ChallengeMessage
from facedoor.models import Manifest

LR = ("left", "right")
ALL = ("left", "right", "up", "down")
FRONT = Pose(0.0, 0.0)
ASK = Ask("00000000000000aa", 3, "left", t=10.0, timeout_s=5.0, reference=FRONT)
DEG = 15.0
VIDEOS = ("data", "antispoof", "videos")


def poses(*yaws: float, t0: float = 10.1, dt: float = 0.1) -> list[tuple[float, Pose]]:
    """Head poses at YAWS (degrees, pitch 0), one frame every DT from T0."""
    return [(t0 + i * dt, Pose(y, 0.0)) for i, y in enumerate(yaws)]


# -- the rule (pure) -------------------------------------------------------------------------------


def test_moved_is_the_largest_turn_among_the_directions_asked_from_beyond_the_threshold() -> None:
    assert moved(FRONT, Pose(20, 0), LR, DEG) == "left" and moved(FRONT, Pose(-20, 0), LR, DEG) == "right"
    assert moved(FRONT, Pose(14.9, 0), LR, DEG) is None  # natural sway under the threshold answers nothing
    assert moved(FRONT, Pose(5, 30), LR, DEG) is None  # a nod means nothing when only left/right are asked
    assert moved(FRONT, Pose(18, 30), ALL, DEG) == "up" and moved(FRONT, Pose(18, -10), ALL, DEG) == "left"
    assert moved(Pose(20, 0), Pose(0, 0), LR, DEG) == "right"  # measured from the pose at the ask, not the camera


def test_a_turn_held_over_two_frames_after_the_ask_answers() -> None:
    assert SUSTAIN_FRAMES == 2
    assert answer(ASK, poses(0, 5, 20, 22), 10.5, LR, DEG) == "passed"
    assert answer(ASK, poses(0, 5, 20), 10.4, LR, DEG) == "pending"  # one frame is landmark noise as far as we know
    assert answer(ASK, poses(0, 20, 3, 21, 0), 10.6, LR, DEG) == "pending"  # never held
    assert answer(ASK, poses(0, -20, -25, 20, 20), 10.6, LR, DEG) == "wrong"  # the first held turn decides


def test_only_turns_between_the_ask_and_its_deadline_count() -> None:
    before = poses(20, 22, 25, t0=9.5)  # turned before the ask (a replay that happened to turn): never an answer
    assert answer(ASK, before, 10.0, LR, DEG) == "pending"
    assert answer(ASK, poses(20, 22, t0=15.05), 15.2, LR, DEG) == "timeout"  # too late
    assert answer(ASK, poses(0, 0, 0), 14.9, LR, DEG) == "pending"
    assert answer(ASK, poses(0, 0, 0), 15.01, LR, DEG) == "timeout"


def test_a_track_challenge_keeps_its_first_answer() -> None:
    challenge = TrackChallenge(ASK)
    assert challenge.see(10.1, Pose(-20, 0), LR, DEG) == "pending"
    assert challenge.see(10.2, None, LR, DEG) == "pending"  # a frame without a mesh neither answers nor breaks
    assert challenge.see(10.3, Pose(-21, 0), LR, DEG) == "wrong"
    assert challenge.see(10.4, Pose(20, 0), LR, DEG) == "wrong" and challenge.see(10.5, Pose(20, 0), LR, DEG) == "wrong"
    assert challenge.outcome.answer == "wrong" and challenge.outcome.direction == "left"


def test_the_draw_comes_from_the_injected_picks_and_secrets_draws_every_direction() -> None:
    ask = draw(iter([0xBEEF, 3]), 7, 1.0, FRONT, ALL, 4.0)
    assert (ask.id, ask.direction, ask.track, ask.t, ask.deadline) == ("000000000000beef", "down", 7, 1.0, 5.0)
    assert ask.text == TEXTS["down"]
    picks = secure_picks()
    seen = {draw(picks, 1, 0.0, FRONT, LR, 4.0).direction for _ in range(64)}  # misses one with p = 2**-63
    assert seen == set(LR)
    assert len({draw(picks, 1, 0.0, FRONT, LR, 4.0).id for _ in range(100)}) == 100


# -- config and the fail-closed start --------------------------------------------------------------


def test_challenge_config_defaults_bounds_and_the_gate_it_needs() -> None:
    cfg = parse_config({}).liveness
    assert (cfg.challenge, cfg.challenge_directions, cfg.required) == ("off", LR, None)
    assert parse_config(yaml.safe_load("liveness:\n  challenge: off\n")).liveness.challenge == "off"  # YAML: false
    on = parse_config({"liveness": {"challenge": "on_doubt", "challenge_directions": list(ALL)}}).liveness
    assert on.required == "liveness.challenge is on_doubt" and on.challenge_directions == ALL
    for bad, key in (({"challenge": "sometimes"}, "liveness.challenge"),
                     ({"challenge_timeout_s": 60}, "liveness.challenge_timeout_s"),
                     ({"challenge_degrees": 2}, "liveness.challenge_degrees"),
                     ({"challenge_directions": ["left"]}, "liveness.challenge_directions"),
                     ({"challenge_directions": ["left", "left"]}, "each direction at most once"),
                     ({"challenge": "always", "enabled": False}, "needs the gate")):
        with pytest.raises(ConfigError, match=key):
            parse_config({"liveness": bad}, "door.yaml")


def test_a_challenge_without_the_models_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "models": {}}))
    manifest = Manifest.load(tmp_path)
    with pytest.raises(LivenessUnavailable, match="liveness.challenge is always but antispoof_v2"):
        load_liveness(manifest, "auto", required="liveness.challenge is always")
    assert gate_status(tmp_path, "auto", "liveness.challenge is always").startswith(
        "liveness: the door refuses to start (liveness.challenge is always;")


def test_the_daemon_refuses_to_start_with_a_challenge_and_no_landmarks(real_models: Path, tmp_path: Path) -> None:
    """liveness.challenge: always on a door whose models lack the gate: exit 2 with one line, no door."""
    config = write_config(tmp_path / "facedoor.yaml", real_models, tmp_path / "none.db", 1,
                          liveness={"enabled": "auto", "challenge": "always"})
    proc = subprocess.run([str(FACEDOOR), "--config", str(config), "run", "--source", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "liveness.challenge is always" in last and "face_landmark" in last, proc.stderr[-2000:]


# -- the real daemon -------------------------------------------------------------------------------


def _denied(d: dict) -> bool:
    return d["decision"] == "deny" and d["identity"] == "apfol"


def _asked(messages: list[dict]) -> list[ChallengeMessage]:
    """The challenges the door published (QoS 1, never retained, expiring with the challenge)."""
    asked = [m for m in messages if m["topic"] == "facedoor/front/challenge"]
    assert asked and all(not m["retain"] and m["qos"] == 1 and m["expiry"] for m in asked), asked
    return [ChallengeMessage.model_validate_json(m["payload"]) for m in asked]


def test_a_still_stream_is_asked_never_answers_and_is_denied(gate_door, shared_dir: Path, mosquitto,
                                                             tmp_path: Path) -> None:
    """apfol's own live frame as the whole stream with the challenge always on and the gate slow to judge
    (min_frames 300, so only the challenge can decide): asked once, never turns, denied as a challenge
    timeout, never let in."""
    models, store = gate_door
    cap = cv2.VideoCapture(str(shared_dir.joinpath(*VIDEOS, "apfol_live.webm")))
    ok, frame = cap.read()
    cap.release()
    assert ok
    video = tmp_path / "still.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (frame.shape[1], frame.shape[0]))
    for _ in range(45):
        writer.write(frame)
    writer.release()
    config = write_config(tmp_path / "facedoor.yaml", models, store, mosquitto.port,
                          liveness={"enabled": True, "challenge": "always", "min_frames": 300,
                                    "challenge_timeout_s": 3.0})
    decisions, _, messages = run_gate_until(config, video, mosquitto, _denied)
    (ask,) = _asked(messages)
    assert ask.direction in LR and ask.text == TEXTS[ask.direction] and ask.expires_at_ms == ask.ts_ms + 3000
    assert not [d for d in decisions if d["decision"] == "unlock"], decisions
    deny = next(d for d in decisions if _denied(d))
    assert deny["reason"] == "challenge", decisions
    assert deny["challenge"] == {"id": ask.id, "direction": ask.direction, "answer": "timeout"}


def test_a_replay_video_is_asked_and_never_gets_in(gate_door, shared_dir: Path, mosquitto, tmp_path: Path) -> None:
    """apfol's face replayed on a screen with the challenge always on: asked, and denied (the gate's spoof,
    or the challenge when the replay's own turns go the wrong way), never let in."""
    models, store = gate_door
    config = write_config(tmp_path / "facedoor.yaml", models, store, mosquitto.port,
                          liveness={"enabled": True, "challenge": "always"}, policy={"unknown_interval_s": 1.0})
    decisions, _, messages = run_gate_until(config, shared_dir.joinpath(*VIDEOS, "apfol_spoof.webm"), mosquitto,
                                            _denied)
    ids = {ask.id for ask in _asked(messages)}
    assert not [d for d in decisions if d["decision"] == "unlock"], decisions
    denies = [d for d in decisions if _denied(d)]
    assert denies and all(d["reason"] in ("spoof", "challenge") for d in denies), decisions
    assert all(d["challenge"] is not None and d["challenge"]["id"] in ids for d in denies), (ids, denies)
