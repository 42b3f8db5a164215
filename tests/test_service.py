"""The per-frame path of DoorService with scripted faces and a real broker: largest face decides,
errors decide nothing, late decisions are never published."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from daemon_support import Subscriber
from facedoor.camera import Camera, Frame
from facedoor.config import parse_config
from facedoor.match import Gallery
from facedoor.mqtt import MqttLink
from facedoor.pipeline import Face
from facedoor.sdnotify import Notifier
from facedoor.service import DoorService

DIM = 128


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


ALICE, BOB, STRANGER = unit(1), unit(2), unit(3)


def face(side: float, embedding: np.ndarray, x: float = 10) -> Face:
    """A detected face SIDE pixels wide at X, with the five landmarks where a frontal face has them."""
    box = np.array([x, 10, x + side, 10 + side], np.float32)
    marks = np.array([[0.3, 0.4], [0.7, 0.4], [0.5, 0.6], [0.35, 0.8], [0.65, 0.8]], np.float32) * side + box[:2]
    return Face(box=box, score=0.99, landmarks=marks, embedding=embedding)


class ScriptedPipeline:
    """Returns the next scripted list of faces per frame; an Exception entry is raised."""

    embedding_dim = DIM

    def __init__(self, script: list) -> None:
        self.script = list(script)

    def analyze(self, image: np.ndarray) -> list[Face]:
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture
def door(mosquitto):
    cfg = parse_config({"mqtt": {"port": mosquitto.port}, "camera": {"source": "/dev/video-none"}})
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(5)
    sub = Subscriber(mosquitto.host, mosquitto.port, "facedoor/front/decision")
    time.sleep(0.3)
    gallery = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), 0.7)

    def make(script: list, members: Gallery = gallery) -> DoorService:
        return DoorService(cfg, ScriptedPipeline(script), lambda: members, Camera(cfg.camera), link, Notifier(""))

    yield make, sub
    sub.stop()
    link.stop()


def frames(n: int, age_s: float = 0.0):
    """N camera frames of sharp texture (the faces' quality gates look at the pixels)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        now = time.monotonic() - age_s
        yield Frame(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), i + 1, now, time.time() - age_s)
        time.sleep(0.01)


def received(sub: Subscriber, wait: float = 1.0) -> list[dict]:
    time.sleep(wait)
    return [json.loads(m["payload"]) for m in sub.messages]


def test_the_face_near_the_door_decides_and_the_count_is_reported(door) -> None:
    make, sub = door
    service = make([[face(40, ALICE, x=200), face(120, BOB)]] * 3)  # alice far behind, bob at the door
    for f in frames(3):
        service.process(f)
    [d] = received(sub)
    assert d["decision"] == "unlock" and d["identity"] == "bob" and d["faces"] == 2 and d["frames"] == 3
    assert d["unknown_near"] == 0 and d["expires_at_ms"] == d["ts_ms"] + 5000


def test_a_stranger_beside_a_member_keeps_the_door_shut(door) -> None:
    make, sub = door
    service = make([[face(120, ALICE), face(100, STRANGER, x=180)]] * 3)
    for f in frames(3):
        service.process(f)
    decisions = received(sub)
    assert [(d["decision"], d["reason"]) for d in decisions] == [("deny", "companion"), ("deny", "unknown")]
    assert decisions[0]["identity"] == "alice" and decisions[0]["unknown_near"] == 1


def test_a_stranger_the_detector_misses_for_a_frame_still_keeps_the_door_shut(door) -> None:
    """Tailgating: the stranger's face track lives on for `tracking.max_gap_s`; a frame that shows
    only the member (the detector lost the stranger) unlocks nothing."""
    make, sub = door
    service = make([[face(120, ALICE), face(100, STRANGER, x=180)]] * 3 + [[face(120, ALICE)]] * 3)
    for f in frames(6):
        service.process(f)
    decisions = received(sub)
    assert [d for d in decisions if d["decision"] == "unlock"] == []
    assert decisions[0]["reason"] == "companion" and decisions[0]["identity"] == "alice"


def test_an_error_in_the_frame_path_decides_nothing_and_breaks_the_evidence(door) -> None:
    make, sub = door
    script = [[face(100, ALICE)], [face(100, ALICE)], RuntimeError("ORT failed"), [face(100, ALICE)],
              [face(100, ALICE)]]
    service = make(script)
    for f in frames(len(script)):
        service.process(f)
    assert received(sub) == [] and service.counts["errors"] == 1


def test_a_stranger_is_denied_not_matched_to_the_nearest(door) -> None:
    make, sub = door
    service = make([[face(100, STRANGER)]] * 3)
    for f in frames(3):
        service.process(f)
    [d] = received(sub)
    assert (d["decision"], d["reason"], d["identity"]) == ("deny", "unknown", None) and d["distance"] >= 0.7


def test_a_decision_older_than_its_ttl_is_never_published(door) -> None:
    make, sub = door
    service = make([[face(100, ALICE)]] * 3)
    for f in frames(3, age_s=6.0):  # frames captured 6 s ago (TTL 5 s)
        service.process(f)
    assert received(sub) == [] and service.link.dropped_decisions == 1
    assert not service.state.in_cooldown("alice", time.monotonic())  # undelivered: re-armed


