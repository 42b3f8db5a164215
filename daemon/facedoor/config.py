"""Typed, validated configuration (YAML file -> pydantic models).

Every section rejects unknown keys, wrong types and out-of-range values before anything
starts, and `load_config` turns pydantic's report into one message per problem that names the
file, the key path and what was expected. A config that does not validate never opens a door.
"""
from __future__ import annotations

import ipaddress
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from facedoor.models import default_models_dir

DEFAULT_CONFIG_PATH = Path("/etc/facedoor/facedoor.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/facedoor")
STORE_FILE = "store.db"
MAX_CONFIG_BYTES = 1_000_000  # a door's config is a few KB; anything larger is a mistake or an attack
SHOWN_INPUT_CHARS = 80        # an error message quotes at most this much of a bad value
MAX_CONFIG_DEPTH = 32         # mappings/lists nested deeper than this are refused (a config needs 4)


class ConfigError(ValueError):
    """The configuration file is missing, unparsable or invalid; the message says where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Section):
    """The camera (`facedoor run --source ...` overrides the source)."""

    source: int | str = Field(0, description="V4L2 index (0) or device (/dev/video0), an rtsp:// or http:// "
                              "stream, or a video file; credentials in URLs are masked in logs")
    width: int | None = Field(None, gt=0, description="requested capture width of a V4L2 camera (null: its default)")
    height: int | None = Field(None, gt=0, description="requested capture height (null: the camera's default)")
    fps: float | None = Field(None, gt=0, description="requested frame rate (null: the camera's default)")
    loop: bool = Field(False, description="restart a video file at its end instead of stopping")
    stall_timeout_s: float = Field(5.0, gt=0, le=300, description="no frame for this long = camera down: "
                                   "reported, nothing decided, reopened")
    reopen_backoff_initial_s: float = Field(0.5, gt=0, le=60, description="first wait before reopening; doubles")
    reopen_backoff_max_s: float = Field(10.0, gt=0, le=600, description="longest wait between reopen attempts")
    realtime: bool = Field(
        True, description="pace a video file at its own frame rate, as a live camera would deliver it"
    )


class RecognitionConfig(_Section):
    """The face pipeline: detector, alignment, encoder and the one threshold."""

    threshold: float = Field(
        0.7, gt=0, lt=2.0, description="a face matches a member when the L2 distance between embeddings is "
        "STRICTLY below this; lower = stricter (embeddings are unit vectors: 2.0 would match everyone)")
    encoder: Literal["facenet", "facenet_int8", "openface"] | None = Field(
        None, description="face encoder: facenet (160x160), facenet_int8 (the same network quantised to 8 bits, "
        "faster: README \"Speed\") or openface (96x96); null: the models' default_encoder, set by "
        "`facedoor-export --encoder`; the store pins it")
    detector: Literal["mtcnn", "yunet"] = Field(
        "mtcnn", description="face detector: mtcnn (exported with the models) or yunet (needs yunet_model)")
    yunet_model: Path | None = Field(None, description="YuNet ONNX file for detector: yunet")
    align: Literal["similarity", "box"] = Field(
        "similarity", description="alignment before encoding: similarity (5-landmark transform) or box (plain crop)")
    threads: int | None = Field(None, ge=1, le=64, description="ONNX Runtime threads (default: all cores)")
    max_faces: int = Field(
        3, ge=1, le=32, description="faces encoded per frame: the largest and, up to this many in all, the other "
        "faces near the door (policy.near_ratio); a face near the door left unencoded counts as a stranger")

    @model_validator(mode="after")
    def _yunet_needs_model(self) -> RecognitionConfig:
        if self.detector == "yunet" and self.yunet_model is None:
            raise ValueError("detector: yunet needs recognition.yunet_model (a YuNet .onnx path)")
        return self


FactorMode = Literal["none", "presence", "pin", "presence_or_pin"]
MAX_TOPIC_CHARS = 512
MAX_FACTOR_MEMBERS = 1000


def _exact_topic(value: str) -> str:
    """An MQTT topic to subscribe to exactly: no wildcards (another device must never match), no NUL."""
    if not value or any(ch in value for ch in "+#\0") or len(value) > MAX_TOPIC_CHARS:
        raise ValueError(f"must be one exact topic of 1-{MAX_TOPIC_CHARS} characters: no '+' or '#' wildcards "
                         "(a wildcard would let another device's messages count), no NUL")
    return value


def _member_name(name: str) -> str:
    """A member name as the store allows it (1-64 characters, no surrounding spaces)."""
    if not name or name != name.strip() or len(name) > 64:
        raise ValueError(f"member name {_shown(name)}: 1-64 characters without surrounding spaces")
    return name


class PresenceFactorConfig(_Section):
    """The member's phone or tag near the door, as an MQTT presence topic reports it (ESPresense, Home Assistant)."""

    topics: dict[str, str] = Field(
        ..., min_length=1, max_length=MAX_FACTOR_MEMBERS,
        description="member -> the exact topic reporting their phone or tag, e.g. ESPresense "
        "`espresense/devices/<device-id>/<room of the door's node>` (JSON with `distance`) or a Home Assistant "
        "device_tracker state topic (`home` / `not_home`)")
    max_age_s: float = Field(
        20.0, gt=0, le=3600, description="presence counts when last reported within this many seconds of the face "
        "(the door's receive time; retained messages never count)")
    max_distance_m: float | None = Field(
        None, gt=0, le=100, description="ESPresense: the reported distance must be at most this (None: any distance)")

    @field_validator("topics")
    @classmethod
    def _distinct_exact_topics(cls, value: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for member, topic in value.items():
            _member_name(member)
            try:
                _exact_topic(topic)
            except ValueError as exc:
                raise ValueError(f"{member}: {exc}") from None
            if topic in seen:
                raise ValueError(f"{_shown(topic)} is given for {seen[topic]} and {member}: a phone proves one member")
            seen[topic] = member
        return value


class PinFactorConfig(_Section):
    """A PIN typed on a keypad near the door (e.g. an ESPHome keypad publishing the code on a topic)."""

    topic: str = Field(..., description="the exact topic the keypad publishes each entered code on "
                       "(payload: the digits, or JSON with `code` or `pin`)")
    file: Path = Field(..., description="member:hash lines made by `facedoor pin-hash` (scrypt); owner-only (0600)")
    window_s: float = Field(30.0, gt=0, le=600, description="a correct PIN counts within this many seconds of the face")
    max_wrong: int = Field(5, ge=1, le=100, description="wrong PINs within `lockout_s` before the keypad is locked out")
    lockout_s: float = Field(
        300.0, gt=0, le=86400, description="the window counting wrong PINs, and how long every PIN is ignored after "
        "`max_wrong` of them (a locked-out keypad opens nothing, even with the right PIN)")

    @field_validator("topic")
    @classmethod
    def _exact(cls, value: str) -> str:
        return _exact_topic(value)


class SecondFactorConfig(_Section):
    """A second factor besides the face, for doors where a photo must never be enough (facedoor.factors)."""

    mode: FactorMode = Field(
        "none", description="what every member needs besides the face: none, presence (phone/tag near the door), "
        "pin (keypad), presence_or_pin")
    members: dict[str, FactorMode] = Field(
        default_factory=dict, max_length=MAX_FACTOR_MEMBERS, description="member -> mode, overriding `mode`")
    wait_s: float = Field(
        10.0, ge=0, le=600, description="how long a recognised member's face waits for the factor before the door "
        "sends a deny with reason second_factor (the face still unlocks if the factor comes while it is in view)")
    presence: PresenceFactorConfig | None = Field(
        None, description="the members' phones or tags near the door (needed by mode presence)")
    pin: PinFactorConfig | None = Field(None, description="a keypad near the door (needed by mode pin)")

    @field_validator("members")
    @classmethod
    def _member_names(cls, value: dict[str, FactorMode]) -> dict[str, FactorMode]:
        for member in value:
            _member_name(member)
        return value

    def mode_of(self, member: str) -> FactorMode:
        """The second factor MEMBER needs (`members` overrides `mode`)."""
        return self.members.get(member, self.mode)

    @property
    def enabled(self) -> bool:
        """True when anyone needs a second factor."""
        return self.mode != "none" or any(m != "none" for m in self.members.values())

    @model_validator(mode="after")
    def _sources_for_modes(self) -> SecondFactorConfig:
        modes = {self.mode, *self.members.values()}
        if "presence" in modes and self.presence is None:
            raise ValueError("mode presence needs second_factor.presence (topics per member)")
        if "pin" in modes and self.pin is None:
            raise ValueError("mode pin needs second_factor.pin (keypad topic and PIN file)")
        if "presence_or_pin" in modes and self.presence is None and self.pin is None:
            raise ValueError("mode presence_or_pin needs second_factor.presence or second_factor.pin")
        if self.presence is not None and self.pin is not None and self.pin.topic in self.presence.topics.values():
            raise ValueError(f"pin.topic {_shown(self.pin.topic)} is also a presence topic")
        return self


class PolicyConfig(_Section):
    """The door decides per visit, on face tracks (facedoor.judge): a track unlocks when its fused
    embedding is strictly below the threshold for one member AND most of its good frames were
    nearest to that member AND (with a cohort) it is no look-alike AND (with the liveness gate) it
    looks live AND no stranger stands near the door beside it."""

    cooldown_s: float = Field(10.0, ge=0, le=3600, description="one visit, one unlock: that person is not "
                              "unlocked again for this many seconds")
    unknown_interval_s: float = Field(5.0, ge=0, le=3600, description="denies (unknown, look-alike, spoof, "
                                      "companion) are sent at most this often, per reason")
    min_good_frames: int = Field(3, ge=1, le=100, description="good frames a face track needs before its fused "
                                 "embedding decides")
    companions: Literal["deny", "allow"] = Field(
        "deny", description="deny: an unlock needs every face near the door to be a member, else a deny with "
        "reason companion (no tailgating stranger); allow: members let companions in, counted in unknown_near")
    near_ratio: float = Field(
        0.35, gt=0, le=1, description="a face at least this fraction of the largest face's size is near the door: "
        "it is encoded, it decides, and a stranger there counts as a companion; smaller faces are only counted. "
        "Face size falls with distance: a member at arm's length (0.6 m) and a tailgater one or two steps behind "
        "(1.35 / 2.1 m) show at 0.44 / 0.29 of the member's size")
    door_templates: int = Field(
        0, ge=0, le=20, description="door templates kept per person (0: off): after an unlock below "
        "door_template_below the visit's fused embedding is stored for that person, oldest replaced first")
    door_template_below: float = Field(
        0.5, gt=0, le=4.0, description="fused distance an unlock must be below to add one")
    cohort_margin: float = Field(
        0.2, ge=0, le=2.0, description="with a cohort stored (`facedoor cohort DIR`): an unlock needs the visit "
        "nearer its member than any cohort face by this much, else a deny with reason lookalike")
    second_factor: SecondFactorConfig = Field(
        default_factory=SecondFactorConfig, description="a phone nearby or a PIN besides the face (default: none)")


class TrackingConfig(_Section):
    """Following one face across frames (facedoor.track)."""

    iou_min: float = Field(0.3, gt=0, lt=1, description="box overlap (IoU) that continues a face track")
    max_gap_s: float = Field(1.0, gt=0, le=60, description="a track not seen for this long ends")
    swap_distance: float = Field(1.1, gt=0, le=4.0, description="a good frame this far from its track starts a new one")


class QualityConfig(_Section):
    """The one quality floor: the detector keeps no smaller or less certain face, and a face track
    fuses only frames at or above it, weighted by size x sharpness x score up to the `full_*` values."""

    min_face_size: int = Field(40, ge=12, le=2000, description="smallest face side in pixels that is detected")
    min_detect_score: float = Field(0.9, gt=0, lt=1, description="the detector's score cut-off")
    min_sharpness: float = Field(
        100.0, ge=0, description="variance of the Laplacian of the face below which a frame only keeps its track alive")
    full_face_size: float = Field(112.0, gt=0, description="face side in pixels at which size stops adding weight")
    full_sharpness: float = Field(400.0, gt=0, description="sharpness at which it stops adding weight")


class TLSConfig(_Section):
    """TLS to the broker: omit (null) for plain TCP; ca alone authenticates the server, cert + key add a
    client certificate."""

    ca: Path | None = Field(None, description="CA certificate file, e.g. /etc/facedoor/ca.crt")
    cert: Path | None = Field(None, description="client certificate file, e.g. /etc/facedoor/client.crt")
    key: Path | None = Field(None, description="client key file, e.g. /etc/facedoor/client.key")

    @model_validator(mode="after")
    def _cert_with_key(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mqtt.tls.cert and mqtt.tls.key must be given together")
        return self


def plain_topic(value: str) -> str:
    """VALUE as a topic prefix: levels without wildcards ('+', '#'), NUL or empty levels ('a//b', '/a', 'a/')."""
    if any(ch in value for ch in "+#\0") or "" in value.split("/"):
        raise ValueError("must be a plain topic: no '+' or '#' wildcards, no NUL, no empty level "
                         "(no leading, trailing or double '/')")
    return value


class DiscoveryConfig(_Section):
    """Home Assistant MQTT discovery: the door appears as a device (README "Home Assistant")."""

    enabled: bool = Field(True, description="publish the retained discovery message")
    prefix: str = Field("homeassistant", min_length=1, description="Home Assistant's discovery prefix (a plain "
                        "topic: no + or # wildcards, no empty level)")

    _plain = field_validator("prefix")(plain_topic)


class MQTTConfig(_Section):
    """The broker. Topics: <topic_prefix>/<door_id>/status (retained online/offline, Last Will offline),
    .../decision (QoS 1, never retained, expires after decision_ttl_s), .../health (periodic JSON)."""

    host: str = Field("127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    topic_prefix: str = Field("facedoor", min_length=1, description="first level of every topic of this door")
    client_id: str | None = Field(None, description="MQTT client id (null: facedoor-<door_id>)")
    username: str | None = Field(None, description="broker user name (null: anonymous)")
    password_file: Path | None = Field(
        None, description="file holding the broker password (one line; mode 0640, owner root, group facedoor); "
        "never logged, e.g. /etc/facedoor/mqtt-password")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive")
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="first reconnect wait; doubles")
    reconnect_max_s: float = Field(5.0, gt=0, le=300, description="longest reconnect wait")
    health_interval_s: float = Field(10.0, gt=0, le=3600, description="seconds between health messages")
    ack_timeout_s: float = Field(
        1.0, ge=0.1, le=10, description="a QoS 1 message unacknowledged this long means the broker stalled "
        "(paused, TCP still up): an outage, nothing decided; a decision counts as delivered, and the unlock "
        "action follows it, only once acknowledged within this time"
    )
    tls: TLSConfig | None = Field(None, description="TLS to the broker (null: plain TCP)")
    allow_plaintext_password: bool = Field(
        False, description="send the password without TLS to a non-loopback broker (readable on the network)"
    )
    signing_key_file: Path | None = Field(
        None, description="HMAC-SHA256 key signing every decision (at least 32 bytes, mode 0600, owned by the "
        "door's user; `head -c 32 /dev/urandom | base64`), e.g. /etc/facedoor/signing-key; algorithm: "
        "facedoor/signing.py")
    discovery: DiscoveryConfig = Field(DiscoveryConfig(), description="Home Assistant MQTT discovery: the door "
                                       "appears as a device (README \"Home Assistant\")")

    _plain = field_validator("topic_prefix")(plain_topic)

    @model_validator(mode="after")
    def _no_plaintext_password(self) -> MQTTConfig:
        if self.password_file is not None and self.tls is None and not self.allow_plaintext_password \
                and not _is_loopback(self.host):
            raise ValueError(
                f"mqtt.password_file with a broker at {_shown(self.host)} but no mqtt.tls: the password would "
                "cross the network in clear text; configure mqtt.tls (or set mqtt.allow_plaintext_password: true)"
            )
        return self

    def password(self) -> SecretStr | None:
        """The broker password read from `password_file` (never stored in the config itself)."""
        if self.password_file is None:
            return None
        try:
            return SecretStr(self.password_file.read_text().strip())
        except OSError as exc:
            raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {exc.strerror}") from exc


def _is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses, where a plaintext password never leaves the machine."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnlockActionConfig(_Section):
    """Optional: drive a lock or relay directly with each acknowledged unlock (QoS 1, never retained,
    Message Expiry = the remaining TTL; a JSON payload gains expires_at_ms and, with
    mqtt.signing_key_file, id and sig). See config/unlock-*.yaml."""

    topic: str = Field(..., min_length=1, description="e.g. zigbee2mqtt/front_door/set")
    payload: str = Field(..., description='sent with an unlock decision, e.g. {"state": "UNLOCK"}')
    lock_payload: str = Field(
        ..., description="sent to relock, and at once behind an unlock the broker did not acknowledge in time"
    )
    relock_after_s: float | None = Field(None, gt=0, le=600, description="relock this long after an unlock")

    @field_validator("topic")
    @classmethod
    def _publishable(cls, value: str) -> str:
        if any(ch in value for ch in "+#\0"):
            raise ValueError("must be a topic to publish on: no '+' or '#' wildcards (and no NUL)")
        return value


class AuditConfig(_Section):
    """Local audit log of every decision (JSON lines), size- and age-bounded; `facedoor audit` prints it."""

    enabled: bool = Field(True, description="write the audit log")
    path: Path | None = Field(None, description="default: <state_dir>/audit.jsonl")
    max_bytes: int = Field(50_000_000, ge=10_000, description="rotate the log beyond this size")
    max_age_days: float = Field(90.0, gt=0, description="drop entries (and crops) older than this")
    save_crops: bool = Field(False, description="also keep the face crops of each decision as JPEG files, and "
                             "the visit's fused embedding (the web console's \"this is X\" and \"this was not X\" "
                             "need them)")
    required: bool = Field(
        False, description="fail closed on the audit: each unlock is written to the log before it is sent, and "
        "not sent when that fails (health audit: failing); the door does not start when the log cannot be "
        "written. Denies are never held back")

    @model_validator(mode="after")
    def _required_needs_enabled(self) -> AuditConfig:
        if self.required and not self.enabled:
            raise ValueError("audit.required needs audit.enabled: true")
        return self


class LoggingConfig(_Section):
    """The door's log on stderr (the journal under systemd)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="DEBUG, INFO, WARNING, ERROR")
    format: Literal["text", "json"] = Field("text", description="text (key=value) or json (one object per line)")


class LivenessConfig(_Section):
    """Presentation-attack gate (facedoor.liveness): a track of a member unlocks only once its texture
    (MiniFASNet) and its motion (MediaPipe face mesh: blinks, gaze, a head's non-planar turn) both say
    live, and never while its landmarks fit one plane or stand still. Every decision and health
    message says `liveness: on|off`. An optional active challenge asks the face to turn its head.
    Models: facedoor-export --only antispoof,landmarks."""

    enabled: Literal["auto"] | bool = Field(
        "auto", description="auto: on when the antispoof and landmarks models are exported, else off with a log "
                            "line; true: the door refuses to start without them (exit 2); false: off")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="mean MiniFASNet live score a track needs, the texture part of the rule "
                                      "(default: the rule's own, chosen by benchmarks/liveness.py)")
    min_frames: int | None = Field(
        None, ge=10, le=300, description="frames of evidence before a track can be judged (default: the rule's, 10)")
    challenge: Literal["off", "always", "on_doubt"] = Field(
        "off", description="active check (facedoor.challenge): the door publishes an instruction on "
        "<prefix>/<door>/challenge (e.g. turn your head to the left) and the member's face must turn that way "
        "within challenge_timeout_s, or it is denied (reason challenge). off; always: every member's visit, "
        "asked as soon as it is recognised; on_doubt: only visits the gate has not called live within "
        "challenge_after_s. Never instead of the gate, always on top of it; needs the gate's models (the door "
        "refuses to start without them, exit 2)")
    challenge_after_s: float = Field(
        1.5, ge=0, le=30, description="on_doubt: seconds from a visit's first frame the gate has to call it live "
        "before the challenge is asked")
    challenge_timeout_s: float = Field(
        5.0, ge=2, le=15, description="seconds the face has to answer a challenge from the moment it is asked")
    challenge_degrees: float = Field(
        15.0, ge=8, le=45, description="head turn (yaw, or pitch for up/down) from the pose at the ask that "
        "answers, held over 2 frames")
    challenge_directions: tuple[Literal["left", "right", "up", "down"], ...] = Field(
        ("left", "right"), min_length=2, max_length=4, description="directions drawn from, uniformly at random "
        "per challenge (a replay guesses right 1 time in as many); left and right are the member's own")

    @field_validator("challenge", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        """YAML 1.1 (PyYAML) reads an unquoted `challenge: off` as false: it means "off"."""
        return "off" if value is False else value

    @field_validator("challenge_directions")
    @classmethod
    def _distinct_directions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("each direction at most once")
        return value

    @model_validator(mode="after")
    def _challenge_needs_gate(self) -> LivenessConfig:
        if self.challenge != "off" and self.enabled is False:
            raise ValueError(f"challenge: {self.challenge} needs the gate's models and mesh: set enabled auto or true")
        return self

    @property
    def required(self) -> str | None:
        """Why the gate's models must be there (the door refuses to start without them), None when optional."""
        if self.enabled is True:
            return "liveness.enabled is true"
        return f"liveness.challenge is {self.challenge}" if self.challenge != "off" else None


class IdleConfig(_Section):
    """Idle gating: while the scene is still and no face is in view the detector runs detect_fps times a
    second; motion or a face switches to every frame for active_hold_s (facedoor.motion)."""

    enabled: bool = Field(True, description="skip the detector on a still, empty scene (see facedoor.motion)")
    detect_fps: float = Field(3.0, gt=0, le=60, description="detector passes per second while idle")
    active_hold_s: float = Field(2.0, ge=0, le=60, description="full rate this long after the last motion or face")
    motion_height: int = Field(48, ge=16, le=480, description="rows of the grey thumbnail compared for motion")
    pixel_threshold: float = Field(
        0.6, gt=0, le=10, description="changed pixel: differs by this many standard deviations")
    min_area: float = Field(0.004, gt=0, lt=1, description="motion: at least this fraction of the thumbnail changed")
    lightning_area: float = Field(0.6, gt=0, le=1, description="a change over this fraction is light, not motion")
    background_alpha: float = Field(0.2, gt=0, le=1, description="weight of each frame in the running background")

    @model_validator(mode="after")
    def _area_order(self) -> IdleConfig:
        if self.min_area >= self.lightning_area:
            raise ValueError(
                f"idle.min_area ({self.min_area}) must be below idle.lightning_area ({self.lightning_area})")
        return self


class WebConfig(_Section):
    """`facedoor web`: the operator's console, its own process beside the door (facedoor.web)."""

    host: str = Field("127.0.0.1", min_length=1, description="address the console listens on; a non-loopback "
                      "address needs tls_cert and tls_key (or allow_insecure_bind: true)")
    port: int = Field(8080, ge=1, le=65535, description="TCP port of the console")
    tls_cert: Path | None = Field(None, description="PEM certificate: the console serves HTTPS with it")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    allow_insecure_bind: bool = Field(
        False, description="serve plain HTTP on a non-loopback address (passwords and faces readable on the network)")
    users_file: Path | None = Field(None, description="argon2id password hashes (default <state_dir>/web-users.json)")
    session_hours: float = Field(12.0, gt=0, le=720, description="a login lasts this long, then sign in again")
    login_attempts_per_minute: int = Field(5, ge=1, le=100, description="login attempts per client per minute")
    crop_retention_days: float | None = Field(
        None, gt=0, le=3650, description="audit face crops older than this are removed by the console, hourly "
        "(default: kept as long as the audit log, audit.max_age_days); admins can change it on the status page")
    max_upload_mb: int = Field(16, ge=1, le=128, description="largest photo the console accepts in an upload")

    @model_validator(mode="after")
    def _tls_or_loopback(self) -> WebConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("web.tls_cert and web.tls_key must be given together")
        if self.tls_cert is None and not self.allow_insecure_bind and not _is_loopback(self.host):
            raise ValueError(
                f"web.host {_shown(self.host)} is not a loopback address and no web.tls_cert is configured: "
                "passwords and faces would cross the network in clear text; configure web.tls_cert/web.tls_key "
                "(or set web.allow_insecure_bind: true)")
        return self


class FleetConfig(_Section):
    """Several doors, one membership (facedoor.fleet): the site roster over the MQTT broker."""

    site: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$",
                      description="site name: every door of the site shares its roster (topic <prefix>/site/<site>/)")
    key_file: Path = Field(..., description="site key (>= 32 bytes, owner-only, the same file at every door): "
                           "seals and authenticates every roster entry (AES-GCM, HKDF-derived keys)")
    max_roster_age_s: float = Field(
        4 * 3600.0, gt=0, le=7 * 86400, description="cut off from the broker, a door keeps deciding on its last "
        "confirmed roster this long, then denies everyone (a revocation it missed is honoured at most this late)")
    publish_timeout_s: float = Field(
        5.0, gt=0, le=60, description="how long a publisher (enroll, remove, cohort) waits for the broker")
    anchor_doors: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]] = Field(
        default_factory=list, max_length=16, description="doors whose roster records this door must keep hearing "
        "(each door publishes one every mqtt.health_interval_s), e.g. the doors of the main site seen across a "
        "bridge: with none heard for max_roster_age_s the roster counts as unconfirmed and the door denies "
        "everyone, as when its own broker is gone (a bridge that is down cannot hide a revocation for longer). "
        "Default: none (a connected door trusts its own broker's roster)")


