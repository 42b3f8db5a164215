"""A second factor besides the face: the member's phone or tag near the door, or a PIN on a keypad.

For doors where a photo must never be enough (`policy.second_factor`). Three parts:

- `check_second_factor`: the per-frame rule, pure (no I/O, no clock of its own). From the member,
  the face's capture time, the start of its track, a `FactorEvidence` snapshot and the config it
  says `satisfied` (unlock; which factor did it), `wait` (no factor yet, the face has been in view
  under `wait_s`: decide nothing, more frames will tell) or `missing` (a deny with reason
  `second_factor`, saying which factor and why). A face still in view unlocks when the factor
  arrives after that deny.
- PINs: stored as scrypt hashes (`hash_pin`, `facedoor pin-hash`) in an owner-only file
  (`load_pin_file`), compared in constant time, every hash of the file checked for each entry.
- `FactorListener`: subscribes to the presence topics and the keypad topic on the door's MQTT link
  and keeps what it heard, thread-safe, as receive times on the door's monotonic clock. A
  timestamp a sender claims is never read; a retained message (of unknown age, e.g. a phone that
  was home an hour ago) never counts. Wrong PINs are rate-limited: `max_wrong` within `lockout_s`
  locks the keypad out for `lockout_s` (every entry ignored, the right one too), and PINs are
  hashed on a worker thread behind a bounded queue (an entry that finds it full counts as wrong),
  so a flood on the keypad topic costs bounded CPU and never blocks the MQTT thread.

Presence payloads understood: ESPresense (`espresense/devices/<id>/<room>`: a JSON object with
`distance` in metres; near when at most `max_distance_m`) and a Home Assistant device_tracker state
(`home` near, anything else, e.g. `not_home`, away; also as a JSON string or `{"state": ...}`). A
report that the device is away or too far clears the member's presence at once.
Keypad payloads: the digits as text (an ESPHome `key_collector` result published as is), or a
JSON object with `code` or `pin`; 4-12 digits.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from facedoor.config import ConfigError, SecondFactorConfig
from facedoor.files import read_secret

if TYPE_CHECKING:
    from facedoor.events import DecisionEvent
    from facedoor.mqtt import MqttHooks

log = logging.getLogger(__name__)

FactorState = Literal["satisfied", "missing", "wait"]
PIN_RE = re.compile(r"^[0-9]{4,12}$")
MAX_PAYLOAD_BYTES = 1024       # a presence report or a keypad code is far smaller
MAX_PIN_FILE_BYTES = 1_000_000
PIN_QUEUE = 4                  # keypad entries waiting to be hashed; more count as wrong
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1   # 16 MiB, about 0.1 s per hash on a door's core
MIN_SCRYPT_N, MAX_SCRYPT_N = 2**14, 2**20
MAX_SCRYPT_MEM = 256 * 1024 * 1024
SCRYPT_PREFIX = "scrypt"


# --- the rule --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FactorEvidence:
    """What the door has heard, each a receive time on its own monotonic clock (a snapshot)."""

    presence: Mapping[str, float] = field(default_factory=dict)  # member -> latest report that it is near
    pins: Mapping[str, float] = field(default_factory=dict)      # member -> their latest correct PIN, unspent
    wrong_pin: float | None = None                               # the latest wrong PIN
    locked_until: float | None = None                            # the keypad ignores every PIN until then


@dataclass(frozen=True)
class FactorCheck:
    """The rule's answer for one member's face: satisfied, missing or wait, and which factor."""

    state: FactorState
    factor: str | None     # satisfied: "presence" or "pin" (None: none needed); else the mode that is missing
    detail: str = ""       # missing/wait: what the door heard, e.g. "no presence report; wrong PIN"
    pin_t: float | None = None  # the PIN that satisfied it (spent after the unlock)


NOT_NEEDED = FactorCheck("satisfied", None)


def check_second_factor(member: str, face_t: float, first_t: float, evidence: FactorEvidence | None,
                        cfg: SecondFactorConfig) -> FactorCheck:
    """Whether MEMBER's face captured at FACE_T (its track seen since FIRST_T) has its second factor in
    EVIDENCE (None: nothing heard): presence reported within `presence.max_age_s` of the face, or a
    correct PIN within `pin.window_s` of it, as MEMBER's mode asks. Pure: every time is on one clock."""
    mode = cfg.mode_of(member)
    if mode == "none":
        return NOT_NEEDED
    evidence = evidence or FactorEvidence()
    details = []
    if mode in ("presence", "presence_or_pin"):
        seen = evidence.presence.get(member)
        if cfg.presence is not None and member in cfg.presence.topics:
            if seen is not None and abs(face_t - seen) <= cfg.presence.max_age_s:
                return FactorCheck("satisfied", "presence")
            details.append("no presence report" if seen is None else f"presence {face_t - seen:.1f}s old")
        else:
            details.append("no presence topic for this member")
    if mode in ("pin", "presence_or_pin") and cfg.pin is not None:
        window = cfg.pin.window_s
        entered = evidence.pins.get(member)
        if entered is not None and abs(face_t - entered) <= window:
            return FactorCheck("satisfied", "pin", pin_t=entered)
        if evidence.locked_until is not None and face_t < evidence.locked_until:
            details.append("keypad locked out")
        elif evidence.wrong_pin is not None and abs(face_t - evidence.wrong_pin) <= window:
            details.append("wrong PIN")
        else:
            details.append("no PIN")
    state: FactorState = "wait" if face_t - first_t < cfg.wait_s else "missing"
    return FactorCheck(state, mode, "; ".join(details))


