"""HA discovery, the unlock action and the audit hook against a real Mosquitto broker."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml

from daemon_support import Subscriber
from facedoor.audit import read_entries
from facedoor.cli import main
from facedoor.config import parse_config
from facedoor.homeassistant import EVENT_TYPES, discovery_topic
from facedoor.integrations import Integrations
from facedoor.mqtt import MqttLink

ACTION_TOPIC = "zigbee2mqtt/front_door/set"
DISCOVERY = "homeassistant/device/front/config"


def door_config(broker, tmp_path: Path, reconnect_s: tuple[float, float] = (0.1, 0.5), **extra):
    raw = {
        "door_id": "front",
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port,
                 "reconnect_min_s": reconnect_s[0], "reconnect_max_s": reconnect_s[1]},
        **extra,
    }
    return parse_config(raw)


def unlock_message(identity: str = "alice", decision: str = "unlock", reason: str = "match") -> dict:
    return {"id": str(uuid.uuid4()), "door": "front", "decision": decision, "reason": reason,
            "identity": identity if decision == "unlock" else None, "distance": 0.42, "threshold": 0.7,
            "frames": 3, "ts_ms": int(time.time() * 1000), "ttl_s": 5.0, "latency_ms": 31.0}


@pytest.fixture
def link_factory():
    links: list[tuple[MqttLink, Integrations]] = []

    def make(cfg):
        link = MqttLink(cfg)
        integrations = Integrations(cfg, link)
        link.start()
        assert link.wait_connected(5), "daemon link did not connect"
        links.append((link, integrations))
        return link, integrations

    yield make
    for link, integrations in links:
        integrations.close()
        link.stop()


def test_discovery_payload_shape(mosquitto, tmp_path, link_factory) -> None:
    cfg = door_config(mosquitto, tmp_path)
    assert discovery_topic(cfg) == DISCOVERY
    link_factory(cfg)
    sub = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    try:
        (msg,) = sub.wait_count(DISCOVERY)
    finally:
        sub.stop()
    assert msg["retain"]  # retained: HA finds the door even if it starts later
    payload = json.loads(msg["payload"])
    assert payload["dev"]["ids"] == ["facedoor_front"] and payload["dev"]["name"]
    assert payload["o"]["name"] == "facedoor" and payload["o"]["sw"]
    assert payload["availability"] == [
        {"topic": "facedoor/front/status", "payload_available": "online", "payload_not_available": "offline"}
    ]
    cmps = payload["cmps"]
    assert {c["p"] for c in cmps.values()} == {"event", "sensor"}
    by_uid = {c["unique_id"]: c for c in cmps.values()}
    assert set(by_uid) == {"facedoor_front_decision", "facedoor_front_last_identity", "facedoor_front_fps"}
    assert set(cmps) == set(by_uid)  # component ids are the stable unique ids
    event = by_uid["facedoor_front_decision"]
    assert event["p"] == "event" and event["event_types"] == list(EVENT_TYPES)
    assert event["state_topic"] == "facedoor/front/decision" and "event_type" in event["value_template"]
    assert by_uid["facedoor_front_last_identity"]["state_topic"] == "facedoor/front/decision"
    fps = by_uid["facedoor_front_fps"]
    assert fps["state_topic"] == "facedoor/front/health" and fps["unit_of_measurement"] == "fps"


def test_reannounce_on_home_assistant_birth(mosquitto, tmp_path, link_factory) -> None:
    link, integrations = link_factory(door_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    try:
        assert len(sub.wait_count(DISCOVERY, 1)) == 1
        sub.client.publish("homeassistant/status", "offline", qos=1).wait_for_publish(2)
        sub.client.publish("homeassistant/status", "online", qos=1).wait_for_publish(2)
        msgs = sub.wait_count(DISCOVERY, 2)
        assert len(msgs) == 2 and json.loads(msgs[1]["payload"]) == json.loads(msgs[0]["payload"])
        time.sleep(0.3)
        assert len(sub.on(DISCOVERY)) == 2  # "offline" did not trigger an announcement
        assert integrations.discovery.announcements == 2
    finally:
        sub.stop()


def test_discovery_disabled_removes_device(mosquitto, tmp_path, link_factory) -> None:
    old = Subscriber(mosquitto.host, mosquitto.port)
    old.client.publish(DISCOVERY, '{"stale": true}', qos=1, retain=True).wait_for_publish(2)
    old.stop()
    link_factory(door_config(mosquitto, tmp_path, mqtt={
        "host": mosquitto.host, "port": mosquitto.port, "discovery": {"enabled": False}}))
    time.sleep(0.3)
    sub = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    try:
        time.sleep(0.5)
        assert sub.on(DISCOVERY) == []  # nothing retained any more
    finally:
        sub.stop()


def test_cli_ha_remove_clears_discovery(mosquitto, tmp_path, link_factory, capsys) -> None:
    cfg = door_config(mosquitto, tmp_path)
    link_factory(cfg)
    sub = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    sub.wait_count(DISCOVERY)
    sub.stop()
    config_file = tmp_path / "facedoor.yaml"
    config_file.write_text(yaml.safe_dump({"mqtt": {"host": mosquitto.host, "port": mosquitto.port}}))
    assert main(["--config", str(config_file), "ha-remove"]) == 0
    assert DISCOVERY in capsys.readouterr().out
    after = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    try:
        time.sleep(0.5)
        assert after.on(DISCOVERY) == []
    finally:
        after.stop()


def test_ha_remove_without_broker_is_a_clear_error(tmp_path, capsys) -> None:
    from facedoor.demo.broker import free_port

    config_file = tmp_path / "facedoor.yaml"
    config_file.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": free_port()}}))
    assert main(["--config", str(config_file), "ha-remove", "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not reach the MQTT broker" in err


def unlock_config(mosquitto, tmp_path, reconnect_s: tuple[float, float] = (0.1, 0.5), **action):
    return door_config(mosquitto, tmp_path, reconnect_s, unlock_action={
        "topic": ACTION_TOPIC, "payload": '{"state": "UNLOCK"}', **action})


def test_unlock_action_once_per_unlock_never_retained(mosquitto, tmp_path, link_factory) -> None:
    link, integrations = link_factory(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        integrations.on_decision(unlock_message(), delivered=True)
        integrations.on_decision(unlock_message(decision="deny", reason="unknown"), delivered=True)
        integrations.on_decision(unlock_message("bob"), delivered=False)  # decision itself was dropped
        (msg,) = sub.wait_count(ACTION_TOPIC, 1)
        time.sleep(0.5)
        assert len(sub.on(ACTION_TOPIC)) == 1
        assert msg["payload"] == '{"state": "UNLOCK"}' and not msg["retain"]
        assert msg["expiry"] is not None and 1 <= msg["expiry"] <= 5
    finally:
        sub.stop()
    late = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)  # a new subscriber gets no retained unlock
    try:
        time.sleep(0.5)
        assert late.on(ACTION_TOPIC) == []
    finally:
        late.stop()


def test_unlock_action_dropped_when_decision_is_stale(mosquitto, tmp_path, link_factory) -> None:
    link, integrations = link_factory(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        stale = {**unlock_message(), "ts_ms": int((time.time() - 6) * 1000)}
        assert integrations.unlock.on_decision(stale) is False
        time.sleep(0.5)
        assert sub.on(ACTION_TOPIC) == []
    finally:
        sub.stop()


def test_unlock_action_never_sent_during_or_after_outage(mosquitto, tmp_path, link_factory) -> None:
    link, integrations = link_factory(unlock_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        mosquitto.stop()
        deadline = time.monotonic() + 5
        while link.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected
        assert integrations.unlock.on_decision(unlock_message()) is False
        integrations.on_decision(unlock_message(), delivered=False)
        mosquitto.start()
        assert link.wait_connected(10)
        time.sleep(1.0)  # give any queued message every chance to arrive
        assert sub.on(ACTION_TOPIC) == []
        assert integrations.unlock.sent_unlocks == 0
    finally:
        sub.stop()


def test_relock_after_delay_and_pending_relock_sent_on_reconnect(mosquitto, tmp_path, link_factory) -> None:
    # the door reconnects after the test subscriber (1.5 s vs <= 0.5 s), so the subscriber sees the re-sent lock
    link, integrations = link_factory(unlock_config(
        mosquitto, tmp_path, (1.5, 1.5), lock_payload='{"state": "LOCK"}', relock_after_s=0.5))
    sub = Subscriber(mosquitto.host, mosquitto.port, ACTION_TOPIC)
    try:
        assert integrations.unlock.on_decision(unlock_message())
        msgs = sub.wait_count(ACTION_TOPIC, 2)
        assert [m["payload"] for m in msgs] == ['{"state": "UNLOCK"}', '{"state": "LOCK"}']
        assert msgs[1]["recv"] - msgs[0]["recv"] >= 0.4 and not msgs[1]["retain"]
        # second visit: the broker goes away before the relock is due; the lock follows on reconnect
        assert integrations.unlock.on_decision(unlock_message())
        sub.wait_count(ACTION_TOPIC, 3)
        mosquitto.stop()
        time.sleep(1.0)
        mosquitto.start()
        assert sub.subscribed.wait(10)
        assert link.wait_connected(10)
        msgs = sub.wait_count(ACTION_TOPIC, 4, timeout=10)
        assert [m["payload"] for m in msgs][2:] == ['{"state": "UNLOCK"}', '{"state": "LOCK"}']
    finally:
        sub.stop()


def test_audit_entry_for_each_decision(mosquitto, tmp_path, link_factory) -> None:
    cfg = unlock_config(mosquitto, tmp_path)
    link, integrations = link_factory(cfg)
    sent = [unlock_message(), unlock_message(decision="deny", reason="unknown"), unlock_message("bob")]
    integrations.on_decision(sent[0], delivered=True)
    integrations.on_decision(sent[1], delivered=True)
    integrations.on_decision(sent[2], delivered=False)
    integrations.audit.close()
    entries = list(read_entries(tmp_path / "state" / "audit.jsonl"))
    assert [e["id"] for e in entries] == [m["id"] for m in sent]
    assert [e["decision"] for e in entries] == ["unlock", "deny", "unlock"]
    assert [e["delivered"] for e in entries] == [True, True, False]
    assert entries[0]["unlock_action"] is True and "unlock_action" not in entries[2]
    assert entries[0]["identity"] == "alice" and entries[0]["distance"] == 0.42 and entries[0]["frames"] == 3


@pytest.mark.parametrize("name", ["zigbee2mqtt", "tasmota", "esphome"])
def test_unlock_examples_are_valid_configs(name) -> None:
    from facedoor.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / f"unlock-{name}.yaml")
    action = cfg.unlock_action
    assert action is not None and action.payload and action.lock_payload and action.relock_after_s