def test_a_confident_unlock_adds_a_bounded_audited_door_template(mosquitto, tmp_path) -> None:
    """Door templates (opt-in): the visit's fused embedding joins the person's templates in the real
    store, written by a listener off the frame thread, at most `door_templates` of them, noted for
    the audit log; `remove` clears them."""
    from facedoor.door_templates import DoorTemplates
    from facedoor.events import DecisionEvent
    from facedoor.store import EmbeddingStore

    store = tmp_path / "door.db"
    encoder = "e" * 64
    with EmbeddingStore(store, encoder) as s:
        s.enroll("alice", ALICE[None], ["a" * 64])
    cfg = parse_config({"mqtt": {"port": mosquitto.port}, "camera": {"source": "/dev/video-none"},
                        "store": str(store), "policy": {"door_templates": 2, "cooldown_s": 0.0}})
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(5)
    seen: list[DecisionEvent] = []

    class Recorder:
        def on_decision(self, event: DecisionEvent) -> None:
            seen.append(event)

        def close(self) -> None:
            """Nothing to release."""

    def gallery() -> Gallery:
        with EmbeddingStore(store, encoder, readonly=True) as s:
            return s.gallery(0.7)

    rng = np.random.default_rng(5)
    visits = [ALICE + 0.02 * rng.normal(size=DIM).astype(np.float32) for _ in range(3)]
    pipeline = ScriptedPipeline([[face(100, v / np.linalg.norm(v))] for v in visits for _ in range(3)])
    pipeline.encoder_sha256 = encoder  # type: ignore[attr-defined]
    templates = DoorTemplates(store, encoder, cfg.policy.door_templates)
    service = DoorService(cfg, pipeline, gallery, Camera(cfg.camera), link, Notifier(""), [templates, Recorder()])
    try:
        for i, f in enumerate(frames(9)):
            if i % 3 == 0:
                service.reset_evidence()  # three visits
            service.process(f)
    finally:
        link.stop()
        templates.close()  # writes what is queued
    assert [e.notes.get("door_template") for e in seen] == ["queued"] * 3 and templates.stored == 3
    with EmbeddingStore(store, encoder) as s:
        [alice] = s.identities()
        assert (alice.embeddings, alice.door_templates) == (1, 2)  # bounded: the oldest was replaced
        s.remove("alice")
        assert s.identities() == []


def test_a_visit_that_looks_as_much_like_a_cohort_face_never_unlocks(door) -> None:
    """The cohort check at the door: the visit matches alice, but a cohort face is within
    `policy.cohort_margin` of it: one "lookalike" deny, and no unlock on the track's later frames."""
    make, sub = door
    visit = ALICE + 0.35 * unit(4)
    visit /= np.linalg.norm(visit)
    lookalike = visit + 0.3 * unit(5)
    lookalike /= np.linalg.norm(lookalike)
    d_alice, d_cohort = float(np.linalg.norm(visit - ALICE)), float(np.linalg.norm(visit - lookalike))
    assert d_alice < 0.7 and d_cohort <= d_alice + 0.2
    members = Gallery(["alice", "bob"], np.stack([ALICE, BOB]), 0.7, cohort=np.stack([STRANGER, lookalike]))
    service = make([[face(120, visit)]] * 8, members)
    for f in frames(8):
        service.process(f)
    decisions = received(sub)
    assert [(d["decision"], d["reason"], d["identity"]) for d in decisions] == [("deny", "lookalike", "alice")]
    assert decisions[0]["distance"] == pytest.approx(d_alice, abs=1e-3)


def test_the_door_and_the_benchmark_reach_the_same_decisions_on_the_same_sightings(door) -> None:
    """The judge is the one decision function: replaying the sightings the door recorded through
    benchmarks/visits.py's replay gives the door's own decisions, rule for rule."""
    import importlib.util
    import sys
    from pathlib import Path

    from facedoor.judge import FrameSightings, Rules

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "visits.py"
    spec = importlib.util.spec_from_file_location("visits_benchmark", path)
    assert spec is not None and spec.loader is not None
    visits = sys.modules["visits_benchmark"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(visits)
    make, sub = door
    near_bob = BOB + 0.3 * STRANGER
    script = ([[face(120, near_bob / np.linalg.norm(near_bob))]] * 4  # a match
              + [[face(120, ALICE), face(100, STRANGER, x=180)]] * 3 + [[face(120, ALICE)]] * 2  # companion
              + [[face(120, STRANGER), face(30, BOB, x=200)]] * 4)  # unknown, a far face counted
    service = make(script)
    recorded: list[FrameSightings] = []
    door_decisions = []
    sightings = service.sightings
    service.sightings = lambda frame, faces: recorded.append(sightings(frame, faces)) or recorded[-1]  # type: ignore
    service.listeners.append(type("Rec", (), {"on_decision": lambda self, e: door_decisions.append(e.decision),
                                              "close": lambda self: None})())
    for f in frames(len(script)):
        service.process(f)
    gallery = service.gallery
    replayed = list(visits.decisions(recorded, gallery, Rules.from_config(service.cfg, liveness_on=False)))
    key = [(d.decision, d.reason, d.identity, d.t, d.unknown_near, d.faces) for d in door_decisions]
    assert key == [(d.decision, d.reason, d.identity, d.t, d.unknown_near, d.faces) for d in replayed]
    assert {d.reason for d in door_decisions} >= {"companion", "match", "unknown"}
