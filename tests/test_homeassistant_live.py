"""The door against a real Home Assistant Core (from PyPI, `make hass-venv`), a real Mosquitto and
the real daemon: discovery creates the device and its entities, a decision fires the event with the
identity, the shipped automation opens a test lock for a fresh unlock only, and after HA restarts
(birth message) the door re-announces itself and the entities come back. HA's log must hold no
warning or error about the door's entities, templates or the automation.

The tests share one HA, one broker and one daemon (module scope) and run in file order.
"""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pytest
import yaml

from daemon_support import Daemon, MjpegCamera, Subscriber, retained, write_config
from facedoor.config import parse_config
from facedoor.demo.broker import PrivateBroker
from facedoor.demo.walkup import Visitor, render
from facedoor.formatting import iso_utc
from facedoor.homeassistant import discovery_payload, discovery_topic
from facedoor.message import ChallengeMessage, DecisionMessage
from hass.server import AUTOMATION, VENV, HassError, HomeAssistant, installed

VERSION = installed()
pytestmark = [
    pytest.mark.hass, pytest.mark.slow,
    pytest.mark.skipif(VERSION is None, reason=f"no Home Assistant venv at {VENV}: `make hass-venv` builds it; "
                       "it needs Python 3.13 (Home Assistant 2025.4) or 3.12 (2024.12), and found neither"),
]

PERSON = "mindy_kaling"
DISCOVERY = "homeassistant/device/front/config"
DECISION = "facedoor/front/decision"
EVENT = "event.facedoor_front_decision"
IDENTITY = "sensor.facedoor_front_last_identity"
FPS = "sensor.facedoor_front_processing_rate"
LIVENESS = "sensor.facedoor_front_liveness"
ENTITIES = (EVENT, IDENTITY, FPS, LIVENESS)
LOCK = "lock.front_door"
UNLOCKS = "counter.front_door_unlocks"
# What HA may log at WARNING or above about anything the door ships (discovery, templates, automation).
OURS = ("facedoor", "mqtt", "template", "automation", "event", "sensor", "lock")


@dataclass
class Live:
    broker: PrivateBroker
    ha: HomeAssistant
    camera: MjpegCamera
    daemon: Daemon
    key: bytes
    walkup: list[bytes]
    blank: list[bytes]
    automation_id: str


def jpegs(frames: Iterator[np.ndarray]) -> list[bytes]:
    return [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for f in frames]


