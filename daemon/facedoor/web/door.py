"""The Door status page's data: what the door reports on its health topic, and what the console
can see for itself (store, models, liveness setting, disk).

The console subscribes to `<prefix>/<door>/health` and `.../status` with a client id of its own
(never the door's, which would push the door off the broker), with the door's credentials and
TLS. Broker states: `up` (the console is connected and the door reports), `down` (the console
cannot reach the broker), and the door's own view (`stalled`, ...) from its last report; a door
that has not reported for three health intervals is shown as not reporting.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facedoor import __version__
from facedoor.config import FacedoorConfig

log = logging.getLogger(__name__)

DISK_CACHE_S = 30.0


@dataclass
class Usage:
    """Bytes the door's data takes on disk, and the file system's room."""

    audit_bytes: int
    crop_bytes: int
    crops: int
    store_bytes: int
    free_bytes: int
    total_bytes: int


class DoorWatch:
    """Listens to the door's health and status topics in the background (paho's own thread)."""

    def __init__(self, cfg: FacedoorConfig):
        self.cfg = cfg
        self.health: dict[str, Any] | None = None
        self.health_at: float | None = None   # monotonic receipt time
        self.online: str | None = None        # the door's retained status: online | offline
        self.connected = False
        self.error: str | None = None
        self._client: Any = None

    def start(self) -> None:
        """Connect in the background (reconnecting on its own); the console never waits for it."""
        from facedoor.mqtt import create_client

        try:
            client = create_client(self.cfg, f"facedoor-{self.cfg.door_id}-web-{os.getpid()}")
        except Exception as exc:  # a missing password file, a bad CA: shown, the console still serves
            self.error = f"cannot set up the MQTT client: {exc}"
            return
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 10)
        m = self.cfg.mqtt
        try:
            client.connect_async(m.host, m.port, keepalive=m.keepalive_s)
            client.loop_start()
        except Exception as exc:
            self.error = f"MQTT: {exc}"
            return
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self.error = f"broker refused the console: {reason}"
            return
        self.connected, self.error = True, None
        client.subscribe([(self.cfg.topic("health"), 0), (self.cfg.topic("status"), 0)])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connected = False

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            if message.topic.endswith("/status"):
                self.online = message.payload.decode("utf-8", "replace")[:32]
            else:
                report = json.loads(message.payload)
                if isinstance(report, dict):
                    self.health, self.health_at = report, time.monotonic()
        except ValueError:
            log.warning("door health: not JSON on %s", message.topic)

    def broker_state(self) -> str:
        """up | down | stalled | ... as seen from here and reported by the door."""
        if not self.connected:
            return "down"
        if self.health is not None and self.reporting():
            return str(self.health.get("broker", "up"))
        return "up"

    def reporting(self) -> bool:
        return self.health_at is not None and \
            time.monotonic() - self.health_at <= 3 * self.cfg.mqtt.health_interval_s + 1


class DiskUsage:
    """The door's data on disk, measured at most every DISK_CACHE_S (a walk of the crops directory)."""

    def __init__(self, cfg: FacedoorConfig, audit_file: Path):
        self.cfg = cfg
        self.audit_file = audit_file
        self._cached: tuple[float, Usage] | None = None
        self._lock = threading.Lock()

    def forget(self) -> None:
        self._cached = None

    def usage(self) -> Usage:
        from facedoor.audit import CROPS_DIR, log_files

        with self._lock:
            if self._cached and time.monotonic() - self._cached[0] < DISK_CACHE_S:
                return self._cached[1]
            crops = crop_bytes = 0
            for root, _, files in os.walk(self.audit_file.parent / CROPS_DIR):
                for name in files:
                    try:
                        crop_bytes += os.stat(os.path.join(root, name)).st_size
                        crops += 1
                    except OSError:
                        continue
            audit = sum(_size(f) for f in log_files(self.audit_file))
            store = sum(_size(Path(f"{self.cfg.store}{s}")) for s in ("", "-wal", "-shm"))
            try:
                disk = shutil.disk_usage(self.audit_file.parent if self.audit_file.parent.exists()
                                         else self.cfg.state_dir)
                free, total = disk.free, disk.total
            except OSError:
                free = total = 0
            usage = Usage(audit, crop_bytes, crops, store, free, total)
            self._cached = (time.monotonic(), usage)
            return usage


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def models_info(cfg: FacedoorConfig) -> dict[str, Any]:
    """The encoder and detector of the manifest (name, SHA-256 prefix) and whether the liveness gate
    is on as configured (the door's health report, when it comes, says what it runs)."""
    from facedoor.liveness import REQUIRED_MODELS
    from facedoor.models import Manifest, ModelError

    try:
        manifest = Manifest.load(cfg.models)
    except ModelError as exc:
        return {"error": str(exc), "liveness": "off (no models)"}
    encoder = manifest.entries.get(manifest.encoder_name(cfg.recognition.encoder))
    detector = manifest.entries.get("mtcnn_pnet" if cfg.recognition.detector == "mtcnn" else "yunet")
    have_gate = all(name in manifest.entries for name in REQUIRED_MODELS)
    if cfg.liveness.enabled is False:
        liveness = "off (liveness.enabled: false)"
    elif have_gate:
        liveness = "on"
    else:
        liveness = "off (its models are not exported)" if cfg.liveness.required is None else \
            f"required ({cfg.liveness.required}) but its models are not exported: the door refuses to start"
    return {
        "encoder": f"{cfg.recognition.encoder} {encoder.sha256[:12]}" if encoder else "missing",
        "detector": f"{cfg.recognition.detector} {detector.sha256[:12]}" if detector else cfg.recognition.detector,
        "liveness": liveness,
        "facedoor": __version__,
    }


def store_info(path: Path) -> dict[str, Any]:
    """Schema version, people, embeddings and cohort size of the store, read without the encoder."""
    if not path.is_file():
        return {"error": f"no store at {path}"}
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            people = db.execute("SELECT count(*) FROM identities").fetchone()[0]
            embeddings = db.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            cohort = db.execute("SELECT count(*) FROM cohort").fetchone()[0] if version >= 3 else 0
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {"error": f"{path}: {exc}"}
    changed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    return {"schema": version, "people": people, "embeddings": embeddings, "cohort": cohort, "changed": changed}