class FacedoorConfig(_Section):
    door_id: str = Field("front", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="name of this door: part of "
                         "every MQTT topic (<mqtt.topic_prefix>/<door_id>/...); letters, digits, '_' and '-'")
    state_dir: Path = Field(DEFAULT_STATE_DIR, description="where the door keeps its state (systemd's "
                            "StateDirectory=facedoor); the store and the audit log live here unless set")
    models: Path = Field(default_factory=default_models_dir, description="models directory written by "
                         "`facedoor-export --out DIR`; every file's SHA-256 is checked against its manifest")
    store: Path = Field(DEFAULT_STATE_DIR / STORE_FILE, description=f"the embedding store (SQLite) written by "
                        f"`facedoor enroll`; default: <state_dir>/{STORE_FILE}")
    decision_ttl_s: float = Field(5.0, gt=0, le=60, description="seconds a decision stays valid from its frame's "
                                  "capture: sent as MQTT v5 Message Expiry, never published later")
    camera: CameraConfig = CameraConfig()
    recognition: RecognitionConfig = RecognitionConfig()
    policy: PolicyConfig = PolicyConfig()
    tracking: TrackingConfig = TrackingConfig()
    quality: QualityConfig = QualityConfig()
    mqtt: MQTTConfig = MQTTConfig()
    unlock_action: UnlockActionConfig | None = None
    audit: AuditConfig = AuditConfig()
    idle: IdleConfig = IdleConfig()
    logging: LoggingConfig = LoggingConfig()
    liveness: LivenessConfig = LivenessConfig()
    web: WebConfig = WebConfig()
    fleet: FleetConfig | None = Field(None, description="site roster shared by several doors (off when absent)")

    @model_validator(mode="before")
    @classmethod
    def _derived_paths(cls, data: Any) -> Any:
        """The store defaults to <state_dir>/store.db: one setting moves all the door's state."""
        if isinstance(data, dict) and "store" not in data:
            data = {**data, "store": Path(data.get("state_dir") or DEFAULT_STATE_DIR) / STORE_FILE}
        return data

    @model_validator(mode="after")
    def _anchors_are_other_doors(self) -> FacedoorConfig:
        """A door cannot vouch for its own roster, and anchors must be able to beat within the age."""
        if self.fleet is not None and self.fleet.anchor_doors:
            if self.door_id in self.fleet.anchor_doors:
                raise ValueError(f"fleet.anchor_doors lists this door itself ({self.door_id}): list other doors")
            if self.fleet.max_roster_age_s < 3 * self.mqtt.health_interval_s:
                raise ValueError(f"fleet.max_roster_age_s ({self.fleet.max_roster_age_s:g}s) must be at least 3 "
                                 f"mqtt.health_interval_s ({self.mqtt.health_interval_s:g}s) with anchor_doors: "
                                 "the anchors publish their records at that interval")
        return self

    def topic(self, leaf: str) -> str:
        """`<topic_prefix>/<door_id>/<leaf>`, e.g. facedoor/front/decision."""
        return f"{self.mqtt.topic_prefix}/{self.door_id}/{leaf}"


