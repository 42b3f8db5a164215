"""Home Assistant discovery against a real Mosquitto broker."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jinja2
import pytest
import yaml

from daemon_support import Subscriber
from facedoor.cli import main
from facedoor.config import FacedoorConfig, parse_config
from facedoor.homeassistant import EVENT_TYPES, HomeAssistantDiscovery, discovery_topic
from facedoor.mqtt import MqttLink

ACTION_TOPIC = "zigbee2mqtt/front_door/set"
DISCOVERY = "homeassistant/device/front/config"


def door_config(broker, tmp_path: Path, reconnect_s: tuple[float, float] = (0.1, 0.5), **extra) -> FacedoorConfig:
    raw = {
        "door_id": "front",
        "state_dir": str(tmp_path / "state"),
        "mqtt": {"host": broker.host, "port": broker.port,
                 "reconnect_min_s": reconnect_s[0], "reconnect_max_s": reconnect_s[1]},
        **extra,
    }
    return parse_config(raw)


@pytest.fixture
def discovery_link():
    """A started door link with Home Assistant discovery attached; stopped after the test."""
    started: list[MqttLink] = []

    def make(cfg: FacedoorConfig) -> tuple[MqttLink, HomeAssistantDiscovery]:
        link = MqttLink(cfg)
        discovery = HomeAssistantDiscovery(cfg, link)
        discovery.attach()
        link.start()
        started.append(link)
        assert link.wait_connected(5), "door link did not connect"
        return link, discovery

    yield make
    for link in started:
        link.stop()


def test_discovery_payload_shape(mosquitto, tmp_path, discovery_link) -> None:
    cfg = door_config(mosquitto, tmp_path)
    assert discovery_topic(cfg) == DISCOVERY
    discovery_link(cfg)
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
    assert set(by_uid) == {"facedoor_front_decision", "facedoor_front_last_identity", "facedoor_front_fps",
                           "facedoor_front_liveness"}
    assert set(cmps) == set(by_uid)  # component ids are the stable unique ids
    event = by_uid["facedoor_front_decision"]
    assert event["p"] == "event" and event["event_types"] == list(EVENT_TYPES)
    assert event["state_topic"] == "facedoor/front/decision" and "event_type" in event["value_template"]
    assert by_uid["facedoor_front_last_identity"]["state_topic"] == "facedoor/front/decision"
    fps = by_uid["facedoor_front_fps"]
    assert fps["state_topic"] == "facedoor/front/health" and fps["unit_of_measurement"] == "fps"
    liveness = by_uid["facedoor_front_liveness"]
    assert liveness["state_topic"] == "facedoor/front/health" and liveness["options"] == ["on", "off"]
    assert liveness["entity_category"] == "diagnostic"


def test_the_challenge_is_an_event_entity_only_when_it_is_on() -> None:
    """With liveness.challenge on, a fifth entity: an event per challenge, its type the direction, the text
    to speak an attribute (README's automation speaks it); none with the challenge off."""
    from facedoor.homeassistant import discovery_payload

    assert "facedoor_front_challenge" not in discovery_payload(parse_config({"door_id": "front"}))["cmps"]
    cfg = parse_config({"door_id": "front", "liveness": {"challenge": "on_doubt",
                                                         "challenge_directions": ["left", "right", "up"]}})
    challenge = discovery_payload(cfg)["cmps"]["facedoor_front_challenge"]
    assert challenge["p"] == "event" and challenge["state_topic"] == "facedoor/front/challenge"
    assert challenge["event_types"] == ["left", "right", "up"]
    message = {"id": "00000000000000aa", "door": "front", "track": 4, "direction": "up", "text": "Please look up",
               "timeout_s": 5.0, "ts": "2026-12-03T18:00:00.120Z", "ts_ms": 1, "expires_at_ms": 5001}
    rendered = json.loads(jinja2.Environment().from_string(challenge["value_template"]).render(value_json=message))
    assert rendered == {"event_type": "up", "text": "Please look up", "id": "00000000000000aa", "expires_at_ms": 5001}


def test_reannounce_on_home_assistant_birth(mosquitto, tmp_path, discovery_link) -> None:
    link, discovery = discovery_link(door_config(mosquitto, tmp_path))
    sub = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    try:
        assert len(sub.wait_count(DISCOVERY, 1)) == 1
        sub.client.publish("homeassistant/status", "offline", qos=1).wait_for_publish(2)
        sub.client.publish("homeassistant/status", "online", qos=1).wait_for_publish(2)
        msgs = sub.wait_count(DISCOVERY, 2)
        assert len(msgs) == 2 and json.loads(msgs[1]["payload"]) == json.loads(msgs[0]["payload"])
        time.sleep(0.3)
        assert len(sub.on(DISCOVERY)) == 2  # "offline" did not trigger an announcement
        assert discovery.announcements == 2
    finally:
        sub.stop()


def test_discovery_disabled_removes_device(mosquitto, tmp_path, discovery_link) -> None:
    old = Subscriber(mosquitto.host, mosquitto.port)
    old.client.publish(DISCOVERY, '{"stale": true}', qos=1, retain=True).wait_for_publish(2)
    old.stop()
    discovery_link(door_config(mosquitto, tmp_path, mqtt={
        "host": mosquitto.host, "port": mosquitto.port, "discovery": {"enabled": False}}))
    time.sleep(0.3)
    sub = Subscriber(mosquitto.host, mosquitto.port, DISCOVERY)
    try:
        time.sleep(0.5)
        assert sub.on(DISCOVERY) == []  # nothing retained any more
    finally:
        sub.stop()


def test_cli_ha_remove_clears_discovery(mosquitto, tmp_path, discovery_link, capsys) -> None:
    cfg = door_config(mosquitto, tmp_path)
    discovery_link(cfg)
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


