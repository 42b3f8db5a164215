"""Message authentication: HMAC-SHA256 over a canonical JSON payload, with expiry and replay checks.

Anyone who can publish on the broker could forge or replay a decision; a consumer that holds the
door's key can tell an authentic, fresh, first-seen message from everything else.

Algorithm (what a consumer in any language implements):

1. Key: the bytes of the key file (`mqtt.signing_key_file`) with leading and trailing ASCII
   whitespace removed, used as-is (not hex- or base64-decoded); 32 to 4096 bytes. Generate one
   with `head -c 32 /dev/urandom | base64 > key` and keep it mode 0600.
2. The message is a UTF-8 JSON object. Remove its top-level member `"sig"`; the rest (including
   `id` and `expires_at_ms`) is the signed part.
3. Canonical encoding of the signed part = RFC 8785 (JSON Canonicalization Scheme): object members
   sorted by key (compared as UTF-16 code units; all facedoor keys are ASCII), no whitespace at
   all, strings as UTF-8 with only `"`, `\\` and control characters below U+0020 escaped
   (`\\b \\f \\n \\r \\t`, else `\\u00xx` in lowercase hex), numbers as ECMAScript's
   Number.prototype.toString (`3`, not `3.0`; `0.41`; `1e-7`; `1e+21`), `true`/`false`/`null`.
   facedoor only signs integers within +-2^53 and finite floats, so every JCS library agrees.
4. `sig` = lowercase hex of HMAC-SHA256(key, canonical bytes) (64 characters).
5. Accept a message only if, in this order: it parses as a JSON object; `sig` is present and
   equal (constant-time compare) to the recomputed value; `id` is a non-empty string;
   `expires_at_ms` is an integer (milliseconds since the Unix epoch, UTC); now_ms <=
   `expires_at_ms` (a late message is refused); `expires_at_ms` is not further ahead than a bound
   (default 5 minutes, which also bounds the replay cache); and `id` was not accepted before.
   Remember accepted ids until their `expires_at_ms` has passed: after that the expiry check
   alone refuses a replay.

Test vector (also checked by the tests, and reproducible with `openssl dgst -sha256 -hmac KEY`):
key `facedoor-example-key-0123456789abcdef`; message
`{"id": "9f1c2e", "door": "front", "decision": "unlock", "identity": "alice", "distance": 0.41,
"ts_ms": 1780000000000, "expires_at_ms": 1780000005000}`; canonical bytes
`{"decision":"unlock","distance":0.41,"door":"front","expires_at_ms":1780000005000,"id":"9f1c2e","identity":"alice","ts_ms":1780000000000}`;
sig `d82940bad3c6c16e2938d22555fde1d56b9e9381c936840e766f38cea5efa78a`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from facedoor.config import ConfigError
from facedoor.files import read_secret

SIG_FIELD = "sig"
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
MAX_MESSAGE_BYTES = 65_536
MAX_AHEAD_MS = 300_000
MAX_SAFE_INT = 2**53
REPLAY_CACHE_SIZE = 100_000


class SigningKeyError(ConfigError):
    """The signing key file is missing, unreadable, too short or readable by others."""


def load_key(path: str | Path, setting: str = "mqtt.signing_key_file") -> bytes:
    """The key from PATH (the file SETTING names), refused when short or group/world-accessible
    (it authorises unlocks; the site key of facedoor.fleet is loaded the same way)."""
    key = read_secret(Path(path), setting, MAX_KEY_BYTES, SigningKeyError).strip()
    if len(key) < MIN_KEY_BYTES:
        raise SigningKeyError(
            f"{setting}: {path} holds {len(key)} bytes, at least {MIN_KEY_BYTES} are needed "
            "(head -c 32 /dev/urandom | base64 > KEYFILE)"
        )
    return key


def _number(value: float) -> str:
    """ECMAScript Number::toString of a finite number (RFC 8785 section 3.2.2.3)."""
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise ValueError(f"integer {value} is beyond +-2^53 and cannot be signed portably")
        return str(value)
    if not math.isfinite(value):
        raise ValueError("NaN and infinity cannot be signed")
    if value == 0:
        return "0"
    _, digits, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    s = "".join(map(str, digits))
    k, n = len(s), len(digits) + int(exponent)  # finite: the exponent is a number
    prefix = "-" if value < 0 else ""
    if k <= n <= 21:
        return prefix + s + "0" * (n - k)
    if 0 < n <= 21:
        return prefix + s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return prefix + "0." + "0" * -n + s
    mantissa = s if k == 1 else s[0] + "." + s[1:]
    return f"{prefix}{mantissa}e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"


def _encode(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        out.append({None: "null", True: "true", False: "false"}[value])
    elif isinstance(value, (int, float)):
        out.append(_number(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, Mapping):
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: str(k).encode("utf-16-be"))):
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, got {type(key).__name__}")
            out.append("," if i else "")
            out.append(json.dumps(key, ensure_ascii=False) + ":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            out.append("," if i else "")
            _encode(item, out)
        out.append("]")
    else:
        raise ValueError(f"cannot sign a value of type {type(value).__name__}")


def canonical(payload: Mapping[str, Any]) -> bytes:
    """The RFC 8785 (JCS) UTF-8 bytes of PAYLOAD without its top-level `sig`: what the HMAC covers."""
    out: list[str] = []
    _encode({k: v for k, v in payload.items() if k != SIG_FIELD}, out)
    return "".join(out).encode("utf-8")


def signature(payload: Mapping[str, Any], key: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of the canonical PAYLOAD."""
    return hmac.new(key, canonical(payload), hashlib.sha256).hexdigest()


