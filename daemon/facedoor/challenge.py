"""The active liveness check (`liveness.challenge`): the door asks a member's face to turn its head, and
the face's track must answer within a few seconds.

A replayed video or a still was recorded before the door asked: a still never turns, and a video
that happens to turn has picked its direction already, so it answers right one time in as many
directions as the door draws from (`liveness.challenge_directions`, drawn with `secrets`) and is
denied the rest. It does not stop a live accomplice, a person wearing a mask that turns, or a
deepfake puppet driven live (README "Photos and screens").

Three parts:
- the rule, pure: `moved` (which way a pose has turned from the pose at the ask) and `answer` (the
  outcome from the poses seen since the ask: pending, passed, wrong or timeout). An answer is a
  turn of at least `challenge_degrees` from the pose at the ask, held over `SUSTAIN_FRAMES`
  consecutive frames captured after the ask and before it expires; the first such turn decides,
  a turn the wrong way is a deny like a timeout. `facedoor.judge` keeps one `TrackChallenge` per
  member track and emits each `Ask` once;
- the head pose itself comes from the face mesh (`facedoor.landmarks.head_pose`);
- `ChallengeAnnouncer`: the listener that publishes each ask on `<prefix>/<door>/challenge`
  (QoS 1, never retained, expiring with the challenge) for Home Assistant to speak.
"""
from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from facedoor.formatting import iso_utc
from facedoor.landmarks import Pose

if TYPE_CHECKING:
    from facedoor.camera import Frame
    from facedoor.config import FacedoorConfig
    from facedoor.mqtt import MqttHooks

log = logging.getLogger(__name__)

Direction = Literal["left", "right", "up", "down"]
Answer = Literal["pending", "passed", "wrong", "timeout"]
SUSTAIN_FRAMES = 2  # consecutive frames the turn must hold: one frame of landmark noise never answers
TEXTS: dict[Direction, str] = {
    "left": "Please turn your head to your left",
    "right": "Please turn your head to your right",
    "up": "Please lift your chin and look up",
    "down": "Please lower your chin and look down",
}


def secure_picks() -> Iterator[int]:
    """An endless stream of 64-bit random numbers from `secrets`: the judge's draws (tests inject their own)."""
    while True:
        yield secrets.randbits(64)


@dataclass(frozen=True)
class Ask:
    """A challenge put to one face track: its id, the direction asked, when (capture time of the ask
    frame, the door's monotonic clock), how long it stands, and the head pose it is measured from."""

    id: str
    track: int
    direction: Direction
    t: float
    timeout_s: float
    reference: Pose

    @property
    def text(self) -> str:
        """What Home Assistant says."""
        return TEXTS[self.direction]

    @property
    def deadline(self) -> float:
        """The last capture time an answer may come from."""
        return self.t + self.timeout_s


@dataclass(frozen=True)
class Outcome:
    """A challenge's state as a decision reports it."""

    id: str
    direction: Direction
    answer: Answer


def moved(reference: Pose, pose: Pose, directions: Sequence[Direction], degrees: float) -> Direction | None:
    """Which of DIRECTIONS POSE has turned furthest from REFERENCE, if by at least DEGREES; else None."""
    dyaw, dpitch = pose.yaw - reference.yaw, pose.pitch - reference.pitch
    change = {"left": dyaw, "right": -dyaw, "up": dpitch, "down": -dpitch}
    best = max(directions, key=lambda d: change[d])
    return best if change[best] >= degrees else None


def answer(ask: Ask, poses: Sequence[tuple[float, Pose]], t: float, directions: Sequence[Direction],
           degrees: float) -> Answer:
    """The outcome of ASK at capture time T from the head POSES (capture time, pose) of its track: pure.

    Only poses captured after the ask and by its deadline count; the first turn of DEGREES held over
    SUSTAIN_FRAMES consecutive poses decides (passed when it is the direction asked, else wrong);
    without one, timeout once T is past the deadline, else pending."""
    streak: tuple[Direction | None, int] = (None, 0)
    for when, pose in poses:
        if when <= ask.t or when > ask.deadline:
            continue
        way = moved(ask.reference, pose, directions, degrees)
        streak = (way, streak[1] + 1 if way is not None and way == streak[0] else int(way is not None))
        if streak[1] >= SUSTAIN_FRAMES:
            return "passed" if way == ask.direction else "wrong"
    return "timeout" if t > ask.deadline else "pending"


@dataclass
class TrackChallenge:
    """One track's challenge: its ask, the poses seen since, and its answer (final once not pending)."""

    ask: Ask
    poses: list[tuple[float, Pose]] = field(default_factory=list)
    state: Answer = "pending"

    def see(self, t: float, pose: Pose | None, directions: Sequence[Direction], degrees: float) -> Answer:
        """Record the pose of the track's frame at T (None: no mesh this frame) and return the answer."""
        if self.state == "pending":
            if pose is not None and self.ask.t < t <= self.ask.deadline:
                self.poses.append((t, pose))
            self.state = answer(self.ask, self.poses, t, directions, degrees)
        return self.state

    @property
    def outcome(self) -> Outcome:
        """What the decision reports."""
        return Outcome(self.ask.id, self.ask.direction, self.state)


def draw(picks: Iterator[int], track: int, t: float, reference: Pose, directions: Sequence[Direction],
         timeout_s: float) -> Ask:
    """A new challenge for TRACK at T: its id and its direction (uniform over DIRECTIONS) from PICKS."""
    ident = f"{next(picks):016x}"
    return Ask(ident, track, directions[next(picks) % len(directions)], t, timeout_s, reference)


# --- the MQTT side -----------------------------------------------------------------------------
class ChallengeAnnouncer:
    """Publishes each ask on `<prefix>/<door>/challenge` (QoS 1, never retained, MQTT v5 expiry = its timeout)."""

    def __init__(self, cfg: FacedoorConfig, link: MqttHooks):
        self.door = cfg.door_id
        self.topic = cfg.topic("challenge")
        self.link = link
        self.sent = 0

    def on_ask(self, ask: Ask, frame: Frame) -> None:
        """Publish ASK, made on FRAME; a lost ask is logged (the face then times out and is denied)."""
        from facedoor.message import ChallengeMessage

        expires = frame.t_wall + ask.timeout_s
        message = ChallengeMessage(id=ask.id, door=self.door, track=ask.track, direction=ask.direction,
                                   text=ask.text, timeout_s=ask.timeout_s, ts=iso_utc(frame.t_wall),
                                   ts_ms=int(frame.t_wall * 1000), expires_at_ms=int(expires * 1000))
        sent = self.link.publish(self.topic, json.dumps(message.model_dump(mode="json")), retain=False,
                                 expiry_s=ask.timeout_s)
        self.sent += int(sent)
        log.info("challenge %s: %s (track %d)", ask.id, ask.direction, ask.track, extra={"fields": {
            "event": "challenge", "id": ask.id, "track": ask.track, "direction": ask.direction, "sent": sent}})
