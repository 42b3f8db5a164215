"""`facedoor run`: the door service. The per-frame path reads top to bottom in `DoorService.process`:

    frame -> pipeline.analyze -> tracker (fuse per face) -> liveness -> policy -> deliver -> listeners

Fail closed everywhere: an exception in the frame path is logged and decides nothing; while the
broker is unreachable or stalled, or the camera is down, nothing is decided (the evidence window
is reset); a decision is delivered only if the broker acknowledges it within its TTL and
`mqtt.ack_timeout_s` (facedoor.mqtt). SIGHUP reloads the store's gallery (after a failed reload
nobody matches, faces are reported unknown, until a reload succeeds); SIGTERM/SIGINT stop cleanly
(retained `offline`, camera closed, exit 0).

Each decision becomes a `DecisionEvent` handed to the listeners (facedoor.events): the unlock
action, then the audit log. `build_service` wires the door the same way for `facedoor run` and
the demo.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from facedoor.camera import Camera, CameraState, Frame, describe
from facedoor.config import FacedoorConfig
from facedoor.events import DecisionEvent, DecisionListener
from facedoor.factors import FactorListener
from facedoor.formatting import distance, finite, iso_utc
from facedoor.liveness import LivenessModel, TrackLiveness, load_liveness
from facedoor.logs import setup_logging
from facedoor.match import Gallery
from facedoor.models import Manifest
from facedoor.motion import IdleGate
from facedoor.mqtt import MqttLink
from facedoor.pipeline import sharpness
from facedoor.policy import Decision, TrackPolicy
from facedoor.sdnotify import Notifier, watchdog_interval_s
from facedoor.signing import load_key, sign
from facedoor.store import StoreWatcher
from facedoor.track import Sighting, Track, Tracker

if TYPE_CHECKING:
    from facedoor.pipeline import Face, FacePipeline

log = logging.getLogger(__name__)

STORE_CHECK_S = 0.25  # a `facedoor remove` takes effect within this (+ one frame), no SIGHUP needed


class DoorService:
    """Owns the frame loop; everything it talks to is passed in (tests use real parts)."""

    def __init__(self, cfg: FacedoorConfig, pipeline: FacePipeline, load_gallery: Callable[[], Gallery],
                 camera: Camera, link: MqttLink, notifier: Notifier, listeners: Sequence[DecisionListener] = (),
                 store_watcher: StoreWatcher | None = None, signing_key: bytes | None = None,
                 liveness: LivenessModel | None = None, factors: FactorListener | None = None):
        self.cfg = cfg
        self.pipeline = pipeline
        self.load_gallery = load_gallery
        self.camera = camera
        self.link = link
        self.notifier = notifier
        self.listeners = list(listeners)
        self.store_watcher = store_watcher  # another process enrolled or removed someone: reload at once
        self.signing_key = signing_key
        self.policy = TrackPolicy(cfg.policy, cfg.recognition.threshold)
        self.tracker = Tracker(cfg.tracking)
        self.gate = IdleGate.from_config(cfg.idle)
        self.liveness = liveness  # None: the gate is off (said at start)
        self.factors = factors    # None: no second factor configured
        self.threshold = cfg.recognition.threshold
        self.gallery: Gallery | None = load_gallery()   # None after a failed reload: nobody matches
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._health_due = threading.Event()
        self._last_frame_t: float | None = None
        self._camera_state = CameraState.STARTING
        self._started = time.monotonic()
        self._processed: list[float] = []          # monotonic times of recently processed frames
        self._latencies_ms: list[float] = []
        self.counts = {"frames": 0, "errors": 0, "skipped_offline": 0, "skipped_idle": 0, "unlock": 0, "deny": 0}
        self.store_error: str | None = None
        self.exit_code = 0
        link.add_on_connect(self._health_due.set)

    # --- wiring ------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def request_reload(self, *_: Any) -> None:
        self._reload.set()

    def start(self) -> None:
        """Start capturing and connecting (both in the background)."""
        self.camera.start()
        self.link.start()

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Process frames until stopped or the video ends; 0 on a clean stop, 2 when the broker refuses
        a second factor's subscription (the door cannot check the factor)."""
        watchdog = watchdog_interval_s()
        ping_every = min(1.0, watchdog / 2) if watchdog else None
        last_ping = last_health = last_store_check = 0.0
        enrolled = len(self.gallery.identities) if self.gallery is not None else 0
        self.notifier.ready(f"watching {describe(self.camera.source)}; {enrolled} enrolled")
        log.info("facedoor running", extra={"fields": {
            "event": "ready", "door": self.cfg.door_id, "source": describe(self.camera.source),
            "enrolled": enrolled, "threshold": self.threshold}})
        while not self._stop.is_set():
            frame = self.camera.get(timeout=0.2)
            now = time.monotonic()
            if self.store_watcher is not None and now - last_store_check >= STORE_CHECK_S:
                last_store_check = now
                if self.store_watcher.changed():
                    self._reload.set()
            if self._reload.is_set():
                self._reload.clear()
                self.reload_gallery()
            self._track_camera_state()
            if self.factors is not None and self.factors.refused is not None:
                log.error("second factor: %s; stopping (exit 2)", self.factors.refused,
                          extra={"fields": {"event": "second_factor_refused"}})
                self.exit_code = 2  # a configuration fault: systemd does not restart the door
                break
            if frame is not None:
                self.process(frame)
            elif self.camera.ended:
                log.info("video source ended; stopping", extra={"fields": {"event": "source_ended"}})
                break
            now = time.monotonic()
            if ping_every and now - last_ping >= ping_every and self._loop_healthy():
                self.notifier.watchdog()
                last_ping = now
            if self._health_due.is_set() or now - last_health >= self.cfg.mqtt.health_interval_s:
                self._health_due.clear()
                self.publish_health()
                last_health = now
        return self.exit_code

    def process(self, frame: Frame) -> None:
        """The per-frame path: idle gate -> detect + encode -> track + fuse -> liveness -> decide -> deliver."""
        self.counts["frames"] += 1
        if self._last_frame_t is not None and frame.t_mono - self._last_frame_t > self.cfg.camera.stall_timeout_s:
            self.reset_evidence()  # evidence never spans a camera outage
        self._last_frame_t = frame.t_mono
        if not self.link.live:
            self.counts["skipped_offline"] += 1
            self.reset_evidence()  # decide nothing that cannot be delivered now
            return
        try:
            if not self.gate.should_detect(frame.image, frame.t_mono):
                self.counts["skipped_idle"] += 1  # a still, empty scene: the detector runs at a low rate
                return
            faces = self.pipeline.analyze(frame.image)  # largest first; only the faces near the door encoded
            self.gate.observe(frame.t_mono, len(faces))
            encoded = [f for f in faces if f.embedding is not None]
            sightings = [Sighting.of(f, sharpness(frame.image, f), self.gallery) for f in encoded]
            tracks = self.tracker.update(frame.t_mono, sightings)
            self.check_liveness(frame, encoded, tracks)
            decisions = self.decide(faces, encoded, tracks)
        except Exception:
            self.counts["errors"] += 1
            self.reset_evidence()
            log.exception("frame %d: recognition failed; nothing decided", frame.seq,
                          extra={"fields": {"event": "frame_error"}})
            return
        self._processed.append(time.monotonic())
        for decision, face, strangers in decisions:
            self.publish_decision(decision, frame, face, strangers)

    def check_liveness(self, frame: Frame, faces: list[Face], tracks: list[Track]) -> None:
        """Score each face that matches a member on the liveness gate; the evidence stays with its track."""
        if self.liveness is None:
            return
        for face, track in zip(faces, tracks):
            if track.last.nearest is not None and self.policy.matched(track, self.gallery):
                evidence = track.state.setdefault(
                    "liveness", TrackLiveness(self.cfg.liveness.threshold, self.cfg.liveness.min_frames))
                evidence.add(self.liveness.score(frame.image, face.box))

    def decide(self, faces: list[Face], encoded: list[Face],
               tracks: list[Track]) -> list[tuple[Decision, Face, tuple[Face, ...]]]:
        """The decisions of the faces near the door (at least `companion_ratio` of the largest
        one's size; faces far behind decide nothing), each told how many of the others near the
        door match no member: a face near the door left unencoded by the bound counts as one, and
        so does a stranger's track near the door (`min_good_frames` good frames, matching nobody)
        that this frame missed but that is still alive (seen within `tracking.max_gap_s`): a
        stranger the detector loses for a frame never lets the member beside them in."""
        near_size = self.cfg.policy.companion_ratio * max((f.size for f in faces), default=0.0)
        near = [(f, t) for f, t in zip(encoded, tracks) if f.size >= near_size]
        strangers: dict[int, Face] = {t.id: f for f, t in near if self.policy.matched(t, self.gallery) is None}
        strangers.update({-1 - i: f for i, f in enumerate(faces) if f.size >= near_size and f.embedding is None})
        seen = {t.id for t in tracks}
        missed = sum(1 for t in self.tracker.tracks if t.id not in seen and t.last.size >= near_size
                     and t.good >= self.cfg.policy.min_good_frames and self.policy.matched(t, self.gallery) is None)
        decisions = []
        heard = self.factors.snapshot() if self.factors is not None else None  # one snapshot per frame
        for face, track in near:
            evidence: TrackLiveness | None = track.state.get("liveness")
            verdict = None if self.liveness is None else (evidence.state.verdict if evidence else "undecided")
            decision = self.policy.decide(
                track, self.gallery, liveness=verdict, live_score=evidence.state.score if evidence else None,
                unknown_near=len(strangers.keys() - {track.id}) + missed, factors=heard)
            if decision is not None:
                decisions.append((decision, face, tuple(f for i, f in strangers.items() if i != track.id)))
        return decisions

    def reset_evidence(self) -> None:
        """Forget every face track (camera or broker gap, store change, error): evidence never spans one."""
        self.tracker.reset()

    def publish_decision(self, decision: Decision, frame: Frame, face: Face | None,
                         strangers: tuple[Face, ...] = ()) -> bool:
        """Deliver DECISION (acknowledged within its TTL, or dropped), log it, tell the listeners."""
        latency_ms = (time.monotonic() - frame.t_mono) * 1000
        ttl = self.cfg.decision_ttl_s
        factor = decision.second_factor
        payload = {
            "id": str(uuid.uuid4()),
            "door": self.cfg.door_id,
            "decision": decision.decision,
            "reason": decision.reason,
            "identity": decision.identity,
            "distance": distance(decision.distance),
            "threshold": decision.threshold,
            "frames": decision.frames,
            "window": decision.window,
            "faces": decision.faces,
            "unknown_near": decision.unknown_near,
            "live_score": finite(decision.live_score, 3),
            "factor": factor.factor if factor is not None else None,
            "factor_detail": factor.detail if factor is not None and factor.detail else None,
            "ts": iso_utc(frame.t_wall),
            "ts_ms": int(frame.t_wall * 1000),
            "ttl_s": ttl,
            "expires_at_ms": int((frame.t_wall + ttl) * 1000),
            "latency_ms": round(latency_ms, 1),
        }
        if self.signing_key is not None:
            payload = sign(payload, self.signing_key)
        delivered = self.link.deliver(self.link.decision_topic, json.dumps(payload), frame.t_mono, ttl,
                                      f"decision {payload['id']} ({decision.decision})")
        if delivered:
            self.counts[decision.decision] += 1
            self._latencies_ms.append(latency_ms)
            if decision.decision == "unlock" and factor is not None and factor.pin_t is not None \
                    and self.factors is not None and decision.identity is not None:
                self.factors.spend(decision.identity, factor.pin_t)  # one PIN entry, one unlock
        else:
            self.policy.retract(decision)
        log.info("decision %s %s", decision.decision, decision.identity or decision.reason, extra={"fields": {
            "event": "decision", "id": payload["id"], "decision": decision.decision, "reason": decision.reason,
            "identity": decision.identity, "distance": payload["distance"], "threshold": decision.threshold,
            "factor": payload["factor"], "factor_detail": payload["factor_detail"],
            "frames": f"{decision.frames}/{decision.window}", "faces": decision.faces,
            "latency_ms": payload["latency_ms"], "delivered": delivered}})
        event = DecisionEvent(payload, delivered, frame, face, strangers)
        if delivered and decision.template:
            event.notes["door_template"] = self.add_door_template(decision)
        for listener in self.listeners:
            try:
                listener.on_decision(event)
            except Exception:
                log.exception("decision listener %s failed for decision %s", type(listener).__name__, payload["id"])
        return delivered

    def add_door_template(self, decision: Decision) -> bool:
        """Store a confident visit's fused embedding as a door template of its person (opt-in,
        `policy.door_templates`); the store watcher then reloads the gallery. True when stored."""
        from facedoor.store import EmbeddingStore

        assert decision.identity is not None and decision.embedding is not None
        try:
            with EmbeddingStore(self.cfg.store, self.pipeline.encoder_sha256, create=False) as store:
                store.add_door_template(decision.identity, decision.embedding, self.cfg.policy.door_templates)
        except Exception:
            log.exception("door template for %s not stored", decision.identity,
                          extra={"fields": {"event": "door_template_failed"}})
            return False
        log.info("door template added for %s (fused distance %.3f)", decision.identity, decision.distance,
                 extra={"fields": {"event": "door_template", "identity": decision.identity}})
        return True

    # --- housekeeping ------------------------------------------------------------------------
    def reload_gallery(self) -> None:
        """Re-read the store (SIGHUP, or another process changed it); on failure nobody matches
        (fail closed) until a reload works. The evidence so far is forgotten either way."""
        try:
            self.gallery = self.load_gallery()
            self.store_error = None
            log.info("store reloaded: %d identities, %d embeddings", len(self.gallery.identities),
                     len(self.gallery), extra={"fields": {"event": "store_reloaded"}})
        except Exception as exc:
            self.gallery = None
            self.store_error = str(exc)
            log.error("store reload failed: %s; nobody is recognised until a reload succeeds", exc,
                      extra={"fields": {"event": "store_reload_failed"}})
        self.reset_evidence()
        self._health_due.set()

    def _track_camera_state(self) -> None:
        state = self.camera.state
        if state != self._camera_state:
            log.log(logging.WARNING if state == CameraState.DOWN else logging.INFO,
                    "camera %s: %s -> %s", describe(self.camera.source), self._camera_state.value, state.value,
                    extra={"fields": {"event": "camera_state", "state": state.value}})
            if state != CameraState.UP:
                self.reset_evidence()
            self.notifier.status(f"camera {state.value}")
            self._camera_state = state
            self._health_due.set()

    def _loop_healthy(self) -> bool:
        """Watchdog condition: the loop runs (we are here) and capture is not hung."""
        cam = self.cfg.camera  # a read or an open may block up to stall_timeout_s, a backoff wait up to its max
        return self.camera.alive(grace_s=2 * cam.stall_timeout_s + cam.reopen_backoff_max_s + 5.0)

    def health(self) -> dict[str, Any]:
        """The periodic health report (also sent after reconnects and camera state changes)."""
        now = time.monotonic()
        self._processed = [t for t in self._processed if now - t <= 10.0]
        span = min(10.0, now - self._started)
        lat = sorted(self._latencies_ms[-200:])
        self._latencies_ms = lat[-200:]
        return {
            "door": self.cfg.door_id,
            "ts": iso_utc(time.time()),
            "ts_ms": int(time.time() * 1000),
            "uptime_s": round(now - self._started, 1),
            "camera": self.camera.state.value,
            "state": self.gate.state,
            "fps": round(len(self._processed) / span, 2) if span > 0 else 0.0,
            "last_frame_age_s": finite(self.camera.last_frame_age(), 3),
            "camera_reopens": self.camera.reopens,
            "camera_failures": self.camera.failures,
            "broker": self.link.state,
            "broker_reconnects": self.link.reconnects,
            "broker_stalls": self.link.stalls,
            "last_broker_outage_s": finite(self.link.last_outage_s, 1),
            "dropped_decisions": self.link.dropped_decisions,
            "purged_messages": self.link.purged,
            "enrolled": len(self.gallery.identities) if self.gallery is not None else 0,
            "store_error": self.store_error,
            "latency_ms_median": finite(lat[len(lat) // 2], 1) if lat else None,
            **({"second_factor": dict(self.factors.counts)} if self.factors is not None else {}),
            **{k: v for k, v in self.counts.items()},
        }

    def publish_health(self) -> None:
        report = self.health()
        self.link.publish(self.link.health_topic, json.dumps(report), retain=False,
                          expiry_s=max(1.0, 3 * self.cfg.mqtt.health_interval_s))
        self.notifier.status(f"camera {report['camera']}, {report['fps']} fps, "
                             f"broker {self.link.state}, {report['unlock']} unlocks")

    def close(self) -> None:
        """Stop cleanly: STOPPING=1, listeners (a due relock goes out), camera, then retained offline."""
        self.notifier.stopping()
        for listener in self.listeners:
            try:
                listener.close()
            except Exception:
                log.exception("decision listener %s failed to close", type(listener).__name__)
        self.camera.stop()
        self.link.stop()
        if self.factors is not None:
            self.factors.close()
        if self.store_watcher is not None:
            self.store_watcher.close()
        log.info("facedoor stopped", extra={"fields": {"event": "stopped", **self.counts}})


def build_service(cfg: FacedoorConfig, pipeline: FacePipeline, *, source: int | str | None = None,
                  loop: bool | None = None, notifier: Notifier | None = None,
                  extra_listeners: Sequence[DecisionListener] = ()) -> DoorService:
    """Wire the door: store, camera, MQTT link, Home Assistant discovery and the decision listeners
    (unlock action, then EXTRA_LISTENERS, then the audit log). `facedoor run` and the demo both
    start here, so they cannot drift. Raises StoreError before anything is started."""
    from facedoor.audit import AuditLog
    from facedoor.homeassistant import HomeAssistantDiscovery
    from facedoor.store import EmbeddingStore
    from facedoor.unlock import UnlockAction

    key = load_key(cfg.mqtt.signing_key_file) if cfg.mqtt.signing_key_file is not None else None
    factors = FactorListener.from_config(cfg.policy.second_factor)  # a PIN file it cannot use: ConfigError
    watcher = StoreWatcher(cfg.store)  # before the first load, so no commit in between is missed

    def load_gallery() -> Gallery:
        with EmbeddingStore(cfg.store, pipeline.encoder_sha256, create=False, readonly=True) as store:
            return store.gallery(cfg.recognition.threshold)

    link = MqttLink(cfg)
    HomeAssistantDiscovery(cfg, link).attach()
    listeners: list[DecisionListener] = []
    if cfg.unlock_action is not None:
        listeners.append(UnlockAction(cfg.unlock_action, link, cfg.decision_ttl_s))
    listeners.extend(extra_listeners)
    audit = AuditLog.from_config(cfg)
    if audit is not None:
        listeners.append(audit)
    camera = Camera(cfg.camera, source, loop)
    liveness = load_liveness(Manifest.load(cfg.models), cfg.liveness.enabled)
    if factors is not None:
        factors.attach(link)
    return DoorService(cfg, pipeline, load_gallery, camera, link, notifier or Notifier(), listeners,
                       store_watcher=watcher, signing_key=key, liveness=liveness, factors=factors)


def run_daemon(cfg: FacedoorConfig, source: int | str | None = None, loop: bool | None = None) -> int:
    """Start everything in fail-closed order, run until SIGTERM/SIGINT or the video's end.

    Raises ConfigError/ModelError/StoreError/CameraError before READY (the CLI exits 2).
    """
    from facedoor.models import threshold_warning
    from facedoor.pipeline import FacePipeline

    setup_logging(cfg.logging.level, cfg.logging.format)
    notifier = Notifier()
    notifier.status("loading models")
    pipeline = FacePipeline.from_config(cfg)
    warning = threshold_warning(cfg.recognition.threshold, pipeline.encoder.entry)
    if warning:
        log.warning(warning, extra={"fields": {"event": "threshold_above_recommended"}})
    service = build_service(cfg, pipeline, source=source, loop=loop, notifier=notifier)
    if service.gallery is not None and not service.gallery.identities:
        log.warning("nobody is enrolled in %s: every face will be denied (enrol with `facedoor enroll`)",
                    cfg.store, extra={"fields": {"event": "empty_store"}})
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    signal.signal(signal.SIGHUP, service.request_reload)
    service.start()
    try:
        return service.run()
    finally:
        service.close()