_REPR = reprlib.Repr()  # bounded: never walks or copies more of a value than it shows
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = SHOWN_INPUT_CHARS, SHOWN_INPUT_CHARS, 40


def _shown(value: Any) -> str:
    """A bounded repr of a config value for an error message (a huge value is never expanded)."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_INPUT_CHARS else text[:SHOWN_INPUT_CHARS - 3] + "..."


def _describe(err: Any) -> str:
    path = ".".join(str(p)[:SHOWN_INPUT_CHARS] for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {_shown(got)})"
    return f"{path}: {err['msg'][:4 * SHOWN_INPUT_CHARS]}{shown}"


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (a config never needs them, billion laughs does)
    and nesting deeper than MAX_CONFIG_DEPTH (the composer recurses once per level)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases (&name, *name) are not allowed in a facedoor config",
                event.start_mark,
            )
        if self._depth >= MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_CONFIG_DEPTH} levels; a facedoor config needs 4",
                event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line: `FILE:LINE:COLUMN: not valid YAML: PROBLEM` (PyYAML's own report spans lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else str(problem)
    return f"{where}: not valid YAML: {' '.join(text.split())[:4 * SHOWN_INPUT_CHARS]}"


def parse_config(raw: Any, source: str = "<config>") -> FacedoorConfig:
    """Validate already-parsed YAML; a ConfigError lists every bad key of SOURCE."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(raw).__name__}")
    try:
        return FacedoorConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_url=False))
        raise ConfigError(f"{source}: invalid configuration: {problems}") from None


def load_config(path: str | Path | None) -> FacedoorConfig:
    """Load and validate PATH; None means built-in defaults."""
    if path is None:
        return FacedoorConfig()
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration ({exc.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a facedoor configuration")
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)  # a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_error(path, exc)) from None
    return parse_config(raw, str(path))
