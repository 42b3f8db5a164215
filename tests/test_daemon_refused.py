"""`facedoor run` as a real subprocess where a message leaves the door and is refused: a Mosquitto
whose ACL denies the decision topic or the relay topic (PUBACK 0x87 Not authorized), and an audit
log that cannot be written with `audit.required`. An enrolled member walks up in each; the door
must open nothing it cannot account for, and say why (logs, health, audit)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon_support import Daemon, Subscriber, write_config
from facedoor.audit import read_entries
from facedoor.demo.walkup import write_walkup
from secure_broker import SecureBroker, secure_broker
from test_daemon import Door, door  # noqa: F401  (the module-scoped enrolled door and its people)

RELAY = "zigbee2mqtt/front_door/set"
ACTION = {"topic": RELAY, "payload": '{"state": "UNLOCK"}', "lock_payload": '{"state": "LOCK"}'}


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, daemon: Daemon) -> Any:
    """CHECK()'s first truthy value, polled until TIMEOUT_S (the daemon's log is a file)."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline or daemon.proc.poll() is not None:
            raise AssertionError(f"{what} not seen within {timeout_s:g} s:\n{daemon.log()[-3000:]}")
        time.sleep(0.1)
    return result


def secure_door(unit: Door, broker: SecureBroker, tmp_path: Path, **sections: Any) -> Path:
    """The door's config for BROKER: TLS, its own user, the relay action, SECTIONS."""
    return write_config(tmp_path / "facedoor.yaml", unit.models, unit.store, broker.port, mqtt={
        "username": "door", "password_file": str(broker.password_files["door"]), "tls": {"ca": str(broker.ca)}},
        unlock_action=ACTION, **sections)


def consumer(broker: SecureBroker) -> Subscriber:
    """Everything a consumer may read (the door's topics and the relay topic)."""
    return Subscriber(broker.host, broker.port, "facedoor/#", RELAY, tls_ca=broker.ca, username="consumer",
                      password=broker.passwords["consumer"])


def health(sub: Subscriber) -> list[dict[str, Any]]:
    return [json.loads(m["payload"]) for m in sub.on("health")]


def test_a_refused_decision_opens_nothing_and_is_reported(door: Door, tmp_path: Path) -> None:  # noqa: F811
    """The ACL forgot the decision topic: before, the door logged delivered=True and drove the relay."""
    video = tmp_path / "walkup.avi"
    write_walkup(video, [door.known], visit_s=4.0, gap_s=1.0)
    audit = tmp_path / "audit.jsonl"
    with secure_broker(tmp_path / "broker", relay_topic=RELAY, deny=("facedoor/front/decision",)) as broker:
        config = secure_door(door, broker, tmp_path, audit={"enabled": True, "path": str(audit)})
        sub = consumer(broker)
        daemon = Daemon(config, str(video), "--loop")
        try:
            tried = wait_until(lambda: [r for r in daemon.events("decision") if r["decision"] == "unlock"], 90,
                               "an unlock decision", daemon)
            report = wait_until(lambda: [h for h in health(sub) if h["refused"]], 10, "health with refused", daemon)
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
            sub.stop()
    assert tried[0]["identity"] == door.known.name and tried[0]["delivery"] == "refused"
    assert not any(r["delivered"] for r in daemon.events("decision"))  # 0 "delivered" logs
    assert sub.on("decision") == [] and sub.on(RELAY) == []  # 0 decisions seen, 0 relay commands
    assert daemon.events("unlock_action") == []
    assert report[-1]["broker"] == "refused" and report[-1]["refused"] == {"facedoor/front/decision": "Not authorized"}
    assert report[-1]["unlock"] == 0
    entries = [e for e in read_entries(audit) if e["decision"] == "unlock"]
    assert entries and all(e["delivered"] is False and e["delivery"] == "refused" for e in entries)
    assert all(e.get("unlock_action") is False for e in entries)


def test_a_refused_relay_command_is_not_reported_sent(door: Door, tmp_path: Path) -> None:  # noqa: F811
    """The ACL forgot the relay topic: before, the door logged "unlock action sent" for a relay that got nothing."""
    video = tmp_path / "walkup.avi"
    write_walkup(video, [door.known], visit_s=4.0, gap_s=1.0)
    audit = tmp_path / "audit.jsonl"
    with secure_broker(tmp_path / "broker", relay_topic=RELAY, deny=(RELAY,)) as broker:
        config = secure_door(door, broker, tmp_path, audit={"enabled": True, "path": str(audit)})
        sub = consumer(broker)
        daemon = Daemon(config, str(video), "--loop")
        try:
            unlock = sub.wait_for(lambda m: m["topic"].endswith("/decision") and '"unlock"' in m["payload"], 90)
            assert unlock is not None, daemon.log()[-3000:]
            report = wait_until(lambda: [h for h in health(sub) if RELAY in h["refused"]], 10, "relay refused", daemon)
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
            sub.stop()
    assert sub.on(RELAY) == []  # the relay got nothing: not the unlock, not a chasing lock
    assert daemon.events("unlock_action") == [] and "unlock action sent" not in daemon.log()
    assert report[-1]["broker"] == "refused" and report[-1]["refused"] == {RELAY: "Not authorized"}
    decision_id = json.loads(unlock["payload"])["id"]
    [entry] = [e for e in read_entries(audit) if e["id"] == decision_id]
    assert entry["delivered"] is True and entry["unlock_action"] is False
    assert entry["unlock_action_delivery"] == "refused"


def test_an_unlock_the_required_audit_cannot_record_is_never_sent(door: Door, mosquitto, tmp_path: Path) -> None:  # noqa: F811
    """audit.required on a full disk (the log is /dev/full: ENOSPC on every write, even as root)."""
    video = tmp_path / "walkup.avi"
    write_walkup(video, [door.known], visit_s=4.0, gap_s=1.0)
    audit = tmp_path / "audit" / "audit.jsonl"
    audit.parent.mkdir(mode=0o700)
    audit.symlink_to("/dev/full")
    config = write_config(tmp_path / "facedoor.yaml", door.models, door.store, mosquitto.port,
                          audit={"enabled": True, "required": True, "path": str(audit)},
                          unlock_action=ACTION)
    sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/#", RELAY)
    daemon = Daemon(config, str(video), "--loop")
    try:
        tried = wait_until(lambda: [r for r in daemon.events("decision") if r["decision"] == "unlock"], 90,
                           "an unlock decision", daemon)
        report = wait_until(lambda: [h for h in health(sub) if h["audit"] == "failing"], 10, "audit failing", daemon)
        assert daemon.terminate() == 0
    finally:
        daemon.kill()
        sub.stop()
    assert tried[0]["delivery"] == "unaudited" and not any(r["delivered"] for r in daemon.events("decision"))
    assert [d for d in sub.decisions() if d["decision"] == "unlock"] == [] and sub.on(RELAY) == []
    assert report[-1]["unlock"] == 0 and daemon.events("audit_failing")
