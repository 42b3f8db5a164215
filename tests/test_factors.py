"""The second factor (facedoor.factors): the pure per-frame rule on exact timelines, PIN hashes and
their file, the rate limit on wrong PINs, the payloads of ESPresense / Home Assistant / ESPHome, the
listener on a real Mosquitto (retained messages never count), and the real daemon on a real camera
stream: with a second factor configured, no unlock without it."""
from __future__ import annotations

import json
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

import test_daemon
from daemon_support import Daemon, MjpegCamera, Subscriber, write_config
from facedoor.config import ConfigError, FacedoorConfig, SecondFactorConfig, parse_config
from facedoor.demo.broker import PrivateBroker
from facedoor.factors import (
    NOT_NEEDED,
    FactorEvidence,
    FactorListener,
    PinHash,
    check_second_factor,
    hash_pin,
    keypad_code,
    load_pin_file,
    presence_near,
)
from facedoor.judge import Decision, FrameSightings, JudgeState, Rules, judge
from test_daemon import ENROLLED, Door
from test_judge import DT, GALLERY, alice_frames, seen

door = test_daemon.door  # the module fixture: real models, an enrolled store, walk-up photos

ESPRESENSE = "espresense/devices/alice-phone/front_door"
HA_BOB = "homeassistant/device_tracker/bob_phone/state"
KEYPAD = "home/keypad/front/code"


def factor_cfg(**overrides: object) -> SecondFactorConfig:
    raw: dict[str, object] = {
        "mode": "presence_or_pin", "wait_s": 5.0,
        "presence": {"topics": {"alice": ESPRESENSE, "bob": HA_BOB}, "max_age_s": 20.0, "max_distance_m": 3.0},
        "pin": {"topic": KEYPAD, "file": "/nonexistent/pins", "window_s": 30.0, "max_wrong": 3, "lockout_s": 60.0},
    }
    raw.update(overrides)
    return SecondFactorConfig.model_validate(raw)


# -- the pure rule ---------------------------------------------------------------------------------

def test_no_second_factor_needed_is_satisfied_without_evidence() -> None:
    check = check_second_factor("alice", 100.0, 100.0, None, SecondFactorConfig())
    assert (check.state, check.factor) == ("satisfied", None)
    assert check_second_factor("guest", 100.0, 0.0, None, factor_cfg(members={"guest": "none"})).state == "satisfied"


def test_presence_must_be_fresh_and_the_members_own() -> None:
    cfg = factor_cfg(mode="presence")
    fresh = check_second_factor("alice", 100.0, 99.0, FactorEvidence(presence={"alice": 85.0}), cfg)
    assert (fresh.state, fresh.factor) == ("satisfied", "presence")
    just_after = check_second_factor("alice", 100.0, 99.0, FactorEvidence(presence={"alice": 101.0}), cfg)
    assert just_after.state == "satisfied"  # reported while the frame was being processed
    stale = check_second_factor("alice", 100.0, 99.0, FactorEvidence(presence={"alice": 79.9}), cfg)
    assert (stale.state, stale.factor) == ("wait", "presence") and "20.1s old" in stale.detail
    bobs = check_second_factor("alice", 100.0, 90.0, FactorEvidence(presence={"bob": 99.0}), cfg)
    assert (bobs.state, bobs.detail) == ("missing", "no presence report")
    no_topic = check_second_factor("carol", 100.0, 90.0, FactorEvidence(presence={"alice": 99.0}), cfg)
    assert (no_topic.state, no_topic.detail) == ("missing", "no presence topic for this member")


def test_wait_until_wait_s_then_missing() -> None:
    cfg = factor_cfg(mode="pin")
    assert check_second_factor("alice", 104.9, 100.0, None, cfg).state == "wait"
    missing = check_second_factor("alice", 105.0, 100.0, None, cfg)
    assert (missing.state, missing.factor, missing.detail) == ("missing", "pin", "no PIN")


def test_pin_counts_within_its_window_and_only_for_its_member() -> None:
    cfg = factor_cfg(mode="pin")
    ok = check_second_factor("alice", 100.0, 100.0, FactorEvidence(pins={"alice": 75.0}), cfg)
    assert (ok.state, ok.factor, ok.pin_t) == ("satisfied", "pin", 75.0)
    typed_after = check_second_factor("alice", 100.0, 95.0, FactorEvidence(pins={"alice": 129.0}), cfg)
    assert typed_after.state == "satisfied"
    too_old = check_second_factor("alice", 100.0, 80.0, FactorEvidence(pins={"alice": 69.9}), cfg)
    assert (too_old.state, too_old.detail) == ("missing", "no PIN")
    bobs = check_second_factor("alice", 100.0, 80.0, FactorEvidence(pins={"bob": 99.0}), cfg)
    assert bobs.state == "missing"
    wrong = check_second_factor("alice", 100.0, 80.0, FactorEvidence(wrong_pin=98.0), cfg)
    assert (wrong.state, wrong.detail) == ("missing", "wrong PIN")
    locked = check_second_factor("alice", 100.0, 80.0, FactorEvidence(wrong_pin=98.0, locked_until=158.0), cfg)
    assert locked.detail == "keypad locked out"


