"""The daemon's MQTT link (paho-mqtt 2.x, MQTT v5): status, decisions, health, and hooks.

The delivery contract: **an unlock is never delivered late.**

- Down: paho queues QoS>0 publishes made while disconnected and re-sends unacknowledged ones
  after a reconnect. This link keeps its own `connected` flag (set only on CONNACK), refuses
  publishes while it is down, and purges paho's outgoing queue on every (re)connect before paho
  re-sends it, so nothing from before an outage goes out after it.
- Stalled (broker process paused, TCP still up): publishes are accepted by the socket but never
  acknowledged, and a resumed broker would deliver them with a full Message Expiry (MQTT v5 counts
  it from the broker's receipt). So a QoS 1 publish that gets no PUBACK within
  `mqtt.ack_timeout_s` makes the link a *stall*: treated exactly like an outage (`connected`
  false, nothing decided). Locks still go out on the stalled connection (`publish_lock`), then,
  `ack_timeout_s` later, the socket is dropped and paho reconnects (purging its queue). A QoS 1
  probe, sent whenever nothing was acknowledged for half of `ack_timeout_s`, keeps this check
  running while nobody is at the door, and `live` (connected, and a PUBACK within the last
  `ack_timeout_s`) is what the door decides on: a stall that begins unseen can catch at most the
  messages of that last second, and those carry `expires_at_ms` for their consumers to refuse.
- `deliver()` publishes one QoS 1 message and waits (bounded by its remaining TTL and
  `ack_timeout_s`) for its PUBACK, and reads the PUBACK's reason code: only a success code
  (below 0x80) is a `Delivery.DELIVERED`, meaning the broker has it *now*. A failure code (0x87
  Not authorized from an ACL, 0x97 Quota exceeded, ...) is a `Delivery.REFUSED`: the message went
  nowhere. The unlock action only follows a decision that was delivered this way, and chases an
  unlock of its own that was not acknowledged in time with the lock command (facedoor.unlock).
- Refused: every PUBACK's reason code is read (decisions, the relay command, health, the probe,
  the status). A topic whose latest message was refused is listed in `refused` (topic -> reason)
  until one is accepted there again; `condition` is then `refused` and the health report says so.
  Only an *accepted* PUBACK proves the link live: a broker that refuses even the probe leaves the
  door deciding nothing.
- Message Expiry is the remaining TTL rounded *down* (a message that has under a second left is
  not sent); every TTL is measured on one monotonic clock from the frame's capture.

Hooks for the listeners (Home Assistant discovery, unlock action) are the `MqttHooks` protocol.
"""
from __future__ import annotations

import enum
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from facedoor.config import FacedoorConfig

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
MAX_QUEUED = 64  # paho's own queue bound; everything in it is purged on reconnect anyway
OUTCOME_KEEP_S = 60.0  # a PUBACK reason nobody claimed (an untracked publish) is forgotten after this


class Delivery(enum.Enum):
    """How a `deliver()` ended; truthy only for DELIVERED (the broker accepted it in time)."""

    DELIVERED = "delivered"
    REFUSED = "refused"                # PUBACK with a failure reason code (>= 0x80): it went nowhere
    EXPIRED = "expired"                # under a second of its TTL left: not sent
    DISCONNECTED = "disconnected"      # the link is down or stalled: not sent
    UNACKNOWLEDGED = "unacknowledged"  # no PUBACK in time: a stall (a resumed broker may still deliver it)
    UNAUDITED = "unaudited"            # audit.required and its audit entry could not be written: not sent

    def __bool__(self) -> bool:
        return self is Delivery.DELIVERED


def is_refusal(reason: Any) -> bool:
    """True for a PUBACK reason code that refuses the message (MQTT v5: 0x80 and above)."""
    return bool(getattr(reason, "is_failure", False))


