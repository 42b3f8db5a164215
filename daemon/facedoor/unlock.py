"""The unlock action: drive a lock or relay directly over MQTT (zigbee2mqtt, Tasmota, ESPHome).

With an unlock decision, and only then, `unlock_action.payload` goes to `unlock_action.topic`:
QoS 1, never retained, with the decision's MQTT v5 Message Expiry, and never late — it is sent
in the same instant as the decision, dropped (and logged) while the broker is unreachable,
and dropped if the decision is already older than its TTL.

`relock_after_s` later the `lock_payload` follows. Locking is the fail-closed direction, so the
lock may be late: if the broker is down when it is due, it is sent on the next connect and, at
shutdown, immediately. A newer unlock restarts the relock timer. Because the link purges
unacknowledged messages on reconnect (never late), a lock in flight at a disconnect could be
lost; so after any reconnect, once an unlock has been sent and no relock is still counting
down, the lock payload is sent again (idempotent, and locking early is always safe).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from facedoor.config import UnlockActionConfig
from facedoor.homeassistant import MQTTHooks

log = logging.getLogger(__name__)


def decision_age_s(decision: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds since the decision was made (from its epoch-ms `ts_ms`), None when it has none."""
    ts_ms = decision.get("ts_ms")
    if not isinstance(ts_ms, (int, float)):
        return None
    return (time.time() if now is None else now) - ts_ms / 1000.0


class UnlockAction:
    """Publishes the configured unlock (and later lock) payload for unlock decisions."""

    def __init__(self, cfg: UnlockActionConfig, client: MQTTHooks, ttl_s: float):
        self.cfg = cfg
        self.client = client
        self.ttl_s = ttl_s
        self.sent_unlocks = 0
        self.sent_locks = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._lock_pending = False

    def attach(self) -> None:
        """Send a lock that fell due during a broker outage as soon as the broker is back."""
        self.client.add_on_connect(self._on_connect)

    def on_decision(self, decision: Mapping[str, Any]) -> bool:
        """Send the unlock payload for an unlock DECISION; True when handed to the broker."""
        if decision.get("decision") != "unlock":
            return False
        ttl = float(decision.get("ttl_s") or self.ttl_s)
        age = decision_age_s(decision)
        remaining = ttl - max(age or 0.0, 0.0)
        if remaining <= 0:
            log.warning("unlock action for decision %s dropped: decided %.1f s ago, TTL %.1f s (never late)",
                        decision.get("id"), age, ttl)
            return False
        sent = self.client.publish(self.cfg.topic, self.cfg.payload, qos=1, retain=False, expiry_s=remaining)
        if not sent:
            log.warning("unlock action for %s (decision %s) dropped: broker unreachable; the door stays locked",
                        decision.get("identity"), decision.get("id"))
            return False
        self.sent_unlocks += 1
        log.info("unlock action sent to %s for %s (decision %s)", self.cfg.topic, decision.get("identity"),
                 decision.get("id"))
        if self.cfg.relock_after_s is not None:
            self._schedule_relock(self.cfg.relock_after_s)
        return True

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
        assert self.cfg.lock_payload is not None
        # No expiry: a late lock is safe, a lost one leaves the door open.
        if self.client.publish(self.cfg.topic, self.cfg.lock_payload, qos=1, retain=False):
            with self._lock:
                self._lock_pending = False
            self.sent_locks += 1
            log.info("lock action sent to %s (%s)", self.cfg.topic, why)
        else:
            with self._lock:
                self._lock_pending = True
            log.warning("lock action to %s not sent (broker unreachable); sending on reconnect", self.cfg.topic)

    def _on_connect(self, *_: Any) -> None:
        if self.cfg.lock_payload is None:
            return
        with self._lock:
            due = self._lock_pending or (self.sent_unlocks > 0 and self._timer is None)
        if due:
            self._send_lock("after a broker reconnect")