# --- PINs --------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def valid_pin(pin: str) -> bool:
    """A PIN is 4-12 digits."""
    return bool(PIN_RE.match(pin))


def hash_pin(pin: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """`scrypt$N$r$p$salt$hash` (base64) of PIN with a fresh random salt: a line of the PIN file."""
    if not valid_pin(pin):
        raise ValueError("a PIN is 4-12 digits")
    salt = os.urandom(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=n, r=r, p=p, maxmem=MAX_SCRYPT_MEM, dklen=32)
    return f"{SCRYPT_PREFIX}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True)
class PinHash:
    """One member's parsed PIN hash."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, encoded: str) -> PinHash:
        """Parse `scrypt$N$r$p$salt$hash`; ValueError says what is wrong (costs bounded)."""
        parts = encoded.split("$")
        if len(parts) != 6 or parts[0] != SCRYPT_PREFIX:
            raise ValueError("not a `scrypt$N$r$p$salt$hash` line (make one with `facedoor pin-hash`)")
        try:
            n, r, p = (int(x) for x in parts[1:4])
            salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
        except ValueError:
            raise ValueError("scrypt parameters or base64 fields do not parse") from None
        if n & (n - 1) or not MIN_SCRYPT_N <= n <= MAX_SCRYPT_N or not 1 <= r <= 32 or not 1 <= p <= 16 \
                or 128 * n * r * p > MAX_SCRYPT_MEM // 2:
            raise ValueError(f"scrypt N={n} r={r} p={p} out of bounds (N a power of two in "
                             f"{MIN_SCRYPT_N}..{MAX_SCRYPT_N}, memory at most {MAX_SCRYPT_MEM // 2 >> 20} MiB)")
        if len(salt) < 16 or not 16 <= len(digest) <= 64:
            raise ValueError("salt under 16 bytes or hash not 16-64 bytes")
        return cls(n, r, p, salt, digest)

    def matches(self, pin: str) -> bool:
        """True when PIN hashes to this digest (constant-time comparison)."""
        got = hashlib.scrypt(pin.encode(), salt=self.salt, n=self.n, r=self.r, p=self.p,
                             maxmem=MAX_SCRYPT_MEM, dklen=len(self.digest))
        return hmac.compare_digest(got, self.digest)


def load_pin_file(path: Path) -> dict[str, PinHash]:
    """MEMBER:HASH lines of PATH (`#` comments), owner-only like every secret of the door; ConfigError
    naming the file, the line and the key for anything else (no line is ever echoed: it is a hash)."""
    setting = "policy.second_factor.pin.file"
    text = read_secret(path, setting, MAX_PIN_FILE_BYTES).decode("utf-8", errors="replace")
    pins: dict[str, PinHash] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        member, sep, encoded = line.rpartition(":")
        member = member.strip()
        where = f"{setting}: {path} line {number}"
        if not sep or not member or len(member) > 64:
            raise ConfigError(f"{where}: expected MEMBER:HASH (make the line with `facedoor pin-hash MEMBER`)")
        if member in pins:
            raise ConfigError(f"{where}: a second PIN for {member!r}")
        try:
            pins[member] = PinHash.parse(encoded.strip())
        except ValueError as exc:
            raise ConfigError(f"{where} ({member}): {exc}") from None
    if not pins:
        raise ConfigError(f"{setting}: {path} holds no PIN (add lines with `facedoor pin-hash MEMBER`)")
    return pins


def keypad_code(payload: bytes) -> str | None:
    """The code in a keypad message: the digits as text, or JSON {"code"|"pin": "digits"}; else None."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        text = payload.decode("utf-8").strip()
        if text.startswith("{"):
            obj = json.loads(text)
            text = next((obj[k] for k in ("code", "pin") if isinstance(obj.get(k), str)), "")
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    text = text.strip()
    return text if valid_pin(text) else None


def presence_near(payload: bytes, max_distance_m: float | None) -> bool | None:
    """Whether a presence report says the device is near: True, False (away / too far), None (not understood)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        text = payload.decode("utf-8").strip()
        value: object = json.loads(text) if text[:1] in ("{", '"') else text
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(value, dict):
        distance = value.get("distance")
        if isinstance(distance, (int, float)) and not isinstance(distance, bool):
            if not math.isfinite(distance) or distance < 0:
                return None
            return max_distance_m is None or distance <= max_distance_m
        value = value.get("state")
    if isinstance(value, str) and value:
        return value.strip().lower() == "home"
    return None


# --- the MQTT side -----------------------------------------------------------------------------
class FactorListener:
    """Hears presence reports and keypad entries on the door's MQTT link; `snapshot()` for the rule."""

    def __init__(self, cfg: SecondFactorConfig, pins: Mapping[str, PinHash] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.pins = dict(pins or {})
        self.clock = clock
        self._lock = threading.Lock()
        self._presence: dict[str, float] = {}
        self._correct: dict[str, float] = {}
        self._wrong: deque[float] = deque()
        self._wrong_last: float | None = None
        self._locked_until: float | None = None
        self._queue: queue.Queue[tuple[str, float] | None] = queue.Queue(PIN_QUEUE)
        self._worker: threading.Thread | None = None
        self.refused: str | None = None  # a factor topic the broker refused to let the door read, and why
        self.counts = {"presence": 0, "ignored": 0, "pin_ok": 0, "pin_wrong": 0, "pin_locked": 0}

    @classmethod
    def from_config(cls, cfg: SecondFactorConfig) -> FactorListener | None:
        """The listener a door with a second factor needs (None: none configured); reads and checks the
        PIN file now, so a door that cannot check PINs refuses to start (ConfigError)."""
        if not cfg.enabled:
            return None
        pins = load_pin_file(cfg.pin.file) if cfg.pin is not None else None
        return cls(cfg, pins)

    def attach(self, link: MqttHooks) -> None:
        """Subscribe (renewed on every reconnect) to every presence topic and the keypad topic, retained
        messages excluded, and start the PIN worker. A refused subscription sets `refused` (the door stops)."""
        if self.cfg.presence is not None:
            for member, topic in self.cfg.presence.topics.items():
                link.subscribe(topic, self._presence_handler(member), 1, retained=False, on_refused=self._refused)
        if self.cfg.pin is not None:
            link.subscribe(self.cfg.pin.topic, lambda _topic, payload: self.on_keypad(payload), 1, retained=False,
                           on_refused=self._refused)
            self._worker = threading.Thread(target=self._check_pins, name="facedoor-pins", daemon=True)
            self._worker.start()
        log.info("second factor: %s", self.describe(), extra={"fields": {
            "event": "second_factor", "mode": self.cfg.mode, "members": dict(self.cfg.members),
            "presence_topics": len(self.cfg.presence.topics) if self.cfg.presence else 0,
            "pins": len(self.pins)}})

    def without_source(self, members: Iterable[str]) -> list[str]:
        """Those of MEMBERS whose mode asks for a factor they have no source of (no presence topic, no
        PIN): the door denies them every time (said at start, so the operator can fix it)."""
        presence = set(self.cfg.presence.topics) if self.cfg.presence is not None else set()
        has = {"none": lambda m: True, "presence": lambda m: m in presence, "pin": lambda m: m in self.pins,
               "presence_or_pin": lambda m: m in presence or m in self.pins}
        return sorted(m for m in members if not has[self.cfg.mode_of(m)](m))

    def _refused(self, topic: str, reason: str) -> None:
        self.refused = f"the broker refused the door's subscription to {topic} ({reason}): allow the door to " \
            "read it in the broker's ACL"

    def describe(self) -> str:
        """One line for the log: what the door needs and hears."""
        parts = [f"mode {self.cfg.mode}"]
        if self.cfg.members:
            parts.append(f"{len(self.cfg.members)} member override(s)")
        if self.cfg.presence is not None:
            parts.append(f"{len(self.cfg.presence.topics)} presence topic(s), max age {self.cfg.presence.max_age_s:g}s")
        if self.cfg.pin is not None:
            parts.append(f"keypad {self.cfg.pin.topic} ({len(self.pins)} PIN(s))")
        return ", ".join(parts)

    def on_decision(self, event: DecisionEvent) -> None:
        """A decision listener: one PIN entry, one unlock (the PIN of a delivered unlock is spent)."""
        check = event.decision.second_factor
        if event.delivered and event.decision.decision == "unlock" and check is not None \
                and check.pin_t is not None and event.decision.identity is not None:
            self.spend(event.decision.identity, check.pin_t)

    def close(self) -> None:
        """Stop the PIN worker."""
        if self._worker is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._worker.join(timeout=2.0)

    # --- evidence ------------------------------------------------------------------------------
    def snapshot(self) -> FactorEvidence:
        """A consistent copy of the evidence for one frame's decisions."""
        with self._lock:
            return FactorEvidence(dict(self._presence), dict(self._correct), self._wrong_last, self._locked_until)

    def spend(self, member: str, pin_t: float) -> None:
        """One PIN entry, one unlock: forget MEMBER's PIN received at PIN_T once it opened the door."""
        with self._lock:
            if self._correct.get(member) == pin_t:
                del self._correct[member]

    def _presence_handler(self, member: str) -> Callable[[str, bytes], None]:
        def handle(_topic: str, payload: bytes) -> None:
            self.on_presence(member, payload)
        return handle

    def on_presence(self, member: str, payload: bytes) -> None:
        """A presence report for MEMBER, received now (paho's thread)."""
        t = self.clock()
        assert self.cfg.presence is not None
        near = presence_near(payload, self.cfg.presence.max_distance_m)
        with self._lock:
            if near is None:
                self.counts["ignored"] += 1
            elif near:
                self.counts["presence"] += 1
                self._presence[member] = t
            else:
                self._presence.pop(member, None)
        if near is None:
            log.debug("presence report for %s not understood; ignored", member,
                      extra={"fields": {"event": "presence_ignored", "member": member}})

    def on_keypad(self, payload: bytes) -> None:
        """A keypad entry, received now (paho's thread): queued for hashing unless the keypad is locked out."""
        t = self.clock()
        code = keypad_code(payload) or ""  # not a PIN at all: hashed like any wrong one would be, never matches
        with self._lock:
            if self._locked_until is not None and t < self._locked_until:
                self.counts["pin_locked"] += 1
                log.warning("keypad locked out for %.0fs more: PIN entry ignored", self._locked_until - t,
                            extra={"fields": {"event": "pin_locked_out"}})
                return
        try:
            self._queue.put_nowait((code, t))
        except queue.Full:
            self._record(None, t)  # a flood: counts as wrong, so it ends in a lockout

    def _check_pins(self) -> None:
        while (item := self._queue.get()) is not None:
            code, t = item
            # every member's hash is computed, whatever matches: the time says nothing about who
            matched = [m for m, h in self.pins.items() if h.matches(code) and code]
            self._record(matched, t)

    def _record(self, matched: list[str] | None, t: float) -> None:
        """Record a keypad entry received at T that matched MATCHED members (None or []: wrong)."""
        assert self.cfg.pin is not None
        pin = self.cfg.pin
        locked_now = False
        with self._lock:
            if self._locked_until is not None and t < self._locked_until:
                self.counts["pin_locked"] += 1
                return
            if matched:
                self.counts["pin_ok"] += 1
                self._wrong.clear()
                for member in matched:
                    self._correct[member] = t
            else:
                self.counts["pin_wrong"] += 1
                self._wrong_last = t
                self._wrong.append(t)
                while self._wrong and t - self._wrong[0] > pin.lockout_s:
                    self._wrong.popleft()
                if len(self._wrong) >= pin.max_wrong:
                    self._locked_until = t + pin.lockout_s
                    self._wrong.clear()
                    locked_now = True
        if matched:
            log.info("correct PIN for %s", ", ".join(matched),
                     extra={"fields": {"event": "pin_ok", "members": matched}})
        elif locked_now:
            log.warning("%d wrong PINs within %gs: keypad locked out for %gs", pin.max_wrong, pin.lockout_s,
                        pin.lockout_s, extra={"fields": {"event": "pin_lockout"}})
        else:
            log.warning("wrong PIN entered", extra={"fields": {"event": "pin_wrong"}})
