"""Typed, validated configuration (YAML file -> pydantic models).

Every section rejects unknown keys, wrong types and out-of-range values before anything
starts, and `load_config` turns pydantic's report into one message per problem that names the
file, the key path and what was expected. A config that does not validate never opens a door.
"""
from __future__ import annotations

import ipaddress
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from facedoor.models import default_models_dir

DEFAULT_CONFIG_PATH = Path("/etc/facedoor/facedoor.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/facedoor")
MAX_CONFIG_BYTES = 1_000_000  # a door's config is a few KB; anything larger is a mistake or an attack
SHOWN_INPUT_CHARS = 80        # an error message quotes at most this much of a bad value


class ConfigError(ValueError):
    """The configuration file is missing, unparsable or invalid; the message says where."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Section):
    source: int | str = Field(0, description="V4L2 index or device path, RTSP/HTTP URL or video file")
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    fps: float | None = Field(None, gt=0)
    loop: bool = Field(False, description="restart a video file at its end instead of stopping")
    stall_timeout_s: float = Field(5.0, gt=0, le=300)
    reopen_backoff_initial_s: float = Field(0.5, gt=0, le=60)
    reopen_backoff_max_s: float = Field(10.0, gt=0, le=600)
    realtime: bool = Field(
        True, description="pace a video file at its own frame rate, as a live camera would deliver it"
    )


class RecognitionConfig(_Section):
    threshold: float = Field(
        0.7, gt=0, lt=2.0, description="a match is an L2 distance strictly below this (unit vectors: 2.0 matches all)"
    )
    encoder: Literal["facenet", "facenet_int8", "openface"] | None = Field(
        None, description="face encoder (default: the models' default_encoder, set by `facedoor-export --encoder`: "
        "facenet_int8 where the CPU has an 8-bit dot product, else facenet); the store pins it"
    )
    detector: Literal["mtcnn", "yunet"] = "mtcnn"
    yunet_model: Path | None = Field(None, description="YuNet ONNX file for detector: yunet")
    align: Literal["similarity", "box"] = "similarity"
    min_face_size: int = Field(40, ge=12, le=2000, description="smallest face side in pixels")
    detect_score: float = Field(0.9, gt=0, lt=1)
    threads: int | None = Field(None, ge=1, le=64, description="ONNX Runtime threads (default: all cores)")
    max_faces: int = Field(3, ge=1, le=32, description="faces encoded per frame: the largest and those near it")
    encode_ratio: float = Field(
        0.5, gt=0, le=1, description="encode a face only if its size is at least this fraction of the largest's"
    )

    @model_validator(mode="after")
    def _yunet_needs_model(self) -> RecognitionConfig:
        if self.detector == "yunet" and self.yunet_model is None:
            raise ValueError("detector: yunet needs recognition.yunet_model (a YuNet .onnx path)")
        return self


class PolicyConfig(_Section):
    cooldown_s: float = Field(10.0, ge=0, le=3600, description="one visit, one unlock: no second unlock this soon")
    unknown_interval_s: float = Field(5.0, ge=0, le=3600, description="at most one deny of each reason per interval")
    min_good_frames: int = Field(3, ge=1, le=100, description="good frames a face track needs before a decision")
    companions: Literal["deny", "allow"] = Field(
        "deny", description="deny: an unlock needs every face near the door to be a member; allow: only count them")
    companion_ratio: float = Field(
        0.5, gt=0, le=1, description="a face at least this fraction of the largest face's size is near the door")
    door_templates: int = Field(
        0, ge=0, le=20, description="door templates kept per person after confident unlocks (0: off)")
    door_template_below: float = Field(
        0.5, gt=0, le=4.0, description="fused distance an unlock must be below to add one")
    cohort_margin: float = Field(
        0.2, ge=0, le=2.0, description="with a cohort stored (`facedoor cohort DIR`): an unlock needs the visit "
        "nearer its member than any cohort face by this much, else a deny with reason lookalike")


class TrackingConfig(_Section):
    iou_min: float = Field(0.3, gt=0, lt=1, description="box overlap (IoU) that continues a face track")
    max_gap_s: float = Field(1.0, gt=0, le=60, description="a track not seen for this long ends")
    swap_distance: float = Field(1.1, gt=0, le=4.0, description="a good frame this far from its track starts a new one")
    min_face_size: int = Field(40, ge=12, le=2000, description="quality floor: face side in pixels")
    min_sharpness: float = Field(100.0, ge=0, description="quality floor: variance of the Laplacian of the face")
    min_detect_score: float = Field(0.9, ge=0, le=1, description="quality floor: detector score")
    full_face_size: float = Field(112.0, gt=0, description="face side in pixels at which size stops adding weight")
    full_sharpness: float = Field(400.0, gt=0, description="sharpness at which it stops adding weight")


class TLSConfig(_Section):
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mqtt.tls.cert and mqtt.tls.key must be given together")
        return self


class DiscoveryConfig(_Section):
    enabled: bool = True
    prefix: str = Field("homeassistant", min_length=1)


class MQTTConfig(_Section):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = Field("facedoor", min_length=1)
    client_id: str | None = None
    username: str | None = None
    password_file: Path | None = None
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(0.5, gt=0, le=60)
    reconnect_max_s: float = Field(5.0, gt=0, le=300)
    health_interval_s: float = Field(10.0, gt=0, le=3600)
    ack_timeout_s: float = Field(
        1.0, ge=0.1, le=10, description="a QoS 1 message unacknowledged this long means the broker stalled"
    )
    tls: TLSConfig | None = None
    allow_plaintext_password: bool = Field(
        False, description="send the password without TLS to a non-loopback broker (readable on the network)"
    )
    signing_key_file: Path | None = Field(None, description="HMAC key that signs every decision (facedoor.signing)")
    discovery: DiscoveryConfig = DiscoveryConfig()

    @field_validator("topic_prefix")
    @classmethod
    def _no_wildcards(cls, value: str) -> str:
        if any(ch in value for ch in "+#") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a plain topic without wildcards or leading/trailing '/'")
        return value

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
    enabled: bool = True
    path: Path | None = Field(None, description="default: <state_dir>/audit.jsonl")
    max_bytes: int = Field(50_000_000, ge=10_000)
    max_age_days: float = Field(90.0, gt=0)
    save_crops: bool = False


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class LivenessConfig(_Section):
    """Presentation-attack gate (MiniFASNet): a track unlocks only when its mean live score reaches `threshold`."""

    enabled: bool = Field(True, description="off (with a log line) anyway when the antispoof models are not exported")
    threshold: float = Field(0.25, gt=0, lt=1, description="mean live score over a track's frames needed to unlock")
    min_frames: int = Field(3, ge=1, le=100, description="frames of liveness evidence before a track is judged")


class IdleConfig(_Section):
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


class FacedoorConfig(_Section):
    door_id: str = Field("front", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    state_dir: Path = DEFAULT_STATE_DIR
    models: Path = Field(default_factory=default_models_dir)
    store: Path = DEFAULT_STATE_DIR / "store.db"
    decision_ttl_s: float = Field(5.0, gt=0, le=60)
    camera: CameraConfig = CameraConfig()
    recognition: RecognitionConfig = RecognitionConfig()
    policy: PolicyConfig = PolicyConfig()
    tracking: TrackingConfig = TrackingConfig()
    mqtt: MQTTConfig = MQTTConfig()
    unlock_action: UnlockActionConfig | None = None
    audit: AuditConfig = AuditConfig()
    idle: IdleConfig = IdleConfig()
    logging: LoggingConfig = LoggingConfig()
    liveness: LivenessConfig = LivenessConfig()

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
    """SafeLoader that refuses anchors and aliases: a config never needs them, billion laughs does."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "YAML anchors and aliases (&name, *name) are not allowed in a facedoor config",
                event.start_mark,
            )
        return super().compose_node(parent, index)


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
        raise ConfigError(f"{path}: not valid YAML ({str(exc)[:4 * SHOWN_INPUT_CHARS]})") from None
    return parse_config(raw, str(path))