class MqttHooks(Protocol):
    """The part of the link that listeners use (Home Assistant discovery, unlock action)."""

    @property
    def connected(self) -> bool: ...
    def add_on_connect(self, callback: Callable[[], object]) -> None: ...
    def subscribe(self, topic: str, handler: Handler, qos: int = 1, *, retained: bool = True,
                  on_refused: Callable[[str, str], object] | None = None) -> None: ...
    def publish(self, topic: str, payload: str | bytes, retain: bool = False,
                expiry_s: float | None = None) -> bool: ...
    def deliver(self, topic: str, payload: str | bytes, captured_mono: float, ttl_s: float,
                what: str) -> Delivery: ...
    def publish_lock(self, topic: str, payload: str | bytes) -> bool: ...


def create_client(cfg: FacedoorConfig, client_id: str) -> mqtt.Client:
    """A paho MQTT v5 client with the configured credentials and TLS: the one factory for the
    daemon's link and the one-shot publishers (`facedoor ha-remove`)."""
    m = cfg.mqtt
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if m.username:
        password = m.password()
        client.username_pw_set(m.username, password.get_secret_value() if password else None)
    if m.tls is not None:
        client.tls_set(
            ca_certs=str(m.tls.ca) if m.tls.ca else None,
            certfile=str(m.tls.cert) if m.tls.cert else None,
            keyfile=str(m.tls.key) if m.tls.key else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    return client


def expiry_interval(remaining_s: float) -> int | None:
    """MQTT v5 Message Expiry for REMAINING_S: whole seconds rounded down, None under one second."""
    seconds = math.floor(remaining_s)
    return seconds if seconds >= 1 else None


def publish_once(cfg: FacedoorConfig, topic: str, payload: bytes, *, retain: bool, timeout_s: float) -> bool:
    """Connect with a one-off client id (never the daemon's, which would kick it off the
    broker), publish one QoS 1 message, wait for its PUBACK, disconnect. False on timeout or
    when the broker refused it (a failure reason code in the PUBACK)."""
    client = create_client(cfg, f"facedoor-{cfg.door_id}-cli-{os.getpid()}")
    reasons: dict[int, Any] = {}
    client.on_publish = lambda _c, _u, mid, reason, _p: reasons.__setitem__(mid, reason)
    m = cfg.mqtt
    try:
        client.connect(m.host, m.port, keepalive=m.keepalive_s)
    except OSError as exc:
        log.warning("MQTT broker %s:%d unreachable: %s", m.host, m.port, exc)
        return False
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout_s)
        if info.is_published() and is_refusal(reasons.get(info.mid)):
            log.warning("the broker refused the publish to %s (%s)", topic, reasons[info.mid])
            return False
        return info.is_published()
    except (RuntimeError, ValueError) as exc:
        log.warning("publish to %s failed: %s", topic, exc)
        return False
    finally:
        client.disconnect()
        client.loop_stop()