def sign(payload: Mapping[str, Any], key: bytes) -> dict[str, Any]:
    """A copy of PAYLOAD with `sig` added; it must carry `id` and `expires_at_ms` (signed with it)."""
    if not isinstance(payload.get("id"), str) or not payload["id"]:
        raise ValueError("a signed message needs a non-empty string `id`")
    if not _is_int(payload.get("expires_at_ms")):
        raise ValueError("a signed message needs an integer `expires_at_ms`")
    return {**payload, SIG_FIELD: signature(payload, key)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ReplayCache:
    """Ids of accepted messages, each kept until its `expires_at_ms` (then the expiry check suffices)."""

    def __init__(self, max_entries: int = REPLAY_CACHE_SIZE):
        self.max_entries = max_entries
        self._expiry: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def _prune(self, now_ms: int) -> None:
        self._expiry = {mid: exp for mid, exp in self._expiry.items() if exp >= now_ms}

    def add(self, message_id: str, expires_at_ms: int, now_ms: int) -> str | None:
        """Remember MESSAGE_ID; the reason it cannot be accepted ("replay", "replay-cache-full") or None."""
        if self._expiry.get(message_id, -1) >= now_ms:
            return "replay"
        if len(self._expiry) >= self.max_entries:
            self._prune(now_ms)
            if len(self._expiry) >= self.max_entries:
                return "replay-cache-full"  # fail closed rather than forget an id that is still valid
        self._expiry[message_id] = expires_at_ms
        return None


class DiskReplayCache(ReplayCache):
    """A ReplayCache in a small SQLite file (0600), so a verifier that restarts still refuses a
    replay: same bound (MAX_ENTRIES ids not yet expired), expired ids pruned on each add, each
    accepted id committed (durably) before the message is let through. Processes may share it."""

    def __init__(self, path: str | Path, max_entries: int = REPLAY_CACHE_SIZE):
        import sqlite3

        from facedoor.files import open_private, private_dir

        super().__init__(max_entries)
        self.path = Path(path)
        try:
            private_dir(self.path.parent)
            os.close(open_private(self.path, os.O_RDWR))
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            self._db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, expires_at_ms INTEGER NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expires_at_ms)")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"replay cache {self.path}: cannot open ({exc}); pass another --seen FILE") from None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    def add(self, message_id: str, expires_at_ms: int, now_ms: int) -> str | None:
        """Remember MESSAGE_ID on disk; the reason it cannot be accepted ("replay", "replay-cache-full") or None."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")  # one writer at a time: two verifiers never both accept an id
        try:
            db.execute("DELETE FROM seen WHERE expires_at_ms < ?", (now_ms,))
            if db.execute("SELECT 1 FROM seen WHERE id = ?", (message_id,)).fetchone():
                refused: str | None = "replay"
            elif db.execute("SELECT count(*) FROM seen").fetchone()[0] >= self.max_entries:
                refused = "replay-cache-full"  # fail closed rather than forget an id that is still valid
            else:
                db.execute("INSERT INTO seen VALUES (?, ?)", (message_id, expires_at_ms))
                refused = None
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return refused

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Verdict:
    """The outcome of `check_message`: ok, a short machine-readable reason, and the parsed payload."""

    ok: bool
    reason: str
    payload: dict[str, Any] | None = None


def check_message(
    raw: bytes, key: bytes, now_ms: int, seen: ReplayCache, *, max_ahead_ms: int = MAX_AHEAD_MS
) -> Verdict:
    """Verify one received message: authentic, carrying id and expiry, not late, not seen before.

    Reasons: "ok", "too-large", "malformed", "unsigned", "bad-signature", "missing-id",
    "missing-expiry", "expired", "too-far-ahead", "replay", "replay-cache-full". Only a message
    that passes everything else is recorded in SEEN.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        return Verdict(False, "too-large")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return Verdict(False, "malformed")
    if not isinstance(payload, dict):
        return Verdict(False, "malformed")
    sig = payload.get(SIG_FIELD)
    if not isinstance(sig, str):
        return Verdict(False, "unsigned")
    try:
        expected = signature(payload, key)
    except (TypeError, ValueError, RecursionError):
        return Verdict(False, "malformed")
    if not hmac.compare_digest(sig.encode("utf-8", "replace"), expected.encode()):
        return Verdict(False, "bad-signature")
    message_id, expires = payload.get("id"), payload.get("expires_at_ms")
    if not isinstance(message_id, str) or not message_id:
        return Verdict(False, "missing-id", payload)
    if not isinstance(expires, int) or not _is_int(expires):
        return Verdict(False, "missing-expiry", payload)
    if expires < now_ms:
        return Verdict(False, "expired", payload)
    if expires > now_ms + max_ahead_ms:
        return Verdict(False, "too-far-ahead", payload)
    refused = seen.add(message_id, expires, now_ms)
    if refused:
        return Verdict(False, refused, payload)
    return Verdict(True, "ok", payload)
