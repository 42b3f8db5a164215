"""The daemon's MQTT link (paho-mqtt 2.x, MQTT v5): status, decisions, health, and hooks.

Never late: paho queues QoS>0 publishes made while disconnected and re-sends unacknowledged
ones after a reconnect. A door must not open on such a message, so this link keeps its own
`connected` flag (set in on_connect/on_disconnect), refuses publishes while it is down, purges
paho's outgoing queue on every (re)connect before paho re-sends it, and `publish_decision`
drops a decision older than its TTL. Every refused decision is logged and counted.

Hooks for other modules (Home Assistant discovery, unlock action): `add_on_connect(callback)`,
`subscribe(topic, handler)`, `publish(topic, payload, qos, retain, expiry_s) -> bool`.
"""
from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import SecretStr

from .config import FacedoorConfig

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


class MqttLink:
    """One MQTT v5 connection for a door: retained status with Last Will, QoS 1 decisions."""

    def __init__(self, cfg: FacedoorConfig, password: SecretStr | None = None):
        self.cfg = cfg
        self.status_topic = cfg.topic("status")
        self.decision_topic = cfg.topic("decision")
        self.health_topic = cfg.topic("health")
        m = cfg.mqtt
        self.client_id = m.client_id or f"facedoor-{cfg.door_id}"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        self._client.will_set(self.status_topic, "offline", qos=1, retain=True)
        if m.username:
            self._client.username_pw_set(m.username, password.get_secret_value() if password else None)
        if m.tls is not None:
            self._client.tls_set(
                ca_certs=str(m.tls.ca) if m.tls.ca else None,
                certfile=str(m.tls.cert) if m.tls.cert else None,
                keyfile=str(m.tls.key) if m.tls.key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self._client.reconnect_delay_set(m.reconnect_min_s, m.reconnect_max_s)
        self._client.max_queued_messages_set(64)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._subscriptions: dict[str, tuple[Handler, int]] = {}
        self.connects = 0
        self.reconnects = 0
        self.dropped_decisions = 0
        self.purged = 0
        self.failed_attempts = 0
        self.down_since: float | None = time.monotonic()
        self._stopping = False
        self.last_outage_s: float | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (the broker may be down: paho keeps retrying)."""
        m = self.cfg.mqtt
        log.info("MQTT: connecting to %s:%d as %s", m.host, m.port, self.client_id,
                 extra={"fields": {"event": "mqtt_connecting", "tls": m.tls is not None}})
        self._client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=True)
        self._client.loop_start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish retained `offline`, then disconnect cleanly (no Last Will needed)."""
        if self.connected:
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError) as exc:
                log.warning("MQTT: could not confirm retained offline status: %s", exc)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # --- hooks -------------------------------------------------------------------------------
    def add_on_connect(self, callback: Callable[[], None]) -> None:
        """Call CALLBACK (from paho's thread) after every (re)connect, once status is online."""
        self._on_connect_hooks.append(callback)
        if self.connected:
            callback()

    def subscribe(self, topic: str, handler: Handler, qos: int = 1) -> None:
        """Route messages on TOPIC to HANDLER(topic, payload); renewed on every reconnect."""
        with self._lock:
            self._subscriptions[topic] = (handler, qos)
        if self.connected:
            self._client.subscribe(topic, qos)

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False,
                expiry_s: float | None = None) -> bool:
        """Publish now, or return False (and queue nothing) while the broker is unreachable."""
        if not self.connected:
            return False
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, int(math.ceil(expiry_s)))
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_decision(self, payload: dict[str, Any], captured_mono: float, ttl_s: float) -> bool:
        """QoS 1, never retained, expiry = remaining TTL; dropped (False) if late or offline."""
        remaining = ttl_s - (time.monotonic() - captured_mono)
        fields = {"event": "decision_dropped", "id": payload.get("id"), "decision": payload.get("decision"),
                  "identity": payload.get("identity")}
        if remaining <= 0:
            self.dropped_decisions += 1
            log.warning("decision %s dropped: %.2fs old, TTL %.1fs; the door stays as it is",
                        payload.get("id"), ttl_s - remaining, ttl_s,
                        extra={"fields": {**fields, "reason": "expired"}})
            return False
        if not self.publish(self.decision_topic, json.dumps(payload), qos=1, retain=False, expiry_s=remaining):
            self.dropped_decisions += 1
            log.warning("decision %s dropped: broker %s:%d unreachable; never queued for later",
                        payload.get("id"), self.cfg.mqtt.host, self.cfg.mqtt.port,
                        extra={"fields": {**fields, "reason": "disconnected"}})
            return False
        return True

    # --- paho callbacks (paho's network thread) ----------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT: broker refused the connection: %s", reason,
                        extra={"fields": {"event": "mqtt_refused"}})
            return
        stale = client.drop_out_messages()  # before paho re-sends them: nothing goes out late
        if stale:
            self.purged += len(stale)
            log.warning("MQTT: purged %d unacknowledged message(s) from before the reconnect", len(stale),
                        extra={"fields": {"event": "mqtt_purged", "count": len(stale)}})
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        if self.down_since is not None:
            self.last_outage_s = time.monotonic() - self.down_since
            self.down_since = None
        self.failed_attempts = 0
        client.publish(self.status_topic, "online", qos=1, retain=True)
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic, (_, qos) in subs:
            client.subscribe(topic, qos)
        self._connected.set()
        log.info("MQTT: connected to %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port,
                 extra={"fields": {"event": "mqtt_up", "reconnects": self.reconnects,
                                   "outage_s": self.last_outage_s, "dropped_decisions": self.dropped_decisions}})
        for hook in list(self._on_connect_hooks):
            try:
                hook()
            except Exception:  # a faulty hook must not take the link down
                log.exception("MQTT on-connect hook %r failed", hook)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping:
            log.info("MQTT: disconnected from %s:%d (stopping)", self.cfg.mqtt.host, self.cfg.mqtt.port,
                     extra={"fields": {"event": "mqtt_closed"}})
        elif was_connected:
            self.down_since = time.monotonic()
            log.warning("MQTT: disconnected from %s:%d (%s); decisions are dropped until it is back",
                        self.cfg.mqtt.host, self.cfg.mqtt.port, reason,
                        extra={"fields": {"event": "mqtt_down"}})

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.failed_attempts += 1
        if self.failed_attempts % 12 == 1:  # the first failure, then about once a minute
            log.warning("MQTT: broker %s:%d unreachable (%d attempt(s)); retrying every <= %.0fs, "
                        "deciding nothing until it is back", self.cfg.mqtt.host, self.cfg.mqtt.port,
                        self.failed_attempts, self.cfg.mqtt.reconnect_max_s,
                        extra={"fields": {"event": "mqtt_unreachable"}})

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for topic, (h, _) in self._subscriptions.items() if mqtt.topic_matches_sub(topic, message.topic)]
        for handler in handlers:
            try:
                handler(message.topic, message.payload)
            except Exception:
                log.exception("MQTT handler for %s failed", message.topic)
