"""The unlock action against a real Mosquitto broker: once per acknowledged unlock, never late,
chased by the lock when the broker stalls, relocked after outages."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from daemon_support import Subscriber
from decision_support import decision_event
from facedoor.config import FacedoorConfig, parse_config
from facedoor.events import DecisionEvent
from facedoor.mqtt import Delivery, MqttLink
from facedoor.signing import ReplayCache, check_message
from facedoor.unlock import UnlockAction, unlock_payload

ACTION_TOPIC = "zigbee2mqtt/front_door/set"
UNLOCK, LOCK = '{"state": "UNLOCK"}', '{"state": "LOCK"}'


def unlock_config(broker, tmp_path: Path, reconnect_s: tuple[float, float] = (0.1, 0.5),
                  **action) -> FacedoorConfig:
    return parse_config({
        "door_id": "front",
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port, "ack_timeout_s": 0.5,
                 "reconnect_min_s": reconnect_s[0], "reconnect_max_s": reconnect_s[1]},
        "unlock_action": {"topic": ACTION_TOPIC, "payload": UNLOCK, "lock_payload": LOCK, **action},
    })


def event(decision: str = "unlock", delivered: bool = True, age_s: float = 0.0, ttl_s: float = 5.0) -> DecisionEvent:
    """A decision event on a frame captured AGE_S ago (both clocks), as the service builds it."""
    return decision_event(decision, delivered=delivered, age_s=age_s, ttl_s=ttl_s)


@pytest.fixture
def door():
    """A started link with the unlock action on it; both closed after the test."""
    made: list[tuple[MqttLink, UnlockAction]] = []

    def make(cfg: FacedoorConfig) -> tuple[MqttLink, UnlockAction]:
        link = MqttLink(cfg)
        assert cfg.unlock_action is not None
        action = UnlockAction(cfg.unlock_action, link, cfg.decision_ttl_s)
        link.start()
        assert link.wait_connected(5), "door link did not connect"
        made.append((link, action))
        return link, action

    yield make
    for link, action in made:
        action.close()
        link.stop()


def states(sub: Subscriber) -> list[str]:
    return [json.loads(m["payload"])["state"] for m in sub.on(ACTION_TOPIC)]


KEY = b"facedoor-example-key-0123456789abcdef"


def test_unlock_payload_gains_expiry_only_when_it_can_carry_fields() -> None:
    assert json.loads(unlock_payload(UNLOCK, 123)) == {"state": "UNLOCK", "expires_at_ms": 123}
    assert unlock_payload("ON", 123) == "ON" and unlock_payload('"ON"', 123) == '"ON"'
    assert unlock_payload("ON", 123, KEY) == "ON"  # Tasmota cannot carry a signature: it relies on the ACL


def test_signed_relay_command_verifies_once_and_a_forgery_does_not() -> None:
    """With signing on, the relay command is a signed message a device can check like a decision."""
    now_ms = int(time.time() * 1000)
    raw = unlock_payload(UNLOCK, now_ms + 5000, KEY)
    body = json.loads(raw)
    assert set(body) == {"state", "expires_at_ms", "id", "sig"} and body["state"] == "UNLOCK"
    uuid.UUID(body["id"])
    assert json.loads(unlock_payload(UNLOCK, now_ms + 5000, KEY))["id"] != body["id"]  # one id per command
    seen = ReplayCache()
    assert check_message(raw.encode(), KEY, now_ms, seen).ok
    assert check_message(raw.encode(), KEY, now_ms, seen).reason == "replay"
    forged = json.dumps({"state": "UNLOCK", "expires_at_ms": now_ms + 5000, "id": str(uuid.uuid4())})
    assert check_message(forged.encode(), KEY, now_ms, seen).reason == "unsigned"
    tampered = json.dumps({**body, "expires_at_ms": now_ms + 60_000})
    assert check_message(tampered.encode(), KEY, now_ms, seen).reason == "bad-signature"


def test_a_relay_topic_the_broker_refuses_is_not_driven_nor_reported_sent(tmp_path, caplog) -> None:
    """The ACL forgets the relay topic: Mosquitto answers PUBACK 0x87 and the relay gets nothing.
    The action must not count it sent, must not log "unlock action sent", and says why."""
    from secure_broker import secure_broker

    with secure_broker(tmp_path / "broker", relay_topic=ACTION_TOPIC, deny=(ACTION_TOPIC,)) as broker:
        cfg = parse_config({"door_id": "front", "mqtt": {
            "host": broker.host, "port": broker.port, "username": "door", "tls": {"ca": str(broker.ca)},
            "password_file": str(broker.password_files["door"]), "ack_timeout_s": 0.5},
            "unlock_action": {"topic": ACTION_TOPIC, "payload": UNLOCK, "lock_payload": LOCK}})
        link = MqttLink(cfg)
        assert cfg.unlock_action is not None
        action = UnlockAction(cfg.unlock_action, link, cfg.decision_ttl_s, KEY)
        link.start()
        sub = Subscriber(broker.host, broker.port, ACTION_TOPIC, tls_ca=broker.ca, username="consumer",
                         password=broker.passwords["consumer"])
        try:
            assert link.wait_connected(10)
            sent = event()
            action.on_decision(sent)
            assert sent.notes == {"unlock_action": False, "unlock_action_delivery": "refused"}
            assert action.sent_unlocks == 0 and action.chased == 0
            assert link.refused == {ACTION_TOPIC: "Not authorized"} and link.condition == "refused"
            assert sub.wait_for(lambda m: True, 1.0) is None
        finally:
            sub.stop()
            action.close()
            link.stop()
    assert not [r for r in caplog.records if r.getMessage().startswith("unlock action sent")]


def test_unlock_action_once_per_acknowledged_unlock_never_retained(mosquitto, tmp_path, door) -> None:
    link, action = door(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        sent = event()
        action.on_decision(sent)
        action.on_decision(event(decision="deny"))
        dropped = event(delivered=False)  # the decision itself was not acknowledged
        action.on_decision(dropped)
        (msg,) = sub.wait_count(ACTION_TOPIC, 1)
        body = json.loads(msg["payload"])
        assert body == {"state": "UNLOCK", "expires_at_ms": sent.message.expires_at_ms} and not msg["retain"]
        assert msg["expiry"] is not None and 1 <= msg["expiry"] <= 4  # remaining TTL, rounded down
        assert sent.notes["unlock_action"] is True and dropped.notes["unlock_action"] is False
        # neither the deny nor the not-acknowledged decision drives the relay
        assert sub.wait_for(lambda m: m is not msg, 0.5) is None
    finally:
        sub.stop()
    late = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)  # nothing retained for a newcomer
    try:
        assert late.wait_for(lambda m: True, 0.5) is None
    finally:
        late.stop()


def test_unlock_action_dropped_when_decision_is_stale(mosquitto, tmp_path, door) -> None:
    link, action = door(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        stale = event(age_s=4.5)  # under one second of TTL left: MQTT expiry cannot say it
        action.on_decision(stale)
        assert stale.notes["unlock_action"] is False
        assert sub.wait_for(lambda m: json.loads(m["payload"])["state"] == "UNLOCK", 1.0) is None
    finally:
        sub.stop()


def test_stalled_broker_gets_unlock_chased_by_lock(mosquitto, tmp_path, door) -> None:
    """The worst case of issue 10: the broker process pauses (TCP up) right before an unlock."""
    link, action = door(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        mosquitto.pause()
        stalled = event()
        t0 = time.monotonic()
        action.on_decision(stalled)  # the decision was acknowledged just before the stall
        assert time.monotonic() - t0 < 2.0  # bounded by ack_timeout_s, never by keepalive
        assert stalled.notes["unlock_action"] is False and not link.connected and link.state == "stalled"
        assert link.stalls == 1
        time.sleep(3.0)  # the stall lasts; the unlock would now be late
        mosquitto.resume()
        msgs = sub.wait_count(ACTION_TOPIC, 2, timeout=10)
        assert states(sub)[:2] == ["UNLOCK", "LOCK"]
        assert msgs[1]["recv"] - msgs[0]["recv"] < 0.5  # a pulse of milliseconds, never a held-open door
        assert link.wait_connected(10) and link.state == "up"
        time.sleep(0.5)
        assert "UNLOCK" not in states(sub)[2:]  # nothing from before the stall comes out later
    finally:
        sub.stop()


def test_stall_seen_without_traffic_and_reported(mosquitto, tmp_path, door) -> None:
    link, _ = door(unlock_config(mosquitto, tmp_path))
    mosquitto.pause()
    try:
        deadline = time.monotonic() + 5
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected and link.state == "stalled"  # the probe found it, nobody at the door
        assert link.deliver("facedoor/front/decision", "{}", time.monotonic(), 5.0, "test decision") \
            is Delivery.DISCONNECTED
    finally:
        mosquitto.resume()
    assert link.wait_connected(10) and link.stalls >= 1


def test_unlock_action_never_sent_during_or_after_outage(mosquitto, tmp_path, door) -> None:
    link, action = door(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        mosquitto.stop()
        deadline = time.monotonic() + 5
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected
        during = event()
        action.on_decision(during)
        assert during.notes["unlock_action"] is False
        mosquitto.start()
        assert link.wait_connected(10)
        assert sub.wait_for(lambda m: json.loads(m["payload"])["state"] == "UNLOCK", 1.0) is None
        assert action.sent_unlocks == 0
    finally:
        sub.stop()


def test_relock_after_delay_and_pending_relock_sent_on_reconnect(mosquitto, tmp_path, door) -> None:
    # the door reconnects after the test subscriber (1.5 s vs <= 0.5 s), so the subscriber sees the re-sent lock
    link, action = door(unlock_config(mosquitto, tmp_path, (1.5, 1.5), relock_after_s=0.5))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        action.on_decision(event())
        msgs = sub.wait_count(ACTION_TOPIC, 2)
        assert states(sub) == ["UNLOCK", "LOCK"]
        assert msgs[1]["recv"] - msgs[0]["recv"] >= 0.4 and not msgs[1]["retain"]
        # second visit: the broker goes away before the relock is due; the lock follows on reconnect
        action.on_decision(event())
        sub.wait_count(ACTION_TOPIC, 3)
        mosquitto.stop()
        time.sleep(1.0)
        mosquitto.start()
        assert sub.subscribed.wait(10)
        assert link.wait_connected(10)
        sub.wait_count(ACTION_TOPIC, 4, timeout=10)
        assert states(sub)[2:4] == ["UNLOCK", "LOCK"]
    finally:
        sub.stop()


@pytest.mark.parametrize("name", ["zigbee2mqtt", "tasmota", "esphome"])
def test_unlock_examples_are_valid_configs(name) -> None:
    from facedoor.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / f"unlock-{name}.yaml")
    action = cfg.unlock_action
    assert action is not None and action.payload and action.lock_payload and action.relock_after_s


ESPHOME_HARNESS = r"""
#include <iostream>
#include <sstream>
#include "facedoor_verify.h"
// One command per line: key state id expires_ms sig fields now_ms (tab-separated) -> "ok" or why not.
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string key, state, id, expires, sig, fields, now;
    std::getline(in, key, '\t'); std::getline(in, state, '\t'); std::getline(in, id, '\t');
    std::getline(in, expires, '\t'); std::getline(in, sig, '\t'); std::getline(in, fields, '\t');
    std::getline(in, now, '\t');
    const char *why = facedoor::check_unlock(key, state, id, std::stod(expires), sig, std::stoul(fields),
                                             std::stod(now));
    std::cout << (why ? why : "ok") << std::endl;
  }
}
"""


@pytest.fixture(scope="module")
def esphome_verifier(tmp_path_factory) -> Path:
    """config/esphome/facedoor_verify.h (what the ESPHome example's lambda calls) built for this
    machine against the same mbedtls API the ESP32 has, behind a line-per-command harness."""
    import shutil
    import subprocess

    header = Path(__file__).resolve().parents[1] / "config" / "esphome" / "facedoor_verify.h"
    gxx = shutil.which("g++")
    if gxx is None or not Path("/usr/include/mbedtls/md.h").exists():
        pytest.skip("needs g++ and mbedtls headers (Debian: apt-get install g++ libmbedtls-dev)")
    work = tmp_path_factory.mktemp("esphome")
    (work / "main.cpp").write_text(ESPHOME_HARNESS)
    binary = work / "verify"
    build = subprocess.run([gxx, "-std=c++17", "-Wall", "-Werror", "-I", str(header.parent), str(work / "main.cpp"),
                            "-o", str(binary), "-lmbedcrypto"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return binary


def test_the_esphome_example_opens_only_for_an_authentic_fresh_first_seen_unlock(esphome_verifier: Path) -> None:
    import subprocess

    key = KEY.decode()
    now_ms = int(time.time() * 1000)

    def line(payload: str | dict, now: int = now_ms, device_key: str = key) -> str:
        body = json.loads(payload) if isinstance(payload, str) else payload
        return "\t".join([device_key, str(body.get("state", "")), str(body.get("id", "")),
                          str(body.get("expires_at_ms", 0)), str(body.get("sig", "")), str(len(body)), str(now)])

    genuine = unlock_payload(UNLOCK, now_ms + 5000, KEY)  # exactly what the door publishes
    body = json.loads(genuine)
    far = unlock_payload(UNLOCK, now_ms + 3_600_000, KEY)  # a door clock an hour fast
    cases = [
        (line(genuine), "ok"),
        (line(genuine), "replay"),
        (line({**body, "expires_at_ms": now_ms + 9000}), "bad signature"),  # stretched
        (line({"state": "UNLOCK", "expires_at_ms": now_ms + 5000, "id": str(uuid.uuid4()), "sig": "0" * 64}),
         "bad signature"),  # forged
        (line(unlock_payload(UNLOCK, now_ms + 5000)), "unexpected fields"),  # unsigned: no id, no sig
        (line(unlock_payload(UNLOCK, now_ms + 5000, KEY), device_key="another-key-0123456789abcdef0123"),
         "bad signature"),
        (line(unlock_payload(UNLOCK, now_ms - 1, KEY)), "expired"),
        (line(far), "too far ahead"),
        (line(unlock_payload(UNLOCK, now_ms + 5000, KEY), now=0), "no valid time"),
        (line(unlock_payload(UNLOCK, now_ms + 5000, KEY)), "ok"),  # a new command, a new id
    ]
    run = subprocess.run([str(esphome_verifier)], input="\n".join(c for c, _ in cases) + "\n",
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [want for _, want in cases]


def test_the_esphome_verifier_fails_closed_when_its_replay_memory_is_full(esphome_verifier: Path) -> None:
    import subprocess

    now_ms = int(time.time() * 1000)
    commands = [json.loads(unlock_payload(UNLOCK, now_ms + 60_000, KEY)) for _ in range(17)]
    lines = ["\t".join([KEY.decode(), c["state"], c["id"], str(c["expires_at_ms"]), c["sig"], "4", str(now_ms)])
             for c in commands]
    later = "\t".join([KEY.decode(), commands[16]["state"], commands[16]["id"], str(commands[16]["expires_at_ms"]),
                       commands[16]["sig"], "4", str(now_ms + 59_000)])
    run = subprocess.run([str(esphome_verifier)], input="\n".join([*lines, later]) + "\n", capture_output=True,
                         text=True, timeout=60)
    assert run.stdout.splitlines() == ["ok"] * 16 + ["replay cache full", "replay cache full"]