@pytest.fixture(scope="module")
def live(real_models: Path, celebrity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """HA onboarded with MQTT, a broker, and the daemon watching an MJPEG camera that shows no one yet."""
    from facedoor.cli import main as facedoor

    work = tmp_path_factory.mktemp("hass-live")
    key_file = work / "signing.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o600)
    photos = sorted((celebrity_dir / "train" / PERSON).glob("*.jpg"))
    walkup = jpegs(render([Visitor(PERSON, photos[0])], visit_s=4.0, gap_s=1.0))
    blank = walkup[:1]  # the walk-up starts with the empty doorway (walkup.plan)
    broker = PrivateBroker(work / "mosquitto")
    assert broker.start(), "mosquitto not installed: `make test` installs Debian's mosquitto"
    config = write_config(work / "facedoor.yaml", real_models, work / "store.db", broker.port,
                          mqtt={"signing_key_file": str(key_file)})
    ha = HomeAssistant(work / "ha")
    camera = MjpegCamera([], fps=10.0)
    camera.jpegs = blank
    camera.up()
    daemon = None
    try:
        assert facedoor(["--config", str(config), "enroll", PERSON, *map(str, photos), "--skip-bad"]) == 0
        daemon = Daemon(config, camera.url)
        ha.start()
        ha.onboard()
        ha.add_mqtt(broker.host, broker.port)
        ha.add_automation()
        automation_id = yaml.safe_load(AUTOMATION.read_text())["id"]
        yield Live(broker, ha, camera, daemon, key_file.read_text().strip().encode(), walkup, blank, automation_id)
    finally:
        if daemon is not None:
            daemon.kill()
        camera.down()
        ha.stop()
        broker.stop()
        print(f"Home Assistant {VERSION}: log at {ha.log_path}")


def our_problems(ha: HomeAssistant) -> list[str]:
    return [p for p in ha.problems() if any(word in p.lower() for word in OURS)]


def traces(live: Live) -> list[dict[str, Any]]:
    """The shipped automation's run traces (oldest first): one per trigger, with how it ended."""
    found = live.ha.ws({"type": "trace/list", "domain": "automation", "item_id": live.automation_id})
    return sorted(found, key=lambda t: t["timestamp"]["start"])


def run_ids(live: Live) -> set[str]:
    return {t["run_id"] for t in traces(live)}


def wait_trace(live: Live, seen: set[str], timeout: float = 30.0) -> dict[str, Any]:
    """The first trace not in SEEN (run ids), once the automation has finished evaluating it
    (HA keeps the last 5 traces per automation)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [t for t in traces(live) if t["run_id"] not in seen]
        if new and new[0]["state"] == "stopped":
            return new[0]
        time.sleep(0.2)
    raise HassError(f"the automation did not run for the decision within {timeout:.0f} s: {traces(live)}")


def door_decision(key: bytes, expires_in_s: float, decision: Literal["unlock", "deny"] = "unlock") -> dict[str, Any]:
    """A decision as the door builds it (DecisionMessage, signed as service.message signs it), expiring
    EXPIRES_IN_S from now (negative: already expired): an unlock of PERSON, or a deny of an unknown face."""
    ttl = 5.0
    ts = time.time() + expires_in_s - ttl
    unlock = decision == "unlock"
    return DecisionMessage(
        id=str(uuid.uuid4()), door="front", decision=decision, reason="match" if unlock else "unknown",
        identity=PERSON if unlock else None, distance=0.41 if unlock else 0.93, threshold=0.7, frames=3, window=5,
        faces=1, unknown_near=0, live_score=None, liveness="off", ts=iso_utc(ts), ts_ms=int(ts * 1000), ttl_s=ttl,
        expires_at_ms=int((ts + ttl) * 1000), latency_ms=80.0).signed(key).payload()


def publish(live: Live, payload: dict[str, Any] | str, topic: str = DECISION, retain: bool = False) -> None:
    sub = Subscriber(live.broker.host, live.broker.port)
    try:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        sub.client.publish(topic, text, qos=1, retain=retain).wait_for_publish(5)
    finally:
        sub.stop()


def available(state: dict[str, Any]) -> bool:
    return state["state"] != "unavailable" and not state["attributes"].get("restored")


def test_discovery_creates_the_device_and_its_entities(live: Live) -> None:
    ha = live.ha
    for entity in ENTITIES:
        ha.wait_state(entity, available, timeout=60)
    device = "{% set d = device_id('" + EVENT + "') %}"
    assert ha.render(device + "{{ device_attr(d, 'name') }}|{{ device_attr(d, 'manufacturer') }}") \
        == "facedoor front|facedoor"
    assert sorted(json.loads(ha.render(device + "{{ device_entities(d) | tojson }}"))) == sorted(ENTITIES)
    assert ha.state(EVENT)["attributes"]["event_types"] == ["unlock", "deny", "unknown", "spoof"]
    fps = ha.wait_state(FPS, lambda s: s["state"] not in ("unknown", "unavailable"), timeout=30)
    assert float(fps["state"]) >= 0 and fps["attributes"]["unit_of_measurement"] == "fps"
    # Liveness shows the health report's `liveness` ("on"/"off"), unknown where the door does not send it
    sub = Subscriber(live.broker.host, live.broker.port, "facedoor/front/health")
    try:
        (health,) = sub.wait_count("facedoor/front/health", 1, timeout=10)[:1]
    finally:
        sub.stop()
    reported = json.loads(health["payload"]).get("liveness", "unknown")
    liveness = ha.wait_state(LIVENESS, lambda s: s["state"] == reported)
    assert liveness["attributes"]["options"] == ["on", "off"] and liveness["attributes"]["device_class"] == "enum"
    assert our_problems(ha) == []


def test_a_door_decision_fires_the_event_and_the_automation_opens_the_lock(live: Live) -> None:
    ha = live.ha
    assert ha.state(LOCK)["state"] == "locked" and ha.state(UNLOCKS)["state"] == "0"
    before = run_ids(live)
    sub = Subscriber(live.broker.host, live.broker.port, DECISION)
    live.camera.jpegs = live.walkup  # the member walks up to the door
    try:
        got = sub.wait_for(lambda m: '"unlock"' in m["payload"], 90)
        live.camera.jpegs = live.blank  # and is gone: no further decisions
        assert got is not None, live.daemon.log()[-3000:]
    finally:
        sub.stop()
    unlock = json.loads(got["payload"])
    event = ha.wait_state(EVENT, lambda s: s["attributes"].get("event_type") == "unlock")
    assert event["attributes"]["identity"] == PERSON == unlock["identity"]
    assert event["attributes"]["distance"] == unlock["distance"]
    identity = ha.wait_state(IDENTITY, lambda s: s["state"] == PERSON)
    assert identity["attributes"]["decision"] == "unlock"
    trace = wait_trace(live, before)
    assert trace["script_execution"] == "finished", trace
    assert ha.wait_state(LOCK, lambda s: s["state"] == "unlocked")
    assert ha.state(UNLOCKS)["state"] == "1"
    assert our_problems(ha) == []


@pytest.mark.parametrize("refused", ["expired", "far-future", "deny"])
def test_the_automation_refuses_a_late_an_early_and_a_deny_decision(refused: str, live: Live) -> None:
    ha = live.ha
    ha.request("POST", "/api/services/lock/lock", {"entity_id": LOCK})
    ha.wait_state(LOCK, lambda s: s["state"] == "locked")
    opened = int(ha.state(UNLOCKS)["state"])
    # expired 2 s ago; a door clock an hour fast; a fresh deny of an unknown face
    expires_in_s = {"expired": -2.0, "far-future": 3600.0, "deny": 4.0}[refused]
    message = door_decision(live.key, expires_in_s, "deny" if refused == "deny" else "unlock")
    before = run_ids(live)
    publish(live, message)
    trace = wait_trace(live, before)
    assert trace["script_execution"] == "failed_conditions", trace
    assert ha.state(LOCK)["state"] == "locked" and int(ha.state(UNLOCKS)["state"]) == opened
    if refused == "deny":  # an unknown face is its own event type, without an identity
        event = ha.wait_state(EVENT, lambda s: s["attributes"].get("event_type") == "unknown")
        assert event["attributes"]["identity"] is None and event["attributes"]["distance"] == 0.93
    # a fresh unlock opens: only the time (or the decision) was wrong
    publish(live, door_decision(live.key, 4.0))
    assert wait_trace(live, before | {trace["run_id"]})["script_execution"] == "finished"
    ha.wait_state(LOCK, lambda s: s["state"] == "unlocked")
    assert int(ha.state(UNLOCKS)["state"]) == opened + 1
    assert our_problems(ha) == []


def test_after_a_restart_the_door_reannounces_and_its_entities_come_back(live: Live) -> None:
    ha = live.ha
    ha.stop()
    sub = Subscriber(live.broker.host, live.broker.port, DISCOVERY, "homeassistant/status")
    try:
        # the retained announcement is gone: only the door's answer to HA's birth message brings them back
        sub.client.publish(DISCOVERY, b"", qos=1, retain=True).wait_for_publish(5)
        assert sub.wait_for(lambda m: m["topic"] == DISCOVERY and not m["payload"], 10)
        assert retained(live.broker.host, live.broker.port, DISCOVERY, timeout=1) is None
        ha.start()
        birth = sub.wait_for(lambda m: m["topic"] == "homeassistant/status" and m["payload"] == "online", 60)
        assert birth is not None
        announced = sub.wait_for(lambda m: m["topic"] == DISCOVERY and m["payload"] and m["recv"] >= birth["recv"], 30)
        assert announced is not None, live.daemon.log()[-3000:]
    finally:
        sub.stop()
    for entity in ENTITIES:
        ha.wait_state(entity, available, timeout=60)
    assert ha.wait_state(FPS, lambda s: s["state"] not in ("unknown", "unavailable"), timeout=30)
    assert our_problems(ha) == []


def test_a_challenge_fires_the_event_with_the_text_the_automation_speaks(live: Live) -> None:
    """A door with `liveness.challenge` on: its discovery adds the Challenge event entity, and an ask
    (ChallengeMessage, as the door publishes it) fires it with the direction as the event type and the
    `text` attribute that the README's tts automation speaks."""
    cfg = parse_config({"door_id": "side", "liveness": {"challenge": "always"}})
    publish(live, discovery_payload(cfg), discovery_topic(cfg), retain=True)
    publish(live, "online", cfg.topic("status"), retain=True)
    entity = "event.facedoor_side_challenge"
    live.ha.wait_state(entity, available)
    now = time.time()
    ask = ChallengeMessage(id="00c0ffee00c0ffee", door="side", track=3, direction="left",
                           text="Please turn your head to your left", timeout_s=5.0, ts=iso_utc(now),
                           ts_ms=int(now * 1000), expires_at_ms=int((now + 5.0) * 1000))
    publish(live, ask.model_dump(mode="json"), cfg.topic("challenge"))
    fired = live.ha.wait_state(entity, lambda s: s["attributes"].get("id") == ask.id)
    assert fired["attributes"]["event_type"] == "left" and fired["attributes"]["text"] == ask.text, fired
    assert fired["attributes"]["event_types"] == list(cfg.liveness.challenge_directions)
    assert not our_problems(live.ha)