class MqttLink:
    """One MQTT v5 connection for a door: retained status with Last Will, acknowledged decisions."""

    def __init__(self, cfg: FacedoorConfig):
        self.cfg = cfg
        self.status_topic = cfg.topic("status")
        self.decision_topic = cfg.topic("decision")
        self.health_topic = cfg.topic("health")
        self.probe_topic = cfg.topic("probe")
        m = cfg.mqtt
        self.client_id = m.client_id or f"facedoor-{cfg.door_id}"
        self.ack_timeout_s = m.ack_timeout_s
        self._client = create_client(cfg, self.client_id)
        self._client.will_set(self.status_topic, "offline", qos=1, retain=True)
        self._client.reconnect_delay_set(m.reconnect_min_s, m.reconnect_max_s)  # type: ignore[arg-type]  # floats work
        self._client.max_queued_messages_set(MAX_QUEUED)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._on_connect_hooks: list[Callable[[], object]] = []
        self._subscriptions: dict[str, tuple[Handler, SubscribeOptions]] = {}
        self._on_refused: dict[str, Callable[[str, str], object]] = {}
        self._pending_subs: dict[int, str] = {}  # SUBSCRIBE packet id -> topic, until its SUBACK
        self._unacked: list[tuple[mqtt.MQTTMessageInfo, float, str]] = []  # QoS 1 publishes: send time, topic
        self._ack_lock = threading.Lock()  # never held while calling paho (its thread calls _on_publish)
        self._outcomes: dict[int, tuple[Any, float]] = {}  # mid -> PUBACK reason code, arrival time
        self.refused: dict[str, str] = {}  # topic -> reason, while the latest message there was refused
        self.refusals = 0
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch_acks, name="facedoor-mqtt-acks", daemon=True)
        self.connects = 0
        self.reconnects = 0
        self.stalls = 0
        self.dropped_decisions = 0
        self.purged = 0
        self.failed_attempts = 0
        self.down_since: float | None = time.monotonic()
        self.stalled_since: float | None = None
        self.last_ack = float("-inf")  # monotonic time of the latest PUBACK
        self.last_outage_s: float | None = None
        self.state = "connecting"  # connecting | up | down | stalled
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (the broker may be down: paho keeps retrying)."""
        m = self.cfg.mqtt
        log.info("MQTT: connecting to %s:%d as %s", m.host, m.port, self.client_id,
                 extra={"fields": {"event": "mqtt_connecting", "tls": m.tls is not None}})
        self._client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=True)
        self._client.loop_start()
        self._monitor.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish retained `offline`, then disconnect cleanly (no Last Will needed)."""
        self._stop.set()
        if self.connected:
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(min(timeout_s, self.ack_timeout_s))
            except (RuntimeError, ValueError) as exc:
                log.warning("MQTT: could not confirm retained offline status: %s", exc)
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """True while the broker is connected and not known to be stalled."""
        return self._connected.is_set()

    @property
    def live(self) -> bool:
        """Connected, and the broker acknowledged something within the last `ack_timeout_s`:
        the door decides only then."""
        return self.connected and time.monotonic() - self.last_ack <= self.ack_timeout_s

    @property
    def condition(self) -> str:
        """`state`, or `refused` while up and the broker refuses one of our topics (see `refused`)."""
        return "refused" if self.state == "up" and self.refused else self.state

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # --- hooks -------------------------------------------------------------------------------
    def add_on_connect(self, callback: Callable[[], object]) -> None:
        """Call CALLBACK (from paho's thread) after every (re)connect, once status is online."""
        self._on_connect_hooks.append(callback)
        if self.connected:
            callback()

    def subscribe(self, topic: str, handler: Handler, qos: int = 1, *, retained: bool = True,
                  on_refused: Callable[[str, str], object] | None = None) -> None:
        """Route messages on TOPIC to HANDLER(topic, payload); renewed on every reconnect. RETAINED
        False: retained messages (of unknown age) are neither asked for nor handed to HANDLER.
        ON_REFUSED(topic, reason) is called (paho's thread) when the broker refuses the subscription."""
        options = SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE if retained
                                   else SubscribeOptions.RETAIN_DO_NOT_SEND)
        with self._lock:
            self._subscriptions[topic] = (handler, options)
            if on_refused is not None:
                self._on_refused[topic] = on_refused
            if self.connected:
                self._send_subscribe(topic, options)

    def _send_subscribe(self, topic: str, options: SubscribeOptions) -> None:
        """SUBSCRIBE now, remembering its packet id for the SUBACK (call with self._lock held)."""
        rc, mid = self._client.subscribe(topic, options=options)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs[mid] = topic

    def publish(self, topic: str, payload: str | bytes, retain: bool = False,
                expiry_s: float | None = None) -> bool:
        """Publish QoS 1 now without waiting (its PUBACK is watched for stalls), or return False
        (and queue nothing) while down or stalled. Every message of the link is QoS 1."""
        return self._send(topic, payload, retain, expiry_s) is not None

    def publish_lock(self, topic: str, payload: str | bytes) -> bool:
        """Publish a fail-closed command (a lock) QoS 1 with no expiry, also on a stalled connection,
        right behind anything already written; True when the link is up to acknowledge it."""
        if self.state not in ("up", "stalled"):
            return False
        info = self._client.publish(topic, payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self._track(info, topic)  # its PUBACK (or refusal) is read like any other
        return self.connected

    def deliver(self, topic: str, payload: str | bytes, captured_mono: float, ttl_s: float,
                what: str) -> Delivery:
        """QoS 1, never retained, expiry = remaining TTL; DELIVERED only once the broker accepted it
        (a PUBACK with a success reason code) within `ack_timeout_s` and the TTL. Otherwise why
        not; a missing PUBACK is a stall, a failure reason code a refusal (`refused`)."""
        remaining = ttl_s - (time.monotonic() - captured_mono)
        expiry = expiry_interval(remaining)
        if expiry is None:
            return self.drop(what, Delivery.EXPIRED, f"{ttl_s - remaining:.2f}s old, TTL {ttl_s:.1f}s")
        info = self._send(topic, payload, False, expiry, track=False)  # its PUBACK is read here
        if info is None:
            return self.drop(what, Delivery.DISCONNECTED,
                             f"broker {self.cfg.mqtt.host}:{self.cfg.mqtt.port} unreachable")
        try:
            info.wait_for_publish(max(0.0, min(self.ack_timeout_s, ttl_s - (time.monotonic() - captured_mono))))
        except (RuntimeError, ValueError):
            pass
        if not info.is_published():
            self.drop(what, Delivery.UNACKNOWLEDGED, f"no PUBACK within {self.ack_timeout_s:g}s; a broker that "
                      "resumes may still deliver it, past its expires_at_ms (consumers refuse it); nothing follows it")
            self._declare_stall(f"{what} not acknowledged")
            return Delivery.UNACKNOWLEDGED
        reason = self._settle(info.mid, topic)
        if reason is None or is_refusal(reason):
            return self.drop(what, Delivery.REFUSED,
                             f"the broker refused it on {topic} ({reason}); check its ACL for this door's user")
        return Delivery.DELIVERED

    def _send(self, topic: str, payload: str | bytes, retain: bool, expiry_s: float | None,
              track: bool = True) -> mqtt.MQTTMessageInfo | None:
        if not self.connected:
            return None
        props = None
        if expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.MessageExpiryInterval = max(1, int(expiry_s))
        info = self._client.publish(topic, payload, qos=1, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        if track:
            self._track(info, topic)
        return info

    def _track(self, info: mqtt.MQTTMessageInfo, topic: str) -> None:
        """Watch INFO for its PUBACK: late means a stall; its reason code is read by the watcher."""
        with self._lock:
            self._unacked.append((info, time.monotonic(), topic))

    def _settle(self, mid: int, topic: str) -> Any:
        """The PUBACK reason code of MID (None if unknown), noted against TOPIC in `refused`."""
        with self._ack_lock:
            reason = self._outcomes.pop(mid, (None, 0.0))[0]
        if reason is None or is_refusal(reason):
            self.refusals += 1
            if self.refused.get(topic) is None:  # once per refusal streak of a topic, not once per message
                log.error("MQTT: the broker refuses publishes to %s (%s): nothing sent there arrives; "
                          "check the broker's ACL for this door's user", topic, reason,
                          extra={"fields": {"event": "mqtt_publish_refused", "topic": topic, "reason": str(reason)}})
            self.refused[topic] = str(reason)
        elif self.refused.pop(topic, None) is not None:
            log.info("MQTT: the broker accepts publishes to %s again", topic,
                     extra={"fields": {"event": "mqtt_publish_accepted", "topic": topic}})
        return reason

    def drop(self, what: str, delivery: Delivery, detail: str) -> Delivery:
        """Count and log a decision (or relay command) that is not delivered; returns DELIVERY."""
        self.dropped_decisions += 1
        log.warning("%s not delivered (%s): %s; the door stays as it is", what, delivery.value, detail,
                    extra={"fields": {"event": "decision_dropped", "what": what, "reason": delivery.value}})
        return delivery

    # --- stall detection ---------------------------------------------------------------------
    def _watch_acks(self) -> None:
        """Declare a stall when a QoS 1 publish waits longer than ack_timeout_s for its PUBACK;
        while idle, send a QoS 1 probe so a stall is seen even when nobody is at the door."""
        period = self.ack_timeout_s / 4
        last_probe = 0.0
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                done = [entry[0].is_published() for entry in self._unacked]  # one look per message
                settled = [(info.mid, topic) for (info, _, topic), d in zip(self._unacked, done) if d]
                self._unacked = [entry for entry, d in zip(self._unacked, done) if not d]
                oldest = self._unacked[0][1] if self._unacked else None
            for mid, topic in settled:
                self._settle(mid, topic)
            with self._ack_lock:  # reasons of untracked publishes (the offline status) do not pile up
                self._outcomes = {m: o for m, o in self._outcomes.items() if now - o[1] <= OUTCOME_KEEP_S}
            if self.stalled_since is not None and now - self.stalled_since >= self.ack_timeout_s:
                self._drop_socket()
            elif oldest is not None and now - oldest > self.ack_timeout_s:
                self._declare_stall(f"a QoS 1 message waited {now - oldest:.1f}s for its PUBACK")
            elif oldest is None and self.connected and now - max(last_probe, self.last_ack) >= self.ack_timeout_s / 2:
                last_probe = now
                self._send(self.probe_topic, b"", False, expiry_interval(self.ack_timeout_s + 1))

    def _declare_stall(self, why: str) -> None:
        """Treat a broker that stopped acknowledging like an outage: decide nothing, reconnect."""
        with self._lock:
            if not self._connected.is_set():
                return
            self._connected.clear()
            self.stalls += 1
            self.state = "stalled"
            self.down_since = self.stalled_since = time.monotonic()
        log.warning("MQTT: broker %s:%d stalled (%s); treated as an outage: nothing is decided, reconnecting",
                    self.cfg.mqtt.host, self.cfg.mqtt.port, why,
                    extra={"fields": {"event": "mqtt_stalled", "stalls": self.stalls}})

    def _drop_socket(self) -> None:
        """End a stalled connection (what it already holds stays written): paho reconnects and purges."""
        self.stalled_since = None
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket too
            try:  # wakes paho's loop: it sees a lost connection and reconnects with backoff
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # --- paho callbacks (paho's network thread) ----------------------------------------------
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # Every publish of this link is QoS 1: this is a PUBACK. paho calls this before it marks the
        # message published, so whoever waits on it finds the reason code here.
        now = time.monotonic()
        with self._ack_lock:
            self._outcomes[mid] = (reason, now)
        if not is_refusal(reason):
            self.last_ack = now  # only an accepted message proves the link live

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
        with self._lock:
            self._unacked.clear()
            self._pending_subs.clear()
        self._track(client.publish(self.status_topic, "online", qos=1, retain=True), self.status_topic)
        with self._lock:
            for topic, (_, options) in self._subscriptions.items():
                self._send_subscribe(topic, options)
        self.state = "up"
        self.last_ack = time.monotonic()  # the CONNACK just now
        self._connected.set()
        log.info("MQTT: connected to %s:%d", self.cfg.mqtt.host, self.cfg.mqtt.port,
                 extra={"fields": {"event": "mqtt_up", "reconnects": self.reconnects, "stalls": self.stalls,
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
            self.state = "down"
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

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], props: Any) -> None:
        with self._lock:
            topic = self._pending_subs.pop(mid, None)
            callback = self._on_refused.get(topic) if topic is not None else None
        refused = [r for r in reasons if getattr(r, "is_failure", False)]
        if topic is None or not refused:
            return
        log.error("MQTT: the broker refused the subscription to %s (%s)", topic, refused[0],
                  extra={"fields": {"event": "mqtt_subscribe_refused", "topic": topic, "reason": str(refused[0])}})
        if callback is not None:
            try:
                callback(topic, str(refused[0]))
            except Exception:
                log.exception("MQTT subscription-refused hook for %s failed", topic)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [h for topic, (h, options) in self._subscriptions.items()
                        if mqtt.topic_matches_sub(topic, message.topic)
                        and not (message.retain and options.retainHandling == SubscribeOptions.RETAIN_DO_NOT_SEND)]
        for handler in handlers:
            try:
                handler(message.topic, bytes(message.payload))
            except Exception:
                log.exception("MQTT handler for %s failed", message.topic)