def test_presence_or_pin_takes_either_and_members_override_the_door() -> None:
    cfg = factor_cfg(members={"bob": "pin"})
    both = FactorEvidence(presence={"alice": 99.0, "bob": 99.0}, pins={"alice": 99.0})
    assert check_second_factor("alice", 100.0, 100.0, both, cfg).factor == "presence"  # the PIN stays unspent
    assert check_second_factor("alice", 100.0, 100.0, FactorEvidence(pins={"alice": 99.0}), cfg).factor == "pin"
    bob = check_second_factor("bob", 100.0, 90.0, both, cfg)  # bob needs his PIN: his phone does not do
    assert (bob.state, bob.factor, bob.detail) == ("missing", "pin", "no PIN")
    neither = check_second_factor("alice", 100.0, 90.0, FactorEvidence(presence={"alice": 70.0}), cfg)
    assert (neither.state, neither.factor, neither.detail) == ("missing", "presence_or_pin",
                                                               "presence 30.0s old; no PIN")


def test_the_judge_waits_denies_then_unlocks_when_the_factor_comes() -> None:
    r = Rules.from_config(parse_config({"policy": {"unknown_interval_s": 5.0, "second_factor": factor_cfg(
        mode="presence", wait_s=1.0).model_dump(mode="json")}}), liveness_on=False)
    state = JudgeState(r.tracking, r.quality)
    faces = [[seen(e)] for e in alice_frames(30)]

    def frame(i: int, heard: FactorEvidence | None) -> list[Decision]:
        return list(judge(FrameSightings(i * DT, faces[i], None, heard), state, GALLERY, r).decisions)

    assert [d for i in range(10) for d in frame(i, None)] == []   # 0.9 s in view: wait
    (deny,) = frame(10, FactorEvidence(presence={"bob": 1.0}))      # 1.0 s: bob's phone is not alice's
    assert (deny.decision, deny.reason, deny.identity) == ("deny", "second_factor", "alice")
    assert deny.second_factor is not None and deny.second_factor.factor == "presence"
    assert frame(11, FactorEvidence(presence={"alice": -30.0})) == []  # stale, and the deny is rate-limited
    (unlock,) = frame(12, FactorEvidence(presence={"alice": 1.15}))
    assert (unlock.decision, unlock.identity) == ("unlock", "alice")
    assert unlock.second_factor is not None and unlock.second_factor.factor == "presence"


def test_a_door_without_a_second_factor_unlocks_as_before() -> None:
    r = Rules.from_config(parse_config({}), liveness_on=False)
    state = JudgeState(r.tracking, r.quality)
    decisions = [d for i, e in enumerate(alice_frames(3))
                 for d in judge(FrameSightings(i * DT, [seen(e)]), state, GALLERY, r).decisions]
    assert [(d.decision, d.second_factor) for d in decisions] == [("unlock", NOT_NEEDED)]


# -- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("section, key", [
    ({"mode": "pin"}, "mode pin needs second_factor.pin"),
    ({"mode": "presence"}, "mode presence needs second_factor.presence"),
    ({"mode": "presence_or_pin"}, "needs second_factor.presence or second_factor.pin"),
    ({"members": {"alice": "presence"}}, "mode presence needs"),
    ({"mode": "presence", "presence": {"topics": {}}}, "presence.topics"),
    ({"mode": "presence", "presence": {"topics": {"alice": "espresense/devices/+/front_door"}}}, "wildcards"),
    ({"mode": "presence", "presence": {"topics": {"alice": "t/x", "bob": "t/x"}}}, "given for alice and bob"),
    ({"mode": "pin", "pin": {"topic": "k/#", "file": "/p"}}, "pin.topic"),
    ({"mode": "pin", "pin": {"topic": "k", "file": "/p", "max_wrong": 0}}, "max_wrong"),
    ({"mode": "pin", "pin": {"topic": "k", "file": "/p"}, "presence": {"topics": {"alice": "k"}}}, "also a presence"),
    ({"mode": "sometimes"}, "second_factor.mode"),
    ({"mode": "none", "members": {"": "pin"}}, "member name"),
])
def test_config_errors_name_the_file_and_the_key(section: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=r"^door\.yaml: invalid configuration: policy\.second_factor") as err:
        parse_config({"policy": {"second_factor": section}}, "door.yaml")
    assert key in str(err.value)


