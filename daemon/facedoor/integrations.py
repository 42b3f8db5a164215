"""What happens beside each decision: unlock action, audit log, Home Assistant discovery.

The service builds one `Integrations` on its MQTT link before connecting (so the connect hooks
are in place), calls `on_decision()` right after publishing (or dropping) each decision, and
`close()` on shutdown. Nothing here can raise into the frame loop or delay it beyond one
non-blocking publish: the audit log is written by its own thread.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from facedoor.audit import AuditLog
from facedoor.config import FacedoorConfig
from facedoor.homeassistant import HomeAssistantDiscovery, MQTTHooks
from facedoor.unlock import UnlockAction

log = logging.getLogger(__name__)


class Integrations:
    """Unlock action + audit log + HA discovery for one door, wired to the daemon's MQTT client."""

    def __init__(self, config: FacedoorConfig, client: MQTTHooks | None):
        self.config = config
        self.audit = AuditLog.from_config(config)
        self.discovery = HomeAssistantDiscovery(config, client) if client is not None else None
        self.unlock = (
            UnlockAction(config.unlock_action, client, config.decision_ttl_s)
            if client is not None and config.unlock_action is not None else None
        )
        if self.discovery is not None:
            self.discovery.attach()
        if self.unlock is not None:
            self.unlock.attach()

    def on_decision(self, message: Mapping[str, Any], delivered: bool, crop_bgr: np.ndarray | None = None) -> None:
        """After the decision MESSAGE was published (DELIVERED) or dropped: act and audit."""
        entry = dict(message)
        entry["delivered"] = bool(delivered)
        if self.unlock is not None and delivered and message.get("decision") == "unlock":
            try:
                entry["unlock_action"] = self.unlock.on_decision(message)
            except Exception:  # the frame loop must go on; the door stays locked
                log.exception("unlock action failed for decision %s; the door stays locked", message.get("id"))
                entry["unlock_action"] = False
        if self.audit is not None:
            self.audit.record(entry, crop_bgr)

    def close(self) -> None:
        """Relock now if a relock is due, then flush the audit log."""
        if self.unlock is not None:
            self.unlock.close()
        if self.audit is not None:
            self.audit.close()

