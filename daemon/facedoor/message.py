"""The decision message: one typed model of what the door publishes on `<prefix>/<door>/decision`.

The MQTT link sends `DecisionMessage.payload()`, signing covers exactly that object
(facedoor.signing), and the unlock action, the audit log, the demo and Home Assistant's templates
read the same fields. `facedoor schema decision` prints its JSON Schema (kept in
docs/decision.schema.json, checked by a test), with the example the Home Assistant templates are
tested against.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EXAMPLE: dict[str, Any] = {
    "id": "4b0f4d8e-2f53-4c52-9a0e-5f4d7f2d8c11", "door": "front", "decision": "unlock", "reason": "match",
    "identity": "alice", "distance": 0.4123, "threshold": 0.7, "frames": 4, "window": 5, "faces": 1,
    "unknown_near": 0, "live_score": 0.912, "liveness": "on",
    "challenge": {"id": "9f3c2a71d04e8b65", "direction": "left", "answer": "passed"},
    "ts": "2026-12-03T18:00:00.120Z", "ts_ms": 1796320800120, "ttl_s": 5.0, "expires_at_ms": 1796320805120,
    "latency_ms": 31.4,
}


Direction = Literal["left", "right", "up", "down"]


class ChallengeResult(BaseModel):
    """The active check of a visit, as its decision reports it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="the challenge's id, as published on the challenge topic")
    direction: Direction = Field(description="the way the face was asked to turn (left and right are the person's)")
    answer: Literal["pending", "passed", "wrong", "timeout"] = Field(
        description="passed (turned as asked), wrong (turned another way first), timeout (no answer in time), "
        "pending (a decision taken before it was answered, e.g. a spoof deny)")


class ChallengeMessage(BaseModel):
    """A challenge, as published on `<prefix>/<door>/challenge` (QoS 1, never retained, expiring with it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="unique id of this challenge (random, 16 hex digits)")
    door: str = Field(description="the door that asks (`door_id`)")
    track: int = Field(ge=0, description="the face track asked (several faces may be asked at once)")
    direction: Direction = Field(description="the way the face must turn (left and right are the person's own)")
    text: str = Field(description="the instruction for Home Assistant to speak")
    timeout_s: float = Field(gt=0, description="seconds from the ask to answer")
    ts: str = Field(description="capture time of the frame that asked, ISO 8601 UTC with milliseconds")
    ts_ms: int = Field(description="the same, milliseconds since the Unix epoch")
    expires_at_ms: int = Field(description="ts_ms + timeout_s: a turn after this does not answer")


class DecisionMessage(BaseModel):
    """An unlock or deny decision, as published (QoS 1, never retained, MQTT v5 Message Expiry)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [EXAMPLE]})

    id: str = Field(min_length=1, description="unique id of this decision (a UUID4); a consumer acts on an id once")
    door: str = Field(description="the door that decided (`door_id`)")
    decision: Literal["unlock", "deny"] = Field(description="unlock only for a member; everything else is deny")
    reason: Literal["match", "unknown", "lookalike", "spoof", "companion", "second_factor", "challenge"] = Field(
        description="match (unlock), unknown face, look-alike of a member (cohort), spoof (liveness gate), "
        "companion (a stranger near the door beside the member), second_factor (the member's second factor "
        "is missing: see `factor`), challenge (the face turned the wrong way or not in time: see `challenge`)")
    identity: str | None = Field(description="the member (also named in a look-alike, spoof or companion deny)")
    distance: float | None = Field(description="L2 distance of the visit's fused embedding to the member's "
                                   "template, cut (not rounded) to 4 decimals; null when nobody is enrolled")
    threshold: float = Field(description="a match is a distance strictly below this")
    frames: int = Field(ge=0, description="good frames of the visit nearest to the identity (unknown: all good)")
    window: int = Field(ge=0, description="all frames of the visit's face track")
    faces: int = Field(ge=0, description="every face in view in the deciding frame")
    unknown_near: int = Field(ge=0, description="faces near the door beside the deciding one that match no member")
    live_score: float | None = Field(description="the track's liveness score in [0, 1]; null when the gate is off")
    liveness: Literal["on", "off"] = Field(description="whether the liveness gate ran for this decision")
    factor: Literal["presence", "pin", "presence_or_pin"] | None = Field(
        None, description="unlock: the second factor that completed it (null: none needed); second_factor deny: "
        "the factor the member needs and did not have")
    factor_detail: str | None = Field(
        None, description="second_factor deny: what the door heard, e.g. `presence 42.0s old; wrong PIN`")
    challenge: ChallengeResult | None = Field(
        None, description="the active check put to this visit (`liveness.challenge`); null when none was asked")
    ts: str = Field(description="capture time of the deciding frame, ISO 8601 UTC with milliseconds")
    ts_ms: int = Field(description="the same, milliseconds since the Unix epoch")
    ttl_s: float = Field(gt=0, description="seconds the decision stays valid from its capture")
    expires_at_ms: int = Field(description="ts_ms + ttl_s: a consumer refuses the message after this")
    latency_ms: float = Field(ge=0, description="capture to publish, on the door's monotonic clock")
    sig: str | None = Field(None, description="HMAC-SHA256 of the canonical JSON of every other field "
                            "(facedoor.signing); present only when `mqtt.signing_key_file` is set")

    def payload(self) -> dict[str, Any]:
        """The JSON object as published (no `sig` member when unsigned)."""
        return self.model_dump(mode="json", exclude={"sig"} if self.sig is None else None)

    def signed(self, key: bytes) -> DecisionMessage:
        """This message with `sig` over every other field."""
        from facedoor.signing import sign

        return DecisionMessage.model_validate(sign(self.payload(), key))


def json_schema() -> dict[str, Any]:
    """The decision message's JSON Schema (draft 2020-12), with its example."""
    schema = DecisionMessage.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "facedoor/decision.schema.json", **schema}