# -- PINs ----------------------------------------------------------------------------------------

def write_pins(path: Path, lines: list[str], mode: int = 0o600) -> Path:
    path.write_text("# facedoor PINs\n" + "".join(line + "\n" for line in lines))
    path.chmod(mode)
    return path


def test_pin_hash_round_trip_and_salted() -> None:
    a, b = hash_pin("0042"), hash_pin("0042")
    assert a != b and "0042" not in a  # fresh salt each time
    assert PinHash.parse(a).matches("0042") and not PinHash.parse(a).matches("42")
    with pytest.raises(ValueError, match="4-12 digits"):
        hash_pin("12a4")


@pytest.mark.parametrize("encoded, why", [
    ("bcrypt$x", "not a `scrypt"),
    ("scrypt$1024$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==", "out of bounds"),   # too cheap
    ("scrypt$16385$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==", "out of bounds"),  # not a power of 2
    ("scrypt$1048576$32$16$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAA==", "out of bounds"),  # 64 GiB
    ("scrypt$16384$8$1$AAAA$AAAAAAAAAAAAAAAAAAAAAA==", "salt"),
    ("scrypt$16384$8$1$!!$AAAA", "do not parse"),
])
def test_pin_hash_parse_refuses_bad_or_unbounded_lines(encoded: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        PinHash.parse(encoded)


def test_pin_file_is_owner_only_and_every_fault_names_file_line_and_key(tmp_path: Path) -> None:
    good = hash_pin("1234")
    pins = load_pin_file(write_pins(tmp_path / "pins", [f"alice:{good}", f"bob smith:{hash_pin('5678')}"]))
    assert set(pins) == {"alice", "bob smith"} and pins["alice"].matches("1234")
    with pytest.raises(ConfigError, match=r"policy\.second_factor\.pin\.file: .* mode 0640.*owner only"):
        load_pin_file(write_pins(tmp_path / "open", [f"alice:{good}"], 0o640))
    with pytest.raises(ConfigError, match=r"pin\.file: .*cannot read"):
        load_pin_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"line 3: a second PIN for 'alice'"):
        load_pin_file(write_pins(tmp_path / "dup", [f"alice:{good}", f"alice:{good}"]))
    with pytest.raises(ConfigError, match=r"line 2 \(alice\): not a `scrypt") as err:
        load_pin_file(write_pins(tmp_path / "plain", ["alice:1234"]))
    assert "1234" not in str(err.value).split("line 2")[1]  # a plaintext PIN is never echoed
    with pytest.raises(ConfigError, match="holds no PIN"):
        load_pin_file(write_pins(tmp_path / "empty", []))


def test_pin_hash_command_appends_owner_only_and_never_twice(tmp_path: Path, monkeypatch, capsys) -> None:
    import io

    from facedoor.cli import main

    pins = tmp_path / "pins"
    monkeypatch.setattr("sys.stdin", io.StringIO("004711\n"))
    assert main(["pin-hash", "alice", "--file", str(pins)]) == 0
    assert stat.S_IMODE(pins.stat().st_mode) == 0o600 and "004711" not in pins.read_text()
    assert load_pin_file(pins)["alice"].matches("004711")
    monkeypatch.setattr("sys.stdin", io.StringIO("1234\n"))
    assert main(["pin-hash", "alice", "--file", str(pins)]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("12\n"))
    assert main(["pin-hash", "bob"]) == 2
    assert "4-12 digits" in capsys.readouterr().err
    assert len(load_pin_file(pins)) == 1


# -- payloads ------------------------------------------------------------------------------------

@pytest.mark.parametrize("payload, near", [
    (b'{"id":"alice-phone","name":"Alice","distance":1.42,"rssi":-71,"raw":1.6,"speed":0.01}', True),
    (b'{"id":"alice-phone","distance":7.9}', False),     # ESPresense: in range of the node, not at the door
    (b"home", True), (b"not_home", False), (b'"home"', True), (b"away", False), (b'{"state": "home"}', True),
    (b'{"distance": -1}', None), (b'{"distance": "near"}', None), (b"", None), (b"\xff\xfe", None),
    (b'{"distance": 1e999}', None), (b"{" * 5000, None),
])
def test_presence_payloads(payload: bytes, near: bool | None) -> None:
    assert presence_near(payload, 3.0) is near


