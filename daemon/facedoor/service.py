"""`facedoor run`: the door service. The per-frame path reads top to bottom in `DoorService.process`:

    frame -> pipeline.analyze -> largest face -> gallery.identify -> policy -> publish -> log

Fail closed everywhere: an exception in the frame path is logged and decides nothing; while the
broker is unreachable or the camera is down nothing is decided (the evidence window is reset);
a decision older than its TTL is never published. SIGHUP reloads the store's gallery (after a
failed reload nobody matches, faces are reported unknown, until a reload succeeds); SIGTERM/SIGINT
stop cleanly (retained `offline`, camera closed, exit 0).

Beside each decision, `facedoor.integrations.Integrations` (unlock action, audit log, Home
Assistant discovery) is told what was decided and whether it was delivered.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from .camera import Camera, CameraError, CameraState, Frame, describe
from .config import FacedoorConfig
from .logs import setup_logging
from .match import Gallery, Match
from .mqtt import MqttLink
from .policy import Decision, Observation, Policy
from .sdnotify import Notifier, watchdog_interval_s

if TYPE_CHECKING:
    from .integrations import Integrations
    from .pipeline import Face, FacePipeline

log = logging.getLogger(__name__)

def _finite(x: float | None, digits: int = 4) -> float | None:
    return round(float(x), digits) if x is not None and math.isfinite(x) else None


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DoorService:
    """Owns the frame loop; everything it talks to is passed in (tests use real parts)."""

    def __init__(self, cfg: FacedoorConfig, pipeline: "FacePipeline", load_gallery: Callable[[], Gallery],
                 camera: Camera, link: MqttLink, notifier: Notifier, integrations: "Integrations | None" = None):
        self.cfg = cfg
        self.pipeline = pipeline
        self.load_gallery = load_gallery
        self.camera = camera
        self.link = link
        self.notifier = notifier
        self.integrations = integrations
        self.policy = Policy(cfg.policy)
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
        self.counts = {"frames": 0, "errors": 0, "skipped_offline": 0, "unlock": 0, "deny": 0}
        self.store_error: str | None = None
        link.add_on_connect(self._health_due.set)

    # --- wiring ------------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def request_reload(self, *_: Any) -> None:
        self._reload.set()

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        """Process frames until stopped or the video ends; 0 on a clean stop."""
        watchdog = watchdog_interval_s()
        ping_every = min(1.0, watchdog / 2) if watchdog else None
        last_ping = last_health = 0.0
        self.notifier.ready(f"watching {describe(self.camera.source)}; {len(self.gallery.identities)} enrolled")
        log.info("facedoor running", extra={"fields": {
            "event": "ready", "door": self.cfg.door_id, "source": describe(self.camera.source),
            "enrolled": len(self.gallery.identities), "threshold": self.threshold}})
        while not self._stop.is_set():
            frame = self.camera.get(timeout=0.2)
            if self._reload.is_set():
                self._reload.clear()
                self.reload_gallery()
            self._track_camera_state()
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
        return 0

    def process(self, frame: Frame) -> None:
        """The per-frame path: faces -> largest -> identify -> policy -> publish -> log."""
        self.counts["frames"] += 1
        if self._last_frame_t is not None and frame.t_mono - self._last_frame_t > self.cfg.camera.stall_timeout_s:
            self.policy.reset()  # evidence never spans a camera outage
        self._last_frame_t = frame.t_mono
        if not self.link.connected:
            self.counts["skipped_offline"] += 1
            self.policy.reset()  # decide nothing that cannot be delivered now
            return
        face = None
        try:
            faces = self.pipeline.analyze(frame.image)
            face = max(faces, key=lambda f: f.area) if faces else None
            match = self.identify(face.embedding) if face is not None else None
            decision = self.policy.observe(Observation(
                t=frame.t_mono,
                faces=len(faces),
                identity=match.identity if match is not None and match.matched else None,
                distance=match.distance if match is not None else None,
                threshold=self.threshold,
            ))
        except Exception:
            self.counts["errors"] += 1
            self.policy.reset()
            log.exception("frame %d: recognition failed; nothing decided", frame.seq,
                          extra={"fields": {"event": "frame_error"}})
            return
        self._processed.append(time.monotonic())
        if decision is not None:
            self.publish_decision(decision, frame, face)

    def identify(self, embedding: Any) -> Match:
        """The nearest enrolled identity; while the store is unusable, nobody."""
        if self.gallery is None:
            return Match(None, float("inf"), self.threshold)
        return self.gallery.identify(embedding)

    def publish_decision(self, decision: Decision, frame: Frame, face: "Face | None") -> bool:
        """Publish DECISION (unless late or offline), log it, tell the integrations; True if delivered."""
        latency_ms = (time.monotonic() - frame.t_mono) * 1000
        ttl = self.cfg.decision_ttl_s
        payload = {
            "id": str(uuid.uuid4()),
            "door": self.cfg.door_id,
            "decision": decision.decision,
            "reason": decision.reason,
            "identity": decision.identity,
            "distance": _finite(decision.distance),
            "threshold": decision.threshold,
            "frames": decision.frames,
            "window": decision.window,
            "faces": decision.faces,
            "ts": _iso(frame.t_wall),
            "ts_ms": int(frame.t_wall * 1000),
            "ttl_s": ttl,
            "latency_ms": round(latency_ms, 1),
        }
        delivered = self.link.publish_decision(payload, frame.t_mono, ttl)
        if delivered:
            self.counts[decision.decision] += 1
            self._latencies_ms.append(latency_ms)
        else:
            self.policy.retract(decision)
        log.info("decision %s %s", decision.decision, decision.identity or decision.reason, extra={"fields": {
            "event": "decision", "id": payload["id"], "decision": decision.decision, "reason": decision.reason,
            "identity": decision.identity, "distance": payload["distance"], "threshold": decision.threshold,
            "frames": f"{decision.frames}/{decision.window}", "faces": decision.faces,
            "latency_ms": payload["latency_ms"], "delivered": delivered}})
        if self.integrations is not None:
            crop = _crop(frame, face) if self.cfg.audit.save_crops else None
            try:
                self.integrations.on_decision(payload, delivered, crop)
            except Exception:
                log.exception("integrations failed for decision %s", payload["id"])
        return delivered

    # --- housekeeping ------------------------------------------------------------------------
    def reload_gallery(self) -> None:
        """SIGHUP: re-read the store; on failure nobody matches (fail closed) until a reload works."""
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
        self.policy.reset()
        self._health_due.set()

    def _track_camera_state(self) -> None:
        state = self.camera.state
        if state != self._camera_state:
            log.log(logging.WARNING if state == CameraState.DOWN else logging.INFO,
                    "camera %s: %s -> %s", describe(self.camera.source), self._camera_state.value, state.value,
                    extra={"fields": {"event": "camera_state", "state": state.value}})
            if state != CameraState.UP:
                self.policy.reset()
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
            "ts": _iso(time.time()),
            "ts_ms": int(time.time() * 1000),
            "uptime_s": round(now - self._started, 1),
            "camera": self.camera.state.value,
            "fps": round(len(self._processed) / span, 2) if span > 0 else 0.0,
            "last_frame_age_s": _finite(self.camera.last_frame_age(), 3),
            "camera_reopens": self.camera.reopens,
            "camera_failures": self.camera.failures,
            "broker_reconnects": self.link.reconnects,
            "last_broker_outage_s": _finite(self.link.last_outage_s, 1),
            "dropped_decisions": self.link.dropped_decisions,
            "purged_messages": self.link.purged,
            "enrolled": len(self.gallery.identities) if self.gallery is not None else 0,
            "store_error": self.store_error,
            "latency_ms_median": _finite(lat[len(lat) // 2], 1) if lat else None,
            **{k: v for k, v in self.counts.items()},
        }

    def publish_health(self) -> None:
        report = self.health()
        self.link.publish(self.link.health_topic, json.dumps(report), qos=0, retain=False,
                          expiry_s=max(1.0, 3 * self.cfg.mqtt.health_interval_s))
        self.notifier.status(f"camera {report['camera']}, {report['fps']} fps, "
                             f"broker {'up' if self.link.connected else 'down'}, {report['unlock']} unlocks")

    def close(self) -> None:
        """Stop cleanly: STOPPING=1, extensions, camera, then retained offline and disconnect."""
        self.notifier.stopping()
        if self.integrations is not None:
            try:
                self.integrations.close()
            except Exception:
                log.exception("integrations shutdown failed")
        self.camera.stop()
        self.link.stop()
        log.info("facedoor stopped", extra={"fields": {"event": "stopped", **self.counts}})


def _crop(frame: Frame, face: "Face | None") -> Any:
    """The face box cut from the frame (a copy), for the audit log."""
    if face is None:
        return None
    h, w = frame.image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in face.box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    return frame.image[y1:y2, x1:x2].copy() if x2 > x1 and y2 > y1 else None


def run_daemon(cfg: FacedoorConfig, source: int | str | None = None, loop: bool | None = None) -> int:
    """Start everything in fail-closed order, run until SIGTERM/SIGINT or the video's end.

    Raises ConfigError/ModelError/StoreError/CameraError before READY (the CLI exits 2).
    """
    from .integrations import Integrations
    from .pipeline import FacePipeline
    from .store import EmbeddingStore

    setup_logging(cfg.logging.level, cfg.logging.format)
    notifier = Notifier()
    notifier.status("loading models")
    pipeline = FacePipeline.from_config(cfg)

    def load_gallery() -> Gallery:
        with EmbeddingStore(cfg.store, pipeline.encoder_sha256, create=False, readonly=True) as store:
            return store.gallery(cfg.recognition.threshold)

    camera = Camera(cfg.camera, source, loop)
    link = MqttLink(cfg, cfg.mqtt.password())
    service = DoorService(cfg, pipeline, load_gallery, camera, link, notifier, Integrations(cfg, link))
    if not service.gallery.identities:
        log.warning("nobody is enrolled in %s: every face will be denied (enrol with `facedoor enroll`)",
                    cfg.store, extra={"fields": {"event": "empty_store"}})
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
    signal.signal(signal.SIGHUP, service.request_reload)
    camera.start()
    link.start()
    try:
        return service.run()
    finally:
        service.close()


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor run`."""
    parser = commands.add_parser(
        "run", help="run the door service: camera -> recognition -> MQTT decisions (systemd-ready)",
        description="Watch the camera, decide, publish unlock/deny decisions over MQTT. "
                    "SIGHUP reloads the store; SIGTERM/SIGINT stop cleanly.",
    )
    parser.add_argument("--source", default=None,
                        help="camera source overriding camera.source: V4L2 index or /dev/videoN, "
                             "rtsp:// or http:// URL, or a video file")
    parser.add_argument("--loop", action="store_true", default=None,
                        help="restart a video file at its end instead of stopping")
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace, ctx: Any) -> int:
    from .cli import CliError

    try:
        return run_daemon(ctx.config, source=args.source, loop=args.loop)
    except CameraError as exc:
        raise CliError(str(exc)) from None
