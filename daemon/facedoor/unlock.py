"""The unlock action: drive a lock or relay directly over MQTT (zigbee2mqtt, Tasmota, ESPHome).

A decision listener. With an unlock decision the broker has acknowledged (`event.delivered`:
its PUBACK came back within `mqtt.ack_timeout_s`, so the link was proven live just now), and
only then, `unlock_action.payload` goes to `unlock_action.topic`: QoS 1, never retained, Message
Expiry = the decision's remaining TTL rounded down, measured on the monotonic clock from the
frame's capture. A JSON-object payload also carries `expires_at_ms` (capture time + TTL, epoch ms)
so a device can refuse it when late and, with `mqtt.signing_key_file`, a fresh `id` and `sig`: the
same canonical-JSON HMAC as the decisions (facedoor.signing), so a device that holds the key can
tell the door's command from a forged or replayed one. A payload that is not a JSON object (Tasmota's
`ON`) cannot carry either: such a relay relies on the broker's ACL alone. The lock payload is
never signed (locking is the safe direction; a forged lock is a nuisance, not a break-in).

A relay command the broker refuses (a PUBACK with a failure reason code, e.g. 0x87 Not
authorized: the ACL does not let the door publish there) reached nobody: it is not "sent", the
audit entry says `unlock_action_delivery: refused` and the health report lists the topic.

If the unlock's own PUBACK does not come back within `ack_timeout_s`, the broker stalled between
the two messages: the lock payload is published at once behind it (same connection, same order),
so a broker that resumes delivers a pulse of milliseconds at worst, never a held-open door, and
the link treats the stall as an outage.

`relock_after_s` later the lock payload follows. Locking is the fail-closed direction, so the
lock may be late: if the broker is down when it is due, it is sent on the next connect and, at
shutdown, immediately. A newer unlock restarts the relock timer. After any reconnect following
an unlock, the lock payload is sent again (idempotent; locking early is always safe).
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Any

from facedoor.config import UnlockActionConfig
from facedoor.events import DecisionEvent
from facedoor.mqtt import Delivery, MqttHooks
from facedoor.signing import sign

log = logging.getLogger(__name__)


def unlock_payload(template: str, expires_at_ms: int, key: bytes | None = None) -> str:
    """TEMPLATE with `expires_at_ms` added when it is a JSON object and, with KEY, a fresh `id` and
    its `sig` (facedoor.signing); other payloads as they are (they cannot carry fields)."""
    try:
        body = json.loads(template)
    except ValueError:
        return template
    if not isinstance(body, dict):
        return template
    command = {**body, "expires_at_ms": expires_at_ms}
    if key is not None:
        command = sign({**command, "id": str(uuid.uuid4())}, key)
    return json.dumps(command)


class UnlockAction:
    """Publishes the configured unlock (and later lock) payload for acknowledged unlock decisions."""

    def __init__(self, cfg: UnlockActionConfig, link: MqttHooks, ttl_s: float, signing_key: bytes | None = None):
        self.cfg = cfg
        self.link = link
        self.ttl_s = ttl_s
        self.signing_key = signing_key
        self.sent_unlocks = 0
        self.chased = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._lock_pending = False
        link.add_on_connect(self._on_connect)

    def on_decision(self, event: DecisionEvent) -> None:
        """Drive the relay for an acknowledged unlock; note `unlock_action` on the event."""
        m = event.message
        if m.decision != "unlock":
            return
        if not event.delivered:
            event.notes["unlock_action"] = False
            return
        payload = unlock_payload(self.cfg.payload, m.expires_at_ms, self.signing_key)
        delivery = self.link.deliver(self.cfg.topic, payload, event.frame.t_mono, self.ttl_s,
                                     f"unlock action for decision {m.id}")
        event.notes["unlock_action"] = bool(delivery)
        event.notes["unlock_action_delivery"] = delivery.value
        if delivery is Delivery.REFUSED:  # nothing reached the relay: nothing to chase
            return
        if not delivery:
            self._send_lock("chasing an unacknowledged unlock")
            self.chased += 1
            return
        self.sent_unlocks += 1
        log.info("unlock action sent to %s for %s (decision %s)", self.cfg.topic, m.identity, m.id,
                 extra={"fields": {"event": "unlock_action", "decision_id": m.id}})
        if self.cfg.relock_after_s is not None:
            self._schedule_relock(self.cfg.relock_after_s)

    def close(self) -> None:
        """Stop the relock timer; a relock that is due or pending is sent now (fail closed)."""
        with self._lock:
            timer, self._timer = self._timer, None
            due = timer is not None or self._lock_pending
        if timer is not None:
            timer.cancel()
        if due:
            self._send_lock("shutdown")

    def _schedule_relock(self, delay_s: float) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._lock_pending = False
            self._timer = threading.Timer(delay_s, self._relock_due)
            self._timer.daemon = True
            self._timer.start()

    def _relock_due(self) -> None:
        with self._lock:
            self._timer = None
        self._send_lock(f"relock after {self.cfg.relock_after_s:g} s")

    def _send_lock(self, why: str) -> None:
        # No expiry, and written even on a stalled link: a late lock is safe, a lost one leaves the door open.
        if self.link.publish_lock(self.cfg.topic, self.cfg.lock_payload):
            with self._lock:
                self._lock_pending = False
            log.info("lock action sent to %s (%s)", self.cfg.topic, why,
                     extra={"fields": {"event": "lock_action", "why": why}})
        else:
            with self._lock:
                self._lock_pending = True
            log.warning("lock action to %s not sent (%s; broker unreachable); sending on reconnect",
                        self.cfg.topic, why, extra={"fields": {"event": "lock_action_pending", "why": why}})

    def _on_connect(self, *_: Any) -> None:
        with self._lock:
            due = self._lock_pending or (self.sent_unlocks + self.chased > 0 and self._timer is None)
        if due:
            self._send_lock("after a broker reconnect")
