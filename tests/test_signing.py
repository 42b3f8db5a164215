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


def test_disk_replay_cache_survives_a_restart_prunes_and_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "state" / "seen.db"
    first = signing.DiskReplayCache(path, max_entries=2)
    assert first.add("a", NOW + 1000, NOW) is None and first.add("b", NOW + 5000, NOW) is None
    assert first.add("c", NOW + 5000, NOW) == "replay-cache-full"  # fail closed, never forget a live id
    first.close()
    assert path.stat().st_mode & 0o777 == 0o600
    again = signing.DiskReplayCache(path, max_entries=2)  # a restarted verifier
    try:
        assert again.add("a", NOW + 1000, NOW + 10) == "replay" and again.add("b", NOW + 5000, NOW) == "replay"
        assert again.add("c", NOW + 5000, NOW + 2000) is None  # "a" expired and was pruned
        assert len(again) == 2
        other = signing.DiskReplayCache(path, max_entries=2)  # a second verifier on the same file
        assert other.add("c", NOW + 5000, NOW + 2000) == "replay"
        other.close()
    finally:
        again.close()


class Pipeline:
    """`mosquitto_sub -t TOPIC | facedoor check-message --follow ...` as two real processes."""

    def __init__(self, broker, topic: str, key_file: Path, seen: Path, *extra: str):
        import queue
        import subprocess
        import sys
        import threading

        self.sub = subprocess.Popen(["mosquitto_sub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
                                     "-t", topic], stdout=subprocess.PIPE)
        facedoor = str(Path(sys.executable).with_name("facedoor"))
        self.check = subprocess.Popen([facedoor, "check-message", "--follow", "--key-file", str(key_file),
                                       "--seen", str(seen), *extra], stdin=self.sub.stdout,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.sub.stdout is not None
        self.sub.stdout.close()  # the checker holds the pipe now
        self.out: queue.Queue[bytes] = queue.Queue()
        self.err: queue.Queue[bytes] = queue.Queue()
        for stream, q in ((self.check.stdout, self.out), (self.check.stderr, self.err)):
            threading.Thread(target=lambda s=stream, q=q: [q.put(line) for line in iter(s.readline, b"")],
                             daemon=True).start()

    def stop(self) -> None:
        for proc in (self.sub, self.check):
            proc.terminate()
            proc.wait(10)


def _publish(broker, topic: str, payload: bytes) -> None:
    import subprocess

    subprocess.run(["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic,
                    "-m", payload], check=True, timeout=10)


def _next(q, timeout_s: float = 10.0) -> str:
    import queue

    try:
        return q.get(timeout=timeout_s).decode().strip()
    except queue.Empty:
        raise AssertionError(f"no line within {timeout_s:g} s") from None


def _until_ready(pipe: Pipeline, broker, topic: str, q) -> None:
    """Publish harmless non-messages until the checker answers one (both processes are up and
    subscribed), then a signed marker, and read past the marker's verdict: the pipe is drained."""
    import queue
    import time
    import uuid

    for _ in range(50):
        _publish(broker, topic, b"ping")
        try:
            assert q.get(timeout=0.3).decode().startswith("REFUSED malformed")
            break
        except queue.Empty:
            continue
    else:
        raise AssertionError("the pipeline never answered")
    marker = sign({"id": f"marker-{uuid.uuid4()}", "expires_at_ms": int(time.time() * 1000) + 60_000}, KEY)
    _publish(broker, topic, json.dumps(marker).encode())
    while not _next(q).endswith(marker["id"]):
        pass


def test_check_message_follow_answers_each_message_as_it_arrives_and_remembers_across_restarts(
        mosquitto, tmp_path: Path) -> None:
    import time
    import uuid

    topic = "facedoor/front/decision"
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    seen = tmp_path / "seen.db"

    def message(ttl_s: float = 60.0) -> dict:
        now_ms = int(time.time() * 1000)
        return sign({"id": str(uuid.uuid4()), "decision": "unlock", "identity": "alice", "ts_ms": now_ms,
                     "expires_at_ms": now_ms + int(ttl_s * 1000)}, KEY)

    first, second = message(), message()
    pipe = Pipeline(mosquitto, topic, key_file, seen)
    try:
        _until_ready(pipe, mosquitto, topic, pipe.out)
        _publish(mosquitto, topic, json.dumps(first).encode())
        assert _next(pipe.out) == f"ok ok {first['id']}"  # answered before anything else arrives
        _publish(mosquitto, topic, json.dumps(first).encode())
        assert _next(pipe.out) == f"REFUSED replay {first['id']}"
        _publish(mosquitto, topic, json.dumps({**second, "identity": "mallory"}).encode())
        assert _next(pipe.out) == "REFUSED bad-signature"
        _publish(mosquitto, topic, json.dumps(message(ttl_s=3600)).encode())  # a door clock an hour ahead
        assert _next(pipe.out).startswith("REFUSED too-far-ahead")
    finally:
        pipe.stop()
    # a restarted verifier (same --seen file) still refuses the replay, and forwards what is genuine
    pipe = Pipeline(mosquitto, topic, key_file, seen, "--forward")
    try:
        _until_ready(pipe, mosquitto, topic, pipe.err)
        assert '"marker-' in _next(pipe.out)  # the marker is genuine: forwarded
        _publish(mosquitto, topic, json.dumps(first).encode())
        assert _next(pipe.err) == f"REFUSED replay {first['id']}"
        raw = json.dumps(second).encode()
        _publish(mosquitto, topic, raw)
        assert _next(pipe.err) == f"ok ok {second['id']}"
        assert _next(pipe.out) == raw.decode()  # the message itself, for a consumer that cannot verify
        assert pipe.out.empty()  # nothing refused is forwarded
    finally:
        pipe.stop()