@pytest.mark.parametrize("payload, code", [
    (b"1234", "1234"), (b" 004711\n", "004711"), (b'{"code": "9876"}', "9876"), (b'{"pin": "12345"}', "12345"),
    (b"123", None), (b"1234567890123", None), (b"12a4", None), (b'{"code": 1234}', None), (b"1" * 2000, None),
])
def test_keypad_payloads(payload: bytes, code: str | None) -> None:
    assert keypad_code(payload) == code


# -- the listener: rate limit, single use, presence cleared ------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def listener() -> Iterator[tuple[FactorListener, Clock]]:
    clock = Clock()
    pins = {"alice": PinHash.parse(hash_pin("1234")), "bob": PinHash.parse(hash_pin("5678"))}
    lst = FactorListener(factor_cfg(), pins, clock)
    worker = threading.Thread(target=lst._check_pins, daemon=True)
    worker.start()
    yield lst, clock
    lst._queue.put(None)
    worker.join(5)


def settle(lst: FactorListener, entries: int) -> None:
    """Wait until the worker has judged ENTRIES keypad entries."""
    deadline = time.monotonic() + 10
    while sum(lst.counts[k] for k in ("pin_ok", "pin_wrong", "pin_locked")) < entries:
        assert time.monotonic() < deadline, lst.counts
        time.sleep(0.01)


def test_correct_pin_is_recorded_for_its_member_on_the_receive_clock_and_spent_once(listener) -> None:
    lst, clock = listener
    lst.on_keypad(b"5678")
    settle(lst, 1)
    assert lst.snapshot().pins == {"bob": 1000.0}
    lst.spend("bob", 999.0)   # another entry: not this one
    assert lst.snapshot().pins == {"bob": 1000.0}
    lst.spend("bob", 1000.0)
    assert lst.snapshot().pins == {}


def test_wrong_pins_lock_the_keypad_out_even_for_the_right_pin(listener) -> None:
    lst, clock = listener
    for code in (b"0000", b"1111"):
        lst.on_keypad(code)
        clock.t += 1
    lst.on_keypad(b"1234")  # a right PIN resets the count
    settle(lst, 3)
    assert lst.snapshot().pins == {"alice": 1002.0}
    for code in (b"0001", b"garbage", b"0003"):  # max_wrong 3 (a non-PIN counts as wrong)
        clock.t += 1
        lst.on_keypad(code)
    settle(lst, 6)
    snap = lst.snapshot()
    assert snap.locked_until == 1005.0 + 60 and snap.wrong_pin == 1005.0
    clock.t += 30
    lst.on_keypad(b"5678")  # bob's right PIN, while locked out: ignored
    settle(lst, 7)
    assert "bob" not in lst.snapshot().pins and lst.counts["pin_locked"] == 1
    clock.t += 31  # the lockout is over
    lst.on_keypad(b"5678")
    settle(lst, 8)
    assert lst.snapshot().pins["bob"] == clock.t


def test_members_without_a_source_for_their_factor_are_named() -> None:
    lst = FactorListener(factor_cfg(members={"carol": "pin", "dave": "presence", "guest": "none"}),
                         {"alice": PinHash.parse(hash_pin("1234"))})
    # alice: PIN and phone; bob: phone (presence_or_pin); carol: no PIN; dave: no topic; erin: neither
    assert lst.without_source(["alice", "bob", "carol", "dave", "erin", "guest"]) == ["carol", "dave", "erin"]


def test_a_keypad_flood_is_bounded_and_ends_in_a_lockout() -> None:
    clock = Clock()
    lst = FactorListener(factor_cfg(), {"alice": PinHash.parse(hash_pin("1234"))}, clock)  # no worker: queue fills
    for _ in range(50):
        lst.on_keypad(b"0000")
    assert lst._queue.qsize() <= 4 and lst.counts["pin_wrong"] >= 3
    assert lst.snapshot().locked_until == 1060.0 and lst.counts["pin_locked"] > 40


def test_away_or_far_reports_clear_presence_and_garbage_is_ignored() -> None:
    clock = Clock()
    lst = FactorListener(factor_cfg(), {}, clock)
    lst.on_presence("alice", b'{"distance": 1.0}')
    assert lst.snapshot().presence == {"alice": 1000.0}
    clock.t += 5
    lst.on_presence("alice", b"\xff\xfe{")
    assert lst.snapshot().presence == {"alice": 1000.0} and lst.counts["ignored"] == 1
    lst.on_presence("alice", b'{"distance": 9.0}')
    assert lst.snapshot().presence == {}
    lst.on_presence("bob", b"home")
    lst.on_presence("bob", b"not_home")
    assert lst.snapshot().presence == {}


