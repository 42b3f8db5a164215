"""The MQTT link against a real Mosquitto: expiry, retained status, never late, hooks."""
from __future__ import annotations

import json
import time

import pytest

from daemon_support import Subscriber, retained
from facedoor.config import FacedoorConfig, parse_config
from facedoor.mqtt import Delivery, MqttLink, expiry_interval, publish_once
from secure_broker import secure_broker


@pytest.fixture
def cfg(mosquitto):
    return parse_config({"door_id": "d1", "mqtt": {"port": mosquitto.port, "reconnect_min_s": 0.2,
                                                   "reconnect_max_s": 0.5}})


def decision(n: int) -> str:
    return json.dumps({"id": f"test-{n}", "decision": "unlock", "identity": "alice"})


def deliver(link: MqttLink, n: int, captured_mono: float) -> Delivery:
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


def secure_link_config(broker, **mqtt) -> FacedoorConfig:
    """The door's config for a secure_broker: TLS, the `door` user and its password file."""
    return parse_config({"door_id": broker.door_id, "mqtt": {
        "host": broker.host, "port": broker.port, "username": "door", "tls": {"ca": str(broker.ca)},
        "password_file": str(broker.password_files["door"]), "ack_timeout_s": 0.5, **mqtt}})


@pytest.fixture
def refusing_link(tmp_path):
    """A link through a Mosquitto whose ACL denies the door's decision topic; a consumer reads everything."""
    with secure_broker(tmp_path / "broker", deny=("facedoor/front/decision",)) as broker:
        link = MqttLink(secure_link_config(broker))
        link.start()
        assert link.wait_connected(10)
        sub = Subscriber(broker.host, broker.port, "#", tls_ca=broker.ca, username="consumer",
                         password=broker.passwords["consumer"])
        try:
            yield broker, link, sub
        finally:
            sub.stop()
            link.stop()


def test_a_refused_decision_is_not_delivered_and_the_topic_is_reported(refusing_link, caplog) -> None:
    """Mosquitto answers PUBACK 0x87 Not authorized: paho calls that published, the link must not."""
    broker, link, sub = refusing_link
    for n in (1, 2):
        assert deliver(link, n, time.monotonic()) is Delivery.REFUSED
    assert link.refused == {"facedoor/front/decision": "Not authorized"} and link.refusals == 2
    assert link.condition == "refused" and link.state == "up" and link.dropped_decisions == 2
    assert link.live  # the probe and status are accepted: it is not a stall, just a refusal
    assert sub.wait_for(lambda m: m["topic"] == "facedoor/front/decision", 1.0) is None  # it went nowhere
    errors = [r for r in caplog.records if "refuses publishes to facedoor/front/decision" in r.getMessage()]
    assert len(errors) == 1  # once per refusal streak, not once per message
    assert link.stalls == 0 and link.connected


def test_a_refused_probe_leaves_the_link_not_live(tmp_path) -> None:
    """Only an accepted PUBACK proves the link live: an ACL that refuses even the probe decides nothing."""
    with secure_broker(tmp_path / "broker", deny=("facedoor/front/probe",)) as broker:
        link = MqttLink(secure_link_config(broker))
        link.start()
        try:
            assert link.wait_connected(10)
            deadline = time.monotonic() + 5
            while (link.live or "facedoor/front/probe" not in link.refused) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not link.live and link.connected and link.condition == "refused"
            assert link.refused == {"facedoor/front/probe": "Not authorized"} and link.stalls == 0
        finally:
            link.stop()


def test_a_topic_accepted_again_leaves_the_refused_list(refusing_link) -> None:
    broker, link, _ = refusing_link
    assert link.deliver("facedoor/front/decision", "{}", time.monotonic(), 5.0, "refused") is Delivery.REFUSED
    assert link.deliver("facedoor/front/health", "{}", time.monotonic(), 5.0, "accepted") is Delivery.DELIVERED
    assert "facedoor/front/decision" in link.refused and "facedoor/front/health" not in link.refused
    link.refused["facedoor/front/health"] = "Not authorized"  # as if an earlier health report had been refused
    assert link.publish(link.health_topic, "{}")
    deadline = time.monotonic() + 3
    while "facedoor/front/health" in link.refused and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(link.refused) == ["facedoor/front/decision"]  # read from the watcher's PUBACK too


def test_publish_once_reports_a_refusal(refusing_link) -> None:
    broker, link, _ = refusing_link
    assert publish_once(link.cfg, "facedoor/front/decision", b"{}", retain=False, timeout_s=5) is False
    assert publish_once(link.cfg, "facedoor/front/health", b"{}", retain=False, timeout_s=5) is True
