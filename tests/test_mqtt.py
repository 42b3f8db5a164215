"""The MQTT link against a real Mosquitto: expiry, retained status, never late, hooks."""
from __future__ import annotations

import json
import time

import pytest

from daemon_support import Subscriber, retained
from facedoor.config import parse_config
from facedoor.mqtt import MqttLink, expiry_interval


@pytest.fixture
def cfg(mosquitto):
    return parse_config({"door_id": "d1", "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.2,
                                                   "reconnect_max_s": 0.5}})


def decision(n: int) -> str:
    return json.dumps({"id": f"test-{n}", "decision": "unlock", "identity": "alice"})


def deliver(link: MqttLink, n: int, captured_mono: float) -> bool:
    return link.deliver(link.decision_topic, decision(n), captured_mono, 5.0, f"decision test-{n}")


def test_expiry_rounds_down_and_refuses_under_a_second() -> None:
    assert expiry_interval(4.99) == 4 and expiry_interval(1.0) == 1
    assert expiry_interval(0.99) is None and expiry_interval(-1) is None


@pytest.fixture
def link(cfg):
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(5)
    yield link
    link.stop()


def test_status_is_retained_online_then_offline_on_stop(mosquitto, cfg) -> None:
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(5)
    status = retained(mosquitto.host, mosquitto.port, "facedoor/d1/status")
    assert status is not None and status["payload"] == "online"
    link.stop()
    status = retained(mosquitto.host, mosquitto.port, "facedoor/d1/status")
    assert status is not None and status["payload"] == "offline"


def test_decision_is_qos1_not_retained_with_expiry(mosquitto, link) -> None:
    sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/d1/decision")
    try:
        time.sleep(0.3)
        assert deliver(link, 1, time.monotonic())  # True only after its PUBACK
        got = sub.wait_for(lambda m: True, 5)
        assert got is not None and json.loads(got["payload"])["id"] == "test-1"
        assert got["qos"] == 1 and got["retain"] is False and got["expiry"] == 4  # 4.99 s left, rounded down
    finally:
        sub.stop()
    assert retained(mosquitto.host, mosquitto.port, "facedoor/d1/decision", timeout=1.0) is None


def test_a_decision_older_than_its_ttl_is_dropped(mosquitto, link) -> None:
    sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/d1/decision")
    try:
        time.sleep(0.3)
        assert not deliver(link, 2, time.monotonic() - 6.0)
        assert link.dropped_decisions == 1
        assert sub.wait_for(lambda m: True, 1.5) is None
    finally:
        sub.stop()


def test_nothing_is_queued_while_the_broker_is_down(mosquitto, link) -> None:
    mosquitto.stop()
    deadline = time.monotonic() + 5
    while link.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not link.connected
    assert not deliver(link, 3, time.monotonic())
    assert not link.publish("facedoor/d1/other", "x")
    mosquitto.start()
    sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/d1/#")
    try:
        assert link.wait_connected(10) and link.reconnects == 1
        assert sub.wait_for(lambda m: m["topic"].endswith("/decision") or m["topic"].endswith("/other"), 2.0) is None
    finally:
        sub.stop()


def test_an_unacknowledged_decision_is_never_resent_after_reconnect(mosquitto, cfg) -> None:
    """paho re-sends unacknowledged QoS 1 messages after a reconnect; the link purges them."""
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"reconnect_min_s": 2.0,
                                                                       "reconnect_max_s": 2.0})})
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(5)
    try:
        mosquitto.pause()  # broker hangs: the PUBACK never comes
        assert not deliver(link, 4, time.monotonic())  # not acknowledged in time: a stall, not delivered
        assert link.state == "stalled" and not link.connected
        mosquitto.proc.kill()  # then dies; paho still holds decision 4 as in flight
        mosquitto.proc.wait()
        mosquitto.proc = None
        mosquitto.start()
        sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/d1/decision")  # subscribed before the link is back
        try:
            assert link.wait_connected(10)
            assert sub.wait_for(lambda m: True, 2.0) is None
            assert link.purged >= 1
        finally:
            sub.stop()
    finally:
        link.stop()


def test_hooks_resubscribe_and_run_on_every_connect(mosquitto, link) -> None:
    connects, seen = [], []
    link.add_on_connect(lambda: connects.append(1))
    link.subscribe("facedoor/d1/cmd", lambda topic, payload: seen.append((topic, payload)))
    assert connects == [1]  # already connected: called at once
    mosquitto.stop()
    time.sleep(0.5)
    mosquitto.start()
    assert link.wait_connected(10)
    deadline = time.monotonic() + 5
    while len(connects) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(connects) == 2
    time.sleep(0.3)
    sub = Subscriber(mosquitto.host, mosquitto.port, "unused/#")
    try:
        time.sleep(0.3)
        sub.client.publish("facedoor/d1/cmd", b"hello", qos=1)
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [("facedoor/d1/cmd", b"hello")]
    finally:
        sub.stop()


def test_password_is_read_from_file_and_never_logged(tmp_path, caplog) -> None:
    secret = "pa55-w0rd-xyz"
    (tmp_path / "pw").write_text(secret + "\n")
    cfg = parse_config({"mqtt": {"username": "door", "password_file": str(tmp_path / "pw"), "port": 1}})
    assert cfg.mqtt.password().get_secret_value() == secret
    caplog.set_level("DEBUG")
    link = MqttLink(cfg)  # reads the password file itself (facedoor.mqtt.create_client)
    link.start()
    time.sleep(0.3)
    link.stop()
    assert secret not in caplog.text and secret not in repr(cfg)