# -- on a real broker ----------------------------------------------------------------------------

def test_listener_on_a_real_broker_counts_live_messages_never_retained_ones(mosquitto, tmp_path: Path) -> None:
    from facedoor.mqtt import MqttLink

    pins = write_pins(tmp_path / "pins", [f"alice:{hash_pin('1234')}"])
    cfg = parse_config({"mqtt": {"host": mosquitto.host, "port": mosquitto.port},
                        "policy": {"second_factor": {**factor_cfg().model_dump(mode="json"),
                                                     "pin": {"topic": KEYPAD, "file": str(pins)}}}})
    pub = Subscriber(mosquitto.host, mosquitto.port)
    for topic, payload in ((ESPRESENSE, b'{"distance": 0.8}'), (HA_BOB, b"home"), (KEYPAD, b"9999")):
        pub.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)  # stale, of unknown age
    heard: queue.Queue[str] = queue.Queue()
    lst = FactorListener.from_config(cfg.policy.second_factor)
    assert lst is not None
    link = MqttLink(cfg)
    lst.attach(link)
    link.subscribe("#", lambda topic, _payload: heard.put(topic))  # a witness that retained messages arrived
    link.start()
    try:
        assert link.wait_connected(10)
        seen: set[str] = set()
        while not {ESPRESENSE, HA_BOB, KEYPAD} <= seen:  # the broker sent the retained ones (to the witness)
            seen.add(heard.get(timeout=10))
        assert lst.snapshot().presence == {}, "a retained presence report counted as fresh"  # set in paho's thread
        before = time.monotonic()
        pub.client.publish(ESPRESENSE, b'{"distance": 0.8}', qos=1).wait_for_publish(5)
        pub.client.publish(KEYPAD, b"1234", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not (lst.snapshot().pins and lst.snapshot().presence) and time.monotonic() < deadline:
            time.sleep(0.02)
        snap = lst.snapshot()
        assert set(snap.presence) == {"alice"} and set(snap.pins) == {"alice"}
        assert before <= snap.presence["alice"] <= time.monotonic()  # the door's own receive time
        assert before <= snap.pins["alice"] <= time.monotonic()
        # the worker takes entries in order: had the retained wrong PIN been queued, it would be judged by now
        assert lst.counts["pin_wrong"] == 0, "a retained keypad entry was handed to the listener"
    finally:
        link.stop()
        lst.close()
        pub.stop()


# -- the real daemon on a real camera stream -----------------------------------------------------

def test_daemon_unlocks_only_with_a_fresh_second_factor(door: Door, mosquitto, tmp_path: Path) -> None:
    """One real daemon, a real broker, an MJPEG camera showing an enrolled member's face or an empty
    doorway: no unlock with the factor stale (retained before the start, or reported too long ago),
    absent, another member's presence, a wrong PIN or another member's PIN; an unlock with fresh
    presence, then with the member's PIN, which opens the door once."""
    from facedoor.demo.walkup import Visitor, render

    member = door.known.name
    other = next(n for n in ENROLLED if n != member)
    esp, ha = f"espresense/devices/{member}-phone/front_door", f"homeassistant/device_tracker/{other}_phone/state"
    pins = write_pins(tmp_path / "pins", [f"{member}:{hash_pin('2468')}", f"{other}:{hash_pin('1357')}"])
    visit = list(render([Visitor(member, door.known.photo)], fps=10, visit_s=3.0, gap_s=0.5, still=True))
    face_frames, empty_frames = visit[22:35], visit[:4]  # the face at full size; the empty doorway
    camera = MjpegCamera(empty_frames, fps=10)
    face_jpegs, empty_jpegs = [cv2.imencode(".jpg", f)[1].tobytes() for f in face_frames], camera.jpegs
    camera.up()
    config = write_config(
        tmp_path / "facedoor.yaml", door.models, door.store, mosquitto.port,
        policy={"cooldown_s": 2.0, "unknown_interval_s": 0.5, "second_factor": {
            "mode": "presence_or_pin", "wait_s": 1.0,
            "presence": {"topics": {member: esp, other: ha}, "max_age_s": 3.0, "max_distance_m": 3.0},
            "pin": {"topic": KEYPAD, "file": str(pins), "window_s": 3.0}}})
    pub = Subscriber(mosquitto.host, mosquitto.port)

    def publish(topic: str, payload: bytes, retain: bool = False) -> float:
        pub.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        return time.time()

    publish(esp, b'{"distance": 0.4}', retain=True)   # the member's phone at the door... an hour ago
    publish(KEYPAD, b"2468", retain=True)             # the member's PIN, retained by a careless keypad config
    sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/#")
    daemon = Daemon(config, camera.url)

    def member_decision(after: float, reason: str = "second_factor", detail: str = "") -> dict:
        """The first decision on the member received after AFTER with REASON (and DETAIL in factor_detail)."""
        def wanted(m: dict) -> bool:
            d = json.loads(m["payload"]) if m["topic"].endswith("/decision") else {}
            return (m["recv"] > after and d.get("identity") == member and d.get("reason") == reason
                    and detail in (d.get("factor_detail") or ""))
        found = sub.wait_for(wanted, 30)
        assert found is not None, daemon.log()[-4000:]
        return {**json.loads(found["payload"]), "_recv": found["recv"]}

    def unlocks() -> list[dict]:
        return [d for d in sub.decisions() if d["decision"] == "unlock"]

    try:
        assert sub.wait_for(lambda m: m["topic"].endswith("/health"), 90), daemon.log()[-4000:]
        camera.jpegs = face_jpegs
        absent = member_decision(0)
        assert absent["decision"] == "deny" and absent["factor"] == "presence_or_pin"
        assert absent["factor_detail"] == "no presence report; no PIN", absent  # retained ones never counted

        t = publish(ha, b"home")                      # another member's phone
        member_decision(member_decision(t)["_recv"])  # two denies after it: frames captured after its receipt
        t = publish(KEYPAD, b"0000")                  # a wrong PIN
        member_decision(t, detail="wrong PIN")        # once hashed: the PIN is no member's
        t = publish(KEYPAD, b"1357")                  # another member's PIN
        deadline = time.monotonic() + 30
        while not daemon.events("pin_ok") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.events("pin_ok")[0]["members"] == [other]
        member_decision(member_decision(time.time())["_recv"])
        assert unlocks() == [], unlocks()

        camera.jpegs = empty_jpegs                    # the doorway empties; the phone reports, then goes quiet
        t = time.time()
        assert sub.wait_for(lambda m: m["recv"] > t and m["topic"].endswith("/health")  # no face seen for 2 s
                            and json.loads(m["payload"])["state"] == "idle", 30), daemon.log()[-4000:]
        t = publish(esp, b'{"distance": 0.4}')
        while time.time() < t + 3.5:                  # the report grows older than max_age_s: what is tested
            time.sleep(0.1)
        camera.jpegs = face_jpegs
        stale = member_decision(time.time())
        assert stale["factor_detail"].startswith("presence ") and " old; " in stale["factor_detail"], stale
        assert float(stale["factor_detail"].split()[1].rstrip("s")) > 3.0, stale
        assert unlocks() == [], unlocks()

        t = publish(esp, b'{"distance": 0.4}')        # the phone at the door now
        unlock = member_decision(t, reason="match")
        assert unlock["decision"] == "unlock" and unlock["factor"] == "presence", unlock

        publish(esp, b'{"distance": 8.0}')            # the phone walks away (too far clears it at once)
        member_decision(time.time(), detail="no presence report")
        t = publish(KEYPAD, b"2468")                  # the member types their PIN
        by_pin = member_decision(t, reason="match")
        assert by_pin["factor"] == "pin", by_pin
        again = member_decision(by_pin["_recv"])     # past the cooldown, face in view, PIN still in its window
        assert again["decision"] == "deny" and "no PIN" in again["factor_detail"], again  # one PIN, one unlock
        assert len(unlocks()) == 2, unlocks()
        third = sorted(set(ENROLLED) - {member, other})  # enrolled, with neither a phone topic nor a PIN
        assert [e["members"] for e in daemon.events("second_factor_unreachable")] == [third]
        assert daemon.terminate() == 0, daemon.log()[-4000:]
    finally:
        daemon.kill()
        sub.stop()
        pub.stop()
        camera.down()
    assert "2468" not in daemon.log() and "1357" not in daemon.log()  # a PIN never reaches the log


def test_daemon_with_a_pin_factor_refuses_to_start_without_a_usable_pin_file(door: Door, mosquitto,
                                                                             tmp_path: Path) -> None:
    """Fail closed at start: a PIN file readable by others, or holding no PIN, is exit 2 with one line."""
    for name, lines, mode, why in (("open", [f"{door.known.name}:{hash_pin('2468')}"], 0o644, "owner only"),
                                   ("empty", [], 0o600, "holds no PIN")):
        pins = write_pins(tmp_path / name, lines, mode)
        config = write_config(tmp_path / f"{name}.yaml", door.models, door.store, mosquitto.port,
                              policy={"second_factor": {"mode": "pin", "pin": {"topic": KEYPAD, "file": str(pins)}}})
        daemon = Daemon(config, str(tmp_path / "none.avi"))
        try:
            assert daemon.wait(60) == 2, daemon.log()[-3000:]
        finally:
            daemon.kill()
        last = daemon.log().strip().splitlines()[-1]
        assert "policy.second_factor.pin.file" in last and why in last, last


# -- the README's broker ACL lines, in a real Mosquitto ------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
ACL_USERS = ("espresense", "homeassistant", "keypad-front", "facedoor-front", "intruder")


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[PrivateBroker, dict[str, str]]]:
    """Mosquitto with passwords and the ACL block of README's security model, verbatim; `intruder`
    is any other user of the broker (no ACL lines: it may do nothing)."""
    import secrets
    import shutil
    import subprocess

    passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(passwd_tool).exists():
        pytest.skip("mosquitto_passwd not installed")
    text = README.read_text()
    acl = text.split("Mosquitto ACL lines", 1)[1].split("```", 2)[1].strip() + "\n"
    assert "user facedoor-front" in acl
    work = tmp_path / "acl-broker"
    work.mkdir()
    passwords = {user: secrets.token_urlsafe(12) for user in ACL_USERS}
    for i, (user, password) in enumerate(passwords.items()):
        subprocess.run([passwd_tool, *(["-c"] if i == 0 else []), "-b", str(work / "passwd"), user, password],
                       check=True, capture_output=True)
    (work / "acl").write_text(acl)
    broker = PrivateBroker(work)
    run_as = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")  # as root: stay root, read our files
    conf = (f"user {run_as}\nlistener {broker.port} 127.0.0.1\nallow_anonymous false\npersistence false\n"
            f"password_file {work / 'passwd'}\nacl_file {work / 'acl'}\nlog_dest stderr\nlog_type error\n")
    (work / "passwd").chmod(0o600)
    (work / "acl").chmod(0o600)
    broker.binary = broker.binary or pytest.skip("mosquitto not installed")
    proc = subprocess.Popen([broker.binary, "-c", str(_write(work / "mosquitto.conf", conf))],
                            stdout=subprocess.DEVNULL, stderr=open(work / "mosquitto.log", "wb"))
    broker.proc = proc
    try:
        _wait_listening(broker, work / "mosquitto.log")
        yield broker, passwords
    finally:
        broker.stop()


