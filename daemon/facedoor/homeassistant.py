"""Home Assistant MQTT discovery: the door appears in HA as one device with four entities (five with
the challenge on).

Device-based discovery (one retained message on `<prefix>/device/<door_id>/config`, entities
under `cmps`):

- `event` "Decision": fires `unlock`, `deny`, `unknown` or `spoof` (a photo or screen held to
  the camera; rate-limited like every deny) from the decision topic, with the
  identity and distance as event attributes;
- `sensor` "Last identity": who was last recognised (`unknown` for an unknown face);
- `sensor` "Processing rate": frames per second from the health topic (diagnostic);
- `sensor` "Liveness": whether the liveness gate is `on` or `off`, from the health topic
  (diagnostic; unknown while the door does not report it);
- `event` "Challenge" (only with `liveness.challenge` on): fires `left`, `right`, `up` or `down` from
  the challenge topic, with the text to speak, the id and when it expires as attributes; an
  automation speaks `text` (README "Photos and screens").

All share the door's `status` topic for availability, so HA greys them out when the unit is
offline (Last Will). Published on every connect and again when HA's birth message
(`<prefix>/status` = `online`) arrives; an empty retained payload removes the device
(`facedoor ha-remove`: facedoor.cli.homeassistant, or on connect when `mqtt.discovery.enabled` is false).
"""
from __future__ import annotations

import json
import logging
from typing import Any

from facedoor import __version__
from facedoor.config import FacedoorConfig
from facedoor.mqtt import MqttHooks

log = logging.getLogger(__name__)

EVENT_TYPES = ("unlock", "deny", "unknown", "spoof")

# HA Jinja: the decision message -> {"event_type", "identity", "distance"}. A deny whose reason
# is "unknown" (a face that matched nobody) or "spoof" (liveness) is its own event type.
EVENT_TEMPLATE = (
    "{% set d = value_json.decision %}"
    "{% set r = value_json.reason %}"
    "{% set t = 'unlock' if d == 'unlock' else ('unknown' if d == 'unknown' or r == 'unknown'"
    " else ('spoof' if r == 'spoof' else 'deny')) %}"
    "{{ {'event_type': t, 'identity': value_json.identity, 'distance': value_json.distance} | tojson }}"
)
IDENTITY_TEMPLATE = "{{ value_json.identity if value_json.identity else 'unknown' }}"
FPS_TEMPLATE = "{{ value_json.fps | float(0) | round(1) }}"
# "None" is HA's MQTT sensor payload for "unknown": a health message without the field is not an error.
CHALLENGE_TEMPLATE = (
    "{{ {'event_type': value_json.direction, 'text': value_json.text, 'id': value_json.id,"
    " 'expires_at_ms': value_json.expires_at_ms} | tojson }}"
)
LIVENESS_TEMPLATE = "{{ value_json.liveness if value_json.liveness in ('on', 'off') else 'None' }}"


def discovery_topic(config: FacedoorConfig) -> str:
    """`<discovery prefix>/device/<door_id>/config`."""
    return f"{config.mqtt.discovery.prefix}/device/{config.door_id}/config"


def birth_topic(config: FacedoorConfig) -> str:
    """Where HA announces itself (`online`) after a restart: `<discovery prefix>/status`."""
    return f"{config.mqtt.discovery.prefix}/status"


def discovery_payload(config: FacedoorConfig) -> dict[str, Any]:
    """The device discovery message (full key names except the documented `dev`/`o`/`cmps`/`p`)."""
    door = config.door_id
    base = f"facedoor_{door}"
    decision_topic, health_topic = config.topic("decision"), config.topic("health")
    challenge: dict[str, Any] = {} if config.liveness.challenge == "off" else {f"{base}_challenge": {
        "p": "event",
        "unique_id": f"{base}_challenge",
        "name": "Challenge",
        "icon": "mdi:head-sync",
        "state_topic": config.topic("challenge"),
        "event_types": list(config.liveness.challenge_directions),
        "value_template": CHALLENGE_TEMPLATE,
    }}
    return {
        "dev": {
            "ids": [base],
            "name": f"facedoor {door}",
            "mf": "facedoor",
            "mdl": "Face-recognition door unit",
            "sw": __version__,
        },
        "o": {"name": "facedoor", "sw": __version__},
        "availability": [
            {"topic": config.topic("status"), "payload_available": "online", "payload_not_available": "offline"}
        ],
        "qos": 1,
        "cmps": {
            f"{base}_decision": {
                "p": "event",
                "unique_id": f"{base}_decision",
                "name": "Decision",
                "icon": "mdi:door",
                "state_topic": decision_topic,
                "event_types": list(EVENT_TYPES),
                "value_template": EVENT_TEMPLATE,
            },
            f"{base}_last_identity": {
                "p": "sensor",
                "unique_id": f"{base}_last_identity",
                "name": "Last identity",
                "icon": "mdi:account-check",
                "state_topic": decision_topic,
                "value_template": IDENTITY_TEMPLATE,
                "json_attributes_topic": decision_topic,
                "json_attributes_template": (
                    "{{ {'decision': value_json.decision, 'distance': value_json.distance,"
                    " 'ts': value_json.ts} | tojson }}"
                ),
            },
            f"{base}_fps": {
                "p": "sensor",
                "unique_id": f"{base}_fps",
                "name": "Processing rate",
                "icon": "mdi:speedometer",
                "state_topic": health_topic,
                "value_template": FPS_TEMPLATE,
                "unit_of_measurement": "fps",
                "state_class": "measurement",
                "entity_category": "diagnostic",
                "suggested_display_precision": 1,
            },
            f"{base}_liveness": {
                "p": "sensor",
                "unique_id": f"{base}_liveness",
                "name": "Liveness",
                "icon": "mdi:face-recognition",
                "state_topic": health_topic,
                "value_template": LIVENESS_TEMPLATE,
                "device_class": "enum",
                "options": ["on", "off"],
                "entity_category": "diagnostic",
            },
            **challenge,
        },
    }


class HomeAssistantDiscovery:
    """Announces the door to HA on connect and on HA's birth message, or removes it."""

    def __init__(self, config: FacedoorConfig, client: MqttHooks):
        self.config = config
        self.client = client
        self.topic = discovery_topic(config)
        self.announcements = 0

    def attach(self) -> None:
        """Register with the MQTT client: announce (or remove, when disabled) on every connect."""
        if self.config.mqtt.discovery.enabled:
            self.client.add_on_connect(self.announce)
            self.client.subscribe(birth_topic(self.config), self._on_birth, 1)
        else:
            self.client.add_on_connect(self.remove)

    def announce(self) -> bool:
        """Publish the retained discovery message; False when the broker is unreachable."""
        payload = json.dumps(discovery_payload(self.config), separators=(",", ":"))
        sent = self.client.publish(self.topic, payload, retain=True)
        if sent:
            self.announcements += 1
            log.info("Home Assistant discovery published on %s", self.topic)
        else:
            log.warning("Home Assistant discovery on %s not sent (broker unreachable); retrying on reconnect",
                        self.topic)
        return sent

    def remove(self) -> bool:
        """Clear the retained discovery message: HA removes the device and its entities."""
        sent = self.client.publish(self.topic, b"", retain=True)
        if sent:
            log.info("Home Assistant discovery removed from %s", self.topic)
        return sent

    def _on_birth(self, _topic: str, payload: bytes, *_: Any) -> None:
        if payload.strip().lower() == b"online":
            log.info("Home Assistant came online: re-announcing door %s", self.config.door_id)
            self.announce()
