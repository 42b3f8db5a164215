"""Broker-side security on a real Mosquitto: TLS with a generated CA, password file, per-user ACLs."""
from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from secure_broker import SecureBroker, TlsClient, make_certificates, secure_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBroker]:
    with secure_broker(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def consumer(broker: SecureBroker) -> Iterator[TlsClient]:
    client = TlsClient(broker, "consumer", broker.passwords["consumer"])
    assert client.connected.wait(10), client.connack
    client.subscribe("#")
    yield client
    client.stop()


def test_door_with_ca_and_password_connects_and_publishes(broker: SecureBroker, consumer: TlsClient) -> None:
    door = TlsClient(broker, "door", broker.password_files["door"].read_text().strip())
    try:
        assert door.connected.wait(10), door.connack
        for topic in ("facedoor/front/decision", broker.relay_topic, "homeassistant/device/front/config"):
            assert not door.publish(topic, b"hello").is_failure
            assert consumer.wait(lambda t=topic: (t, b"hello") in consumer.messages), f"{topic} not delivered"
    finally:
        door.stop()


def test_wrong_or_missing_password_is_refused(broker: SecureBroker) -> None:
    for user, password in (("door", "not-the-password"), ("consumer", broker.passwords["door"]), (None, None)):
        client = TlsClient(broker, user, password)
        try:
            assert client.done.wait(10)
            assert not client.connected.is_set()
            assert client.connack is not None and client.connack.is_failure, client.connack
        finally:
            client.stop()


def test_publishing_outside_the_acl_is_not_delivered(broker: SecureBroker, consumer: TlsClient) -> None:
    door = TlsClient(broker, "door", broker.passwords["door"])
    try:
        assert door.connected.wait(10)
        forbidden = ["facedoor/back/decision", "cmnd/garage/POWER", "homeassistant/status", "facedoor"]
        for topic in forbidden:
            assert door.publish(topic, b"forged").is_failure, topic  # MQTT v5: PUBACK "not authorized"
        assert consumer.publish("facedoor/front/decision", b"forged").is_failure  # read-only user
        door.publish("facedoor/front/health", b"marker")  # after the forbidden ones, on the same broker
        assert consumer.wait(lambda: ("facedoor/front/health", b"marker") in consumer.messages)
        assert [m for m in consumer.messages if m[1] == b"forged"] == []
    finally:
        door.stop()


def test_plaintext_to_the_tls_port_gets_no_connack(broker: SecureBroker) -> None:
    user, password = b"door", broker.passwords["door"].encode()
    body = b"\x00\x04MQTT\x05\xc2\x00\x0a\x00" + struct.pack(">H", 3) + b"abc" \
        + struct.pack(">H", len(user)) + user + struct.pack(">H", len(password)) + password
    with socket.create_connection((broker.host, broker.port), timeout=10) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        try:
            reply = sock.recv(64)
        except ConnectionResetError:
            reply = b""
    assert not reply.startswith(b"\x20")  # no CONNACK: the password never reached an MQTT session


def test_a_client_that_does_not_trust_the_ca_refuses_the_broker(broker: SecureBroker, tmp_path: Path) -> None:
    other_ca, _, _ = make_certificates(tmp_path / "other-pki", "other")
    client = TlsClient(broker, "door", broker.passwords["door"], ca=other_ca)
    try:
        assert client.done.wait(10) and not client.connected.is_set()
        assert client.error is not None and "certificate verify failed" in str(client.error)
    finally:
        client.stop()


def test_a_denied_topic_is_refused_with_not_authorized(tmp_path: Path) -> None:
    """`deny=` takes one topic from the door user; the rest of its ACL still holds."""
    with secure_broker(tmp_path / "broker", deny=("facedoor/front/decision",)) as broker:
        door = TlsClient(broker, "door", broker.passwords["door"])
        try:
            assert door.connected.wait(10)
            refused = door.publish("facedoor/front/decision", b"x")
            assert refused.is_failure and refused.value == 0x87, refused  # Not authorized
            assert not door.publish("facedoor/front/health", b"x").is_failure
            assert not door.publish(broker.relay_topic, b"x").is_failure
        finally:
            door.stop()