def _wait_listening(broker: PrivateBroker, log: Path, timeout_s: float = 10.0) -> None:
    """Until BROKER (started by the test with its own mosquitto.conf) accepts connections; its LOG on failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((broker.host, broker.port), timeout=0.2).close()
            return
        except OSError:
            assert broker.proc is not None and broker.proc.poll() is None and time.monotonic() < deadline, \
                log.read_text()
            time.sleep(0.05)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def door_on(broker: PrivateBroker, passwords: dict[str, str], tmp_path: Path, pins: Path,
            topics: dict[str, str]) -> FacedoorConfig:
    secret = _write(tmp_path / "door.password", passwords["facedoor-front"])
    secret.chmod(0o600)
    return parse_config({
        "mqtt": {"host": broker.host, "port": broker.port, "username": "facedoor-front", "password_file": str(secret),
                 "client_id": f"facedoor-front-{len(topics)}"},
        "policy": {"second_factor": {"mode": "presence_or_pin", "presence": {"topics": topics},
                                     "pin": {"topic": KEYPAD_ACL, "file": str(pins)}}}})


KEYPAD_ACL = "home/keypad/front/code"


def test_readme_acl_keeps_other_users_off_the_factor_topics(acl_broker, tmp_path: Path) -> None:
    from facedoor.mqtt import MqttLink

    broker, passwords = acl_broker
    alice, bob = "espresense/devices/alice-phone/front_door", "homeassistant/device_tracker/bob_phone/state"
    pins = write_pins(tmp_path / "pins", [f"alice:{hash_pin('1234')}", f"bob:{hash_pin('5678')}"])
    cfg = door_on(broker, passwords, tmp_path, pins, {"alice": alice, "bob": bob})
    lst = FactorListener.from_config(cfg.policy.second_factor)
    assert lst is not None
    link = MqttLink(cfg)
    lst.attach(link)
    link.start()
    clients = {u: Subscriber(broker.host, broker.port, username=u, password=passwords[u])
               for u in ("espresense", "homeassistant", "keypad-front")}
    intruder = Subscriber(broker.host, broker.port, KEYPAD_ACL, username="intruder", password=passwords["intruder"])
    try:
        assert link.wait_connected(10)
        for topic, payload in ((alice, b'{"distance": 0.5}'), (bob, b"home"), (KEYPAD_ACL, b"1234")):
            intruder.client.publish(topic, payload, qos=1).wait_for_publish(5)  # refused by the broker
        clients["homeassistant"].client.publish(bob, b"home", qos=1).wait_for_publish(5)
        clients["keypad-front"].client.publish(KEYPAD_ACL, b"5678", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while not lst.snapshot().pins and time.monotonic() < deadline:
            time.sleep(0.02)
        snap = lst.snapshot()
        assert set(snap.presence) == {"bob"} and set(snap.pins) == {"bob"}, (snap, lst.counts)
        assert lst.counts["pin_wrong"] == 0 and lst.refused is None
        assert [m for m in intruder.messages if m["topic"] == KEYPAD_ACL] == []  # nobody else reads PINs
    finally:
        link.stop()
        lst.close()
        intruder.stop()
        for client in clients.values():
            client.stop()


DYNSEC = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[tuple[PrivateBroker, str]]:
    """Mosquitto with its dynamic-security plugin, which checks subscriptions (the ACL file does not:
    it grants every SUBSCRIBE and filters on delivery): user `door` may publish under facedoor/ and
    subscribe to the keypad topic and Home Assistant's birth topic only. Yields the broker and the password."""
    import base64
    import hashlib
    import secrets
    import subprocess

    if not DYNSEC.exists():
        pytest.skip(f"mosquitto dynamic-security plugin not installed ({DYNSEC})")
    work = tmp_path / "dynsec"
    work.mkdir()
    password, salt = secrets.token_urlsafe(12), secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    allow = [("publishClientSend", "facedoor/#"), ("publishClientSend", "homeassistant/device/front/config"),
             ("subscribeLiteral", KEYPAD_ACL), ("subscribeLiteral", "homeassistant/status")]
    dynsec = {
        "clients": [{"username": "door", "password": base64.b64encode(digest).decode(),
                     "salt": base64.b64encode(salt).decode(), "iterations": 101, "roles": [{"rolename": "door"}]}],
        "roles": [{"rolename": "door", "acls": [{"acltype": t, "topic": topic, "allow": True} for t, topic in allow]}],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
    }
    _write(work / "dynsec.json", json.dumps(dynsec)).chmod(0o600)
    broker = PrivateBroker(work)
    if broker.binary is None:
        pytest.skip("mosquitto not installed")
    run_as = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
    conf = _write(work / "mosquitto.conf", f"user {run_as}\nlistener {broker.port} 127.0.0.1\nallow_anonymous false\n"
                  f"persistence false\nplugin {DYNSEC}\nplugin_opt_config_file {work / 'dynsec.json'}\n")
    broker.proc = subprocess.Popen([broker.binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                   stderr=open(work / "mosquitto.log", "wb"))
    try:
        _wait_listening(broker, work / "mosquitto.log")
        yield broker, password
    finally:
        broker.stop()


def test_daemon_stops_when_the_broker_refuses_a_factor_subscription(door: Door, refusing_broker,
                                                                   tmp_path: Path) -> None:
    """A door that cannot read its presence topic cannot check the factor: exit 2, one line naming it."""
    from facedoor.demo.walkup import write_walkup

    broker, password = refusing_broker
    secret = _write(tmp_path / "door.password", password)
    secret.chmod(0o600)
    pins = write_pins(tmp_path / "pins", [f"{door.known.name}:{hash_pin('2468')}"])
    carol = "espresense/devices/carol-phone/front_door"   # the broker does not let the door read it
    video = tmp_path / "empty.avi"
    write_walkup(video, [], gap_s=1.0)
    config = write_config(tmp_path / "facedoor.yaml", door.models, door.store, broker.port,
                          mqtt={"username": "door", "password_file": str(secret)},
                          policy={"second_factor": {"mode": "presence_or_pin",
                                                    "presence": {"topics": {door.known.name: carol}},
                                                    "pin": {"topic": KEYPAD_ACL, "file": str(pins)}}})
    daemon = Daemon(config, str(video), "--loop")
    try:
        assert daemon.wait(90) == 2, daemon.log()[-3000:]
    finally:
        daemon.kill()
    refused = daemon.events("second_factor_refused")
    assert len(refused) == 1 and carol in refused[0]["msg"] and "ACL" in refused[0]["msg"], daemon.log()[-3000:]
    assert [e["topic"] for e in daemon.events("mqtt_subscribe_refused")] == [carol]
