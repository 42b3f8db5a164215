"""Message authentication: canonical encoding, key file rules, forged/tampered/replayed/expired/valid messages."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from facedoor import signing
from facedoor.signing import ReplayCache, SigningKeyError, canonical, check_message, load_key, sign

KEY = b"k" * 32
NOW = 1_780_000_000_000


def _decision(**extra) -> dict:
    return {"id": "d-1", "door": "front", "decision": "unlock", "identity": "alice", "distance": 0.41,
            "threshold": 0.7, "ts_ms": NOW - 200, "expires_at_ms": NOW + 4800, **extra}


def _raw(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def test_canonical_encoding_is_rfc8785() -> None:
    assert canonical({"b": 1, "a": [True, None, "é\n"], "sig": "x"}) == '{"a":[true,null,"é\\n"],"b":1}'.encode()
    numbers = [0.0, -0.0, 3.0, 0.41, 1e-7, 1e21, 1e20, 0.000001, 1.2345678901234568e+20, -1.5e-9, 4.5e15, 1e16]
    expected = "[0,0,3,0.41,1e-7,1e+21,100000000000000000000,0.000001,123456789012345680000,-1.5e-9," \
               "4500000000000000,10000000000000000]"
    assert canonical({"n": numbers}) == f'{{"n":{expected}}}'.encode()
    with pytest.raises(ValueError):
        canonical({"n": 2**53 + 1})
    with pytest.raises(ValueError):
        canonical({"n": float("nan")})


def test_signature_is_hmac_sha256_over_the_documented_bytes() -> None:
    signed = sign(_decision(), KEY)
    body = b'{"decision":"unlock","distance":0.41,"door":"front","expires_at_ms":1780000004800,"id":"d-1",' \
           b'"identity":"alice","threshold":0.7,"ts_ms":1779999999800}'
    assert signed["sig"] == hmac.new(KEY, body, hashlib.sha256).hexdigest()
    with pytest.raises(ValueError, match="expires_at_ms"):
        sign({"id": "x"}, KEY)


def test_the_documented_test_vector() -> None:
    key = b"facedoor-example-key-0123456789abcdef"
    message = {"id": "9f1c2e", "door": "front", "decision": "unlock", "identity": "alice", "distance": 0.41,
               "ts_ms": 1780000000000, "expires_at_ms": 1780000005000}
    sig = "d82940bad3c6c16e2938d22555fde1d56b9e9381c936840e766f38cea5efa78a"
    assert sign(message, key)["sig"] == sig
    assert sig in signing.__doc__ and canonical(message).decode() in signing.__doc__
    assert check_message(_raw(message | {"sig": sig}), key, 1780000000000, ReplayCache()).ok


def test_valid_message_is_accepted_once_then_refused_as_replay() -> None:
    seen = ReplayCache()
    raw = _raw(sign(_decision(), KEY))
    verdict = check_message(raw, KEY, NOW, seen)
    assert verdict.ok and verdict.reason == "ok" and verdict.payload["identity"] == "alice"
    assert check_message(raw, KEY, NOW + 10, seen).reason == "replay"


def test_forged_tampered_unsigned_and_malformed_messages_are_refused() -> None:
    seen = ReplayCache()
    assert check_message(_raw(sign(_decision(), b"z" * 32)), KEY, NOW, seen).reason == "bad-signature"
    tampered = sign(_decision(), KEY) | {"identity": "mallory"}
    assert check_message(_raw(tampered), KEY, NOW, seen).reason == "bad-signature"
    longer = sign(_decision(), KEY) | {"expires_at_ms": NOW + 60_000}
    assert check_message(_raw(longer), KEY, NOW, seen).reason == "bad-signature"
    assert check_message(_raw(_decision()), KEY, NOW, seen).reason == "unsigned"
    assert check_message(b"ON", KEY, NOW, seen).reason == "malformed"
    assert check_message(b"[1]", KEY, NOW, seen).reason == "malformed"
    assert len(seen) == 0  # nothing unauthenticated reaches the replay cache


def test_expired_missing_fields_and_far_future_are_refused() -> None:
    seen = ReplayCache()
    raw = _raw(sign(_decision(), KEY))
    assert check_message(raw, KEY, NOW + 4801, seen).reason == "expired"
    assert check_message(raw, KEY, NOW + 4800, seen).ok  # valid up to and including expires_at_ms
    no_id = _decision()
    del no_id["id"]
    no_id["sig"] = hmac.new(KEY, canonical(no_id), hashlib.sha256).hexdigest()
    assert check_message(_raw(no_id), KEY, NOW, seen).reason == "missing-id"
    no_exp = _decision()
    del no_exp["expires_at_ms"]
    no_exp["sig"] = hmac.new(KEY, canonical(no_exp), hashlib.sha256).hexdigest()
    assert check_message(_raw(no_exp), KEY, NOW, seen).reason == "missing-expiry"
    ahead = sign(_decision(id="d-2", expires_at_ms=NOW + 3_600_000), KEY)
    assert check_message(_raw(ahead), KEY, NOW, seen).reason == "too-far-ahead"


def test_replay_cache_forgets_expired_ids_and_fails_closed_when_full() -> None:
    seen = ReplayCache(max_entries=2)
    assert seen.add("a", NOW + 10, NOW) is None and seen.add("b", NOW + 10, NOW) is None
    assert seen.add("c", NOW + 10, NOW) == "replay-cache-full"
    assert seen.add("c", NOW + 30, NOW + 20) is None and len(seen) == 1  # a and b expired: pruned


def test_key_file_rules(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"  " + KEY + b"\n")
    key.chmod(0o600)
    assert load_key(key) == KEY
    key.chmod(0o640)
    with pytest.raises(SigningKeyError, match=r"0640.*owner only"):
        load_key(key)
    short = tmp_path / "short"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"secret\n")
    os.close(fd)
    with pytest.raises(SigningKeyError, match="6 bytes, at least 32"):
        load_key(short)
    short.write_bytes(b"x" * 5000)
    with pytest.raises(SigningKeyError, match="longer than 4096"):
        load_key(short)
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_key(tmp_path / "missing")
