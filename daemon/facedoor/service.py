"""`facedoor run`: the door service. The per-frame path reads top to bottom in `DoorService.process`:

    frame -> idle gate -> pipeline.analyze (detect, encode) -> judge (facedoor.judge) -> deliver -> listeners
                                                                         -> challenges asked (facedoor.challenge)

Fail closed everywhere: an exception in the frame path is logged and decides nothing; while the
broker is unreachable or stalled, or the camera is down, nothing is decided (the evidence window
is reset); a decision is delivered only if the broker acknowledges it within its TTL and
`mqtt.ack_timeout_s` (facedoor.mqtt). SIGHUP reloads the store's gallery (after a failed reload
nobody matches, faces are reported unknown, until a reload succeeds); SIGTERM/SIGINT stop cleanly
(retained `offline`, camera closed, exit 0).

Each decision becomes a `DecisionMessage` (facedoor.message) and a `DecisionEvent` handed to the
listeners (facedoor.events): the judge's retraction of an undelivered decision, the unlock action,
door templates, then the audit log. `build_service` wires the door the same way for `facedoor run` and
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
from facedoor.challenge import ChallengeAnnouncer
from facedoor.config import FacedoorConfig
from facedoor.events import DecisionEvent, DecisionListener
from facedoor.factors import FactorListener
from facedoor.formatting import distance, finite, iso_utc
from facedoor.judge import Decision, FrameSightings, JudgeState, Rules, Seen, judge
from facedoor.liveness import LivenessModel, load_liveness
from facedoor.logs import setup_logging
from facedoor.match import Gallery
from facedoor.message import ChallengeResult, DecisionMessage
from facedoor.models import Manifest
from facedoor.motion import IdleGate
from facedoor.mqtt import Delivery, MqttLink
from facedoor.pipeline import sharpness
from facedoor.sdnotify import Notifier, watchdog_interval_s
from facedoor.signing import load_key
from facedoor.store import StoreWatcher

if TYPE_CHECKING:
    from facedoor.audit import AuditLog
    from facedoor.fleet_sync import RosterSync
    from facedoor.pipeline import Face, FacePipeline

log = logging.getLogger(__name__)

STORE_CHECK_S = 0.25  # a `facedoor remove` takes effect within this (+ one frame), no SIGHUP needed


class RetractUndelivered:
    """A decision listener: a decision the broker did not acknowledge re-arms the judge's cooldown or
    rate limit, so the member (or the next deny) is not held back by a message nobody received."""

    def __init__(self, state: JudgeState):
        self.state = state

    def on_decision(self, event: DecisionEvent) -> None:
        # A refusal (the broker's ACL) or a failing required audit is no transient loss: retrying it
        # every frame would only repeat it, so the cooldown or rate limit stands.
        if not event.delivered and event.notes.get("delivery") not in (Delivery.REFUSED.value,
                                                                       Delivery.UNAUDITED.value):
            self.state.retract(event.decision)

    def close(self) -> None:
        pass


class DoorService:
    """Owns the frame loop; everything it talks to is passed in (tests use real parts)."""

    def __init__(self, cfg: FacedoorConfig, pipeline: FacePipeline, load_gallery: Callable[[], Gallery],
                 camera: Camera, link: MqttLink, notifier: Notifier, listeners: Sequence[DecisionListener] = (),
                 store_watcher: StoreWatcher | None = None, signing_key: bytes | None = None,
                 liveness: LivenessModel | None = None, roster: RosterSync | None = None,
                 audit: AuditLog | None = None, factors: FactorListener | None = None,
                 challenges: ChallengeAnnouncer | None = None):
        self.cfg = cfg
        self.pipeline = pipeline
        self.load_gallery = load_gallery
        self.camera = camera
        self.link = link
        self.notifier = notifier
        self.listeners = list(listeners)
        self.store_watcher = store_watcher  # another process enrolled or removed someone: reload at once
        self.signing_key = signing_key
        self.liveness = liveness  # None: the gate is off (said at start)
        self.audit = audit  # also among the listeners; with audit.required an unlock is written before it is sent
        self.factors = factors    # None: no second factor configured
        self.challenges = challenges  # None: liveness.challenge is off
        self.roster = roster  # a site roster (facedoor.fleet_sync): no decision while it is unknown
        self._roster_generation = roster.generation if roster is not None else 0
        self.rules = Rules.from_config(cfg, liveness_on=liveness is not None)
        self.state = JudgeState(cfg.tracking, cfg.quality)
        self.listeners.insert(0, RetractUndelivered(self.state))  # first: a dropped unlock re-arms at once
        self.gate = IdleGate.from_config(cfg.idle)
        self.gallery: Gallery | None = load_gallery()   # None after a failed reload: nobody matches
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._health_due = threading.Event()
        self._last_frame_t: float | None = None
        self._camera_state = CameraState.STARTING
        self._started = time.monotonic()
        self._processed: list[float] = []          # monotonic times of recently processed frames
        self._latencies_ms: list[float] = []
        self.counts = {"frames": 0, "errors": 0, "skipped_offline": 0, "skipped_idle": 0, "skipped_roster": 0,
                       "unlock": 0, "deny": 0}
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
            "enrolled": enrolled, "threshold": self.rules.threshold, "liveness": self.liveness_state}})
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
        """The per-frame path: idle gate -> pipeline (detect, encode) -> judge -> deliver."""
        self.counts["frames"] += 1
        if self._last_frame_t is not None and frame.t_mono - self._last_frame_t > self.cfg.camera.stall_timeout_s:
            self.reset_evidence()  # evidence never spans a camera outage
        self._last_frame_t = frame.t_mono
        if not self.link.live:
            self.counts["skipped_offline"] += 1
            self.reset_evidence()  # decide nothing that cannot be delivered now
            return
        if self.roster_blocked(frame.t_mono) is not None:
            self.counts["skipped_roster"] += 1
            self.reset_evidence()  # decide nothing on an unknown roster
            return
        try:
            if not self.gate.should_detect(frame.image, frame.t_mono):
                self.counts["skipped_idle"] += 1  # a still, empty scene: the detector runs at a low rate
                return
            faces = self.pipeline.analyze(frame.image)  # largest first; only the faces near the door encoded
            self.gate.observe(frame.t_mono, len(faces))
            judgement = judge(self.sightings(frame, faces), self.state, self.gallery, self.rules)
        except Exception:
            self.counts["errors"] += 1
            self.reset_evidence()
            log.exception("frame %d: recognition failed; nothing decided", frame.seq,
                          extra={"fields": {"event": "frame_error"}})
            return
        self._processed.append(time.monotonic())
        if self.challenges is not None:
            for ask in judgement.asks:
                self.challenges.on_ask(ask, frame)
        for decision in judgement.decisions:
            self.publish_decision(decision, frame, faces)

    @property
    def liveness_state(self) -> str:
        """The gate's state for every health message (decisions carry it from the judge): "on" or "off"."""
        return "off" if self.liveness is None else "on"

    def roster_blocked(self, now: float) -> str | None:
        """Why the site roster forbids deciding now (facedoor.fleet_sync), or None: it is unknown on
        this connection, too old, or applied to the store but not yet to the loaded gallery."""
        if self.roster is None:
            return None
        if self.roster.generation != self._roster_generation:
            self._reload.set()  # the run loop reloads before the next frame
            return "the gallery is behind the applied roster"
        return self.roster.blocked(now)

    def sightings(self, frame: Frame, faces: list[Face]) -> FrameSightings:
        """The judge's view of FRAME's FACES; the liveness gate scores a face only when the judge asks."""
        seen = [Seen(f.box, float(f.score), sharpness(frame.image, f) if f.embedding is not None else 0.0,
                     f.embedding) for f in faces]
        model = self.liveness
        live = (lambda i, turn: model.observe(frame.image, faces[i], turn)) if model is not None else None
        heard = self.factors.snapshot() if self.factors is not None else None
        return FrameSightings(frame.t_mono, seen, live, heard)

    def reset_evidence(self) -> None:
        """Forget every face track (camera or broker gap, store change, error): evidence never spans one."""
        self.state.reset()

    def message(self, decision: Decision, frame: Frame) -> DecisionMessage:
        """The message for DECISION taken on FRAME: valid for `decision_ttl_s` from the capture, signed when set."""
        ttl = self.cfg.decision_ttl_s
        check = decision.second_factor
        message = DecisionMessage(
            id=str(uuid.uuid4()), door=self.cfg.door_id, decision=decision.decision, reason=decision.reason,
            identity=decision.identity, distance=distance(decision.distance), threshold=decision.threshold,
            frames=decision.frames, window=decision.window, faces=decision.faces,
            unknown_near=decision.unknown_near, live_score=finite(decision.live_score, 3),
            liveness=decision.liveness, factor=check.factor if check is not None else None,
            factor_detail=check.detail if check is not None and check.detail else None,
            challenge=ChallengeResult(id=decision.challenge.id, direction=decision.challenge.direction,
                                      answer=decision.challenge.answer) if decision.challenge is not None else None,
            ts=iso_utc(frame.t_wall), ts_ms=int(frame.t_wall * 1000), ttl_s=ttl,
            expires_at_ms=int((frame.t_wall + ttl) * 1000),
            latency_ms=round((time.monotonic() - frame.t_mono) * 1000, 1))
        return message.signed(self.signing_key) if self.signing_key is not None else message

    def publish_decision(self, decision: Decision, frame: Frame, faces: Sequence[Face] = ()) -> bool:
        """Deliver DECISION (acknowledged within its TTL, or dropped), log it, tell the listeners."""
        message = self.message(decision, frame)
        delivery = self.deliver(message, frame)
        delivered = bool(delivery)
        if delivered:
            self.counts[decision.decision] += 1
            self._latencies_ms.append(message.latency_ms)
        log.info("decision %s %s", decision.decision, decision.identity or decision.reason, extra={"fields": {
            "event": "decision", "id": message.id, "decision": decision.decision, "reason": decision.reason,
            "identity": decision.identity, "distance": message.distance, "threshold": decision.threshold,
            "factor": message.factor, "factor_detail": message.factor_detail,
            "challenge": message.challenge.answer if message.challenge is not None else None,
            "frames": f"{decision.frames}/{decision.window}", "faces": decision.faces,
            "latency_ms": message.latency_ms, "delivered": delivered, "delivery": delivery.value}})
        event = DecisionEvent(decision, message, delivered, frame, faces)
        event.notes["delivery"] = delivery.value
        for listener in self.listeners:
            try:
                listener.on_decision(event)
            except Exception:
                log.exception("decision listener %s failed for decision %s", type(listener).__name__, message.id)
        return delivered

    def deliver(self, message: DecisionMessage, frame: Frame) -> Delivery:
        """Publish MESSAGE on the decision topic. With `audit.required`, an unlock is first written to
        the audit log (synchronously); if that fails it is not sent (UNAUDITED): audit, then act."""
        what = f"decision {message.id} ({message.decision})"
        payload = message.payload()
        if message.decision == "unlock" and self.audit is not None and self.cfg.audit.required \
                and not self.audit.write_ahead(payload):
            return self.link.drop(what, Delivery.UNAUDITED, "audit.required and its audit entry could not be written")
        return self.link.deliver(self.link.decision_topic, json.dumps(payload), frame.t_mono, message.ttl_s, what)

    # --- housekeeping ------------------------------------------------------------------------
    def reload_gallery(self) -> None:
        """Re-read the store (SIGHUP, or another process changed it); on failure nobody matches
        (fail closed) until a reload works. The evidence so far is forgotten either way."""
        if self.roster is not None:
            self._roster_generation = self.roster.generation  # read before loading: the load includes it
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
            "broker": self.link.condition,
            "refused": dict(self.link.refused),  # topic -> reason: the broker refuses what the door sends there
            "audit": self.audit.state if self.audit is not None else "off",
            "broker_reconnects": self.link.reconnects,
            "broker_stalls": self.link.stalls,
            "last_broker_outage_s": finite(self.link.last_outage_s, 1),
            "dropped_decisions": self.link.dropped_decisions,
            "purged_messages": self.link.purged,
            "enrolled": len(self.gallery.identities) if self.gallery is not None else 0,
            "liveness": self.liveness_state,
            "store_error": self.store_error,
            "latency_ms_median": finite(lat[len(lat) // 2], 1) if lat else None,
            "roster": self.roster.health(now) if self.roster is not None else None,
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
        if self.store_watcher is not None:
            self.store_watcher.close()
        if self.roster is not None:
            self.roster.close()
        log.info("facedoor stopped", extra={"fields": {"event": "stopped", **self.counts}})


def build_service(cfg: FacedoorConfig, pipeline: FacePipeline, *, source: int | str | None = None,
                  loop: bool | None = None, notifier: Notifier | None = None,
                  extra_listeners: Sequence[DecisionListener] = ()) -> DoorService:
    """Wire the door: store, camera, MQTT link, Home Assistant discovery and the decision listeners
    (the judge's retraction, unlock action, door templates, then EXTRA_LISTENERS, then the audit
    log). `facedoor run` and the demo both
    start here, so they cannot drift. Raises StoreError before anything is started."""
    from facedoor.audit import AuditLog
    from facedoor.door_templates import DoorTemplates
    from facedoor.homeassistant import HomeAssistantDiscovery
    from facedoor.store import EmbeddingStore
    from facedoor.unlock import UnlockAction

    liveness = load_liveness(Manifest.load(cfg.models), cfg.liveness.enabled,  # first: a gate asked for, or no door
                             required=cfg.liveness.required)
    key = load_key(cfg.mqtt.signing_key_file) if cfg.mqtt.signing_key_file is not None else None
    factors = FactorListener.from_config(cfg.policy.second_factor)  # a PIN file it cannot use: ConfigError
    link = MqttLink(cfg)
    roster = None
    if cfg.fleet is not None:  # the site key is checked (exit 2) and a new door's empty store created here
        from facedoor.fleet_sync import RosterSync

        roster = RosterSync(cfg, link, pipeline.encoder_sha256)
    watcher = StoreWatcher(cfg.store)  # before the first load, so no commit in between is missed

    def load_gallery() -> Gallery:
        with EmbeddingStore(cfg.store, pipeline.encoder_sha256, create=False, readonly=True) as store:
            return store.gallery(cfg.recognition.threshold)

    HomeAssistantDiscovery(cfg, link).attach()
    challenges = ChallengeAnnouncer(cfg, link) if cfg.liveness.challenge != "off" else None
    listeners: list[DecisionListener] = []
    if factors is not None:
        factors.attach(link)
        listeners.append(factors)  # spends the PIN of a delivered unlock
    if cfg.unlock_action is not None:
        listeners.append(UnlockAction(cfg.unlock_action, link, cfg.decision_ttl_s, key))
    if cfg.policy.door_templates > 0:
        listeners.append(DoorTemplates(cfg.store, pipeline.encoder_sha256, cfg.policy.door_templates,
                                       on_stored=(lambda name: roster.publish_local([name])) if roster else None))
    listeners.extend(extra_listeners)
    audit = AuditLog.from_config(cfg)
    if audit is not None:
        listeners.append(audit)
    camera = Camera(cfg.camera, source, loop)
    if roster is not None:
        roster.start()
    return DoorService(cfg, pipeline, load_gallery, camera, link, notifier or Notifier(), listeners,
                       store_watcher=watcher, signing_key=key, liveness=liveness, roster=roster, audit=audit,
                       factors=factors, challenges=challenges)


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
    stuck = service.factors.without_source(service.gallery.identities) \
        if service.factors is not None and service.gallery is not None else []
    if stuck:
        log.warning("second factor: %s need a factor they have no presence topic or PIN for: they are always "
                    "denied", ", ".join(stuck), extra={"fields": {"event": "second_factor_unreachable",
                                                                   "members": stuck}})
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    signal.signal(signal.SIGHUP, service.request_reload)
    service.start()
    try:
        return service.run()
    finally:
        service.close()
