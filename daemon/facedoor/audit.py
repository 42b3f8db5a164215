"""Append-only local audit log of door decisions (JSON lines in the state directory).

Each decision becomes one line: time, door, decision, identity, distance, frames, latency and,
optionally, the path of a JPEG face crop. The frame loop only puts a record on a bounded queue;
a background thread writes it, so a slow or full disk never delays a decision, and a write
error (ENOSPC, EROFS, ...) is logged and the record dropped, never raised into the caller.
Files are created 0600 and directories 0700 whatever the umask: they hold identities and faces.

With `audit.required: true` the log is a precondition of every unlock, in this order: (1) the
unlock decision is written synchronously as an `"audit_stage": "intent"` entry (appended with one
write(2), not fsync'd); (2) only if that write succeeded is the decision published, and the relay
driven behind it; (3) the usual entry with the outcome (delivered, refused, unlock_action...)
follows through the queue. An unlock whose intent cannot be written is never sent (`delivery:
unaudited`), `state` (and the health report's `audit`) is `failing` until a write works again,
and the door refuses to start when the log cannot be written at all (AuditError, exit 2).
Denies are never held back by the audit.

The log is bounded twice: by size (the live file rotates into `audit.jsonl.1 .. .N`; all of
them together stay under `max_bytes`) and by age (rotated files, lines and crops older than
`max_age_days` are removed on start and then hourly).

`facedoor audit [--since 2h|ISO] [--json]` (facedoor.cli.audit) prints it, oldest first.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from facedoor.config import AuditConfig, ConfigError, FacedoorConfig
from facedoor.events import DecisionEvent
from facedoor.files import check_writable, open_private, private_dir
from facedoor.formatting import iso_utc, table

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
CROPS_DIR = "audit-crops"
BACKUPS = 3                   # rotated files kept beside the live one
QUEUE_SIZE = 1024             # records waiting for the writer; beyond this they are dropped
PRUNE_INTERVAL_S = 3600.0     # age pruning: on start, then at most this often
_STOP = object()


class AuditError(ConfigError):
    """`audit.required` and the audit log cannot be written: the door does not start (exit 2)."""


def audit_path(config: FacedoorConfig) -> Path:
    """The live audit file: `audit.path`, else `<state_dir>/audit.jsonl`."""
    return config.audit.path or config.state_dir / AUDIT_FILE


def _entry_time(entry: Mapping[str, Any]) -> float | None:
    """Epoch seconds of an entry (from `ts_ms`, else the ISO `ts`), None when unreadable."""
    if isinstance(entry.get("ts_ms"), (int, float)):
        return float(entry["ts_ms"]) / 1000.0
    try:
        return parse_time(str(entry["ts"])).timestamp()
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class AuditLimits:
    """Size and age bounds of the log (the config's `audit` section, in plain units)."""

    max_bytes: int
    max_age_s: float
    save_crops: bool

    @classmethod
    def from_config(cls, cfg: AuditConfig) -> AuditLimits:
        return cls(max_bytes=cfg.max_bytes, max_age_s=cfg.max_age_days * 86400.0, save_crops=cfg.save_crops)

    @property
    def file_bytes(self) -> int:
        """Rotation point of one file, so live + BACKUPS files stay within max_bytes."""
        return max(1, self.max_bytes // (BACKUPS + 1))


class AuditLog:
    """Non-blocking writer: `record()` queues, a daemon thread appends, rotates and prunes."""

    def __init__(self, path: Path, limits: AuditLimits, door_id: str = "front", required: bool = False):
        self.path = Path(path)
        self.limits = limits
        self.door_id = door_id
        self.required = required
        if required:
            self.check_writable()
        self._write_lock = threading.Lock()  # the writer thread and write_ahead() append to one file
        self.crops_dir = self.path.parent / CROPS_DIR
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_SIZE)
        self._failing = False
        self._next_prune = 0.0
        self._thread = threading.Thread(target=self._run, name="facedoor-audit", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: FacedoorConfig) -> AuditLog | None:
        """The configured audit log, or None when `audit.enabled` is false."""
        if not config.audit.enabled:
            return None
        return cls(audit_path(config), AuditLimits.from_config(config.audit), config.door_id, config.audit.required)

    @property
    def state(self) -> str:
        """`ok`, or `failing` from a write error until a write works again."""
        return "failing" if self._failing else "ok"

    def check_writable(self) -> None:
        """Raise AuditError unless the audit directory and file can be written (audit.required)."""
        try:
            private_dir(self.path.parent)
            check_writable(self.path.parent)
            os.close(open_private(self.path, os.O_WRONLY | os.O_APPEND))
        except OSError as exc:
            raise AuditError(f"audit.required: cannot write the audit log {self.path} "
                             f"({exc.strerror or exc}); the door does not start without it") from None

    def write_ahead(self, decision: Mapping[str, Any]) -> bool:
        """Write DECISION now, as an `intent` entry, before it is sent (audit.required): False when
        that failed, and then it must not be sent. Called from the frame loop; one append."""
        entry = {**decision, "audit_stage": "intent"}
        entry.setdefault("door", self.door_id)
        return self._write(entry, [])

    # -- caller side (frame loop): never blocks, never raises ---------------------------------
    def on_decision(self, event: DecisionEvent) -> None:
        """A decision listener: the message, whether it was delivered, the other listeners' notes
        and, with `save_crops`, the face crops cut from the deciding frame (the deciding face, then
        the unknown faces near the door beside it)."""
        entry = {**event.message.payload(), "delivered": bool(event.delivered), **event.notes}
        if self.limits.save_crops:
            self.record(entry, event.crop(), [event.crop(f) for f in event.strangers])
        else:
            self.record(entry)

    def record(self, decision: Mapping[str, Any], crop_bgr: np.ndarray | None = None,
               stranger_crops: Sequence[np.ndarray | None] = ()) -> bool:
        """Queue one decision for writing; False (and counted) when the queue is full.

        DECISION is the decision message (id, decision, identity, distance, threshold, frames,
        ts_ms, latency_ms, faces, delivered...); unknown keys are kept. CROP_BGR is the face
        crop and STRANGER_CROPS those of the unknown faces beside it, stored as JPEG only when
        `save_crops` is on.
        """
        try:
            entry = dict(decision)
            entry.setdefault("door", self.door_id)
            if "ts_ms" not in entry:
                entry["ts_ms"] = int(time.time() * 1000)
            entry.setdefault("ts", iso_utc(entry["ts_ms"] / 1000.0))
            crops = [c.copy() for c in (crop_bgr, *stranger_crops)
                     if self.limits.save_crops and c is not None and c.size] if crop_bgr is not None else []
            self._queue.put_nowait((entry, crops))
            return True
        except queue.Full:
            self.dropped += 1
            log.warning("audit queue full (%d waiting): decision %s not written to %s",
                        QUEUE_SIZE, decision.get("id"), self.path)
            return False
        except Exception:  # an audit problem must never reach the decision path
            self.dropped += 1
            log.exception("audit record for decision %s failed; the door continues", decision.get("id"))
            return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (up to TIMEOUT_S) and stop the writer thread."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("audit writer busy; %d queued records may be lost at shutdown", self._queue.qsize())
            return
        self._thread.join(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued record has been handled (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                self._prune_if_due()
                self._write(*item)
            except Exception:
                log.exception("audit writer error; continuing")
            finally:
                self._queue.task_done()

    def _write(self, entry: dict[str, Any], crops: list[np.ndarray]) -> bool:
        try:
            private_dir(self.path.parent)
            if crops:
                entry["crop"] = self._save_crop(entry, crops[0])
            if crops[1:]:
                entry["stranger_crops"] = [self._save_crop(entry, c, i) for i, c in enumerate(crops[1:], 1)]
            line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
            with self._write_lock:
                self._rotate_if_needed(len(line))
                _append_whole(self.path, line)
            self.written += 1
            if self._failing:
                log.warning("audit log %s writable again", self.path,
                            extra={"fields": {"event": "audit_ok"}})
                self._failing = False
            return True
        except OSError as exc:
            self.dropped += 1
            if not self._failing:  # once per failure streak, not once per frame
                hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
                then = "no unlock is sent (audit.required)" if self.required else "the door keeps deciding"
                log.error("cannot write audit log %s: %s%s; entries are dropped until it works again, %s",
                          self.path, exc.strerror or exc, hint, then, extra={"fields": {"event": "audit_failing"}})
                self._failing = True
            return False

    def _save_crop(self, entry: Mapping[str, Any], crop: np.ndarray, index: int = 0) -> str | None:
        import cv2

        day = datetime.fromtimestamp(entry["ts_ms"] / 1000.0, timezone.utc).strftime("%Y%m%d")
        suffix = f"-stranger{index}" if index else ""
        name = f"{entry['ts_ms']}-{entry.get('id') or 'x'}-{entry.get('decision', 'event')}{suffix}.jpg"
        target = self.crops_dir / day / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        private_dir(target.parent)
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            log.warning("audit: could not encode the face crop of decision %s", entry.get("id"))
            return None
        with os.fdopen(open_private(target, os.O_WRONLY | os.O_TRUNC), "wb") as fh:
            fh.write(jpeg.tobytes())
        return str(target)

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.limits.file_bytes:
            return
        for i in range(BACKUPS, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
        self._prune_crops_by_size()

    def _prune_if_due(self) -> None:
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_INTERVAL_S
        try:
            prune_by_age(self.path, self.limits.max_age_s, now)
            self._prune_crops(now - self.limits.max_age_s)
        except OSError as exc:
            log.warning("audit age pruning of %s failed: %s; retrying in an hour", self.path, exc)

    def _crop_files(self) -> list[Path]:
        if not self.crops_dir.is_dir():
            return []
        return sorted(self.crops_dir.glob("*/*.jpg"))  # names start with epoch ms: oldest first

    def _prune_crops(self, cutoff_s: float) -> None:
        for crop in self._crop_files():
            if crop.stat().st_mtime < cutoff_s:
                crop.unlink(missing_ok=True)
        for day in self.crops_dir.glob("*") if self.crops_dir.is_dir() else ():
            if day.is_dir() and not any(day.iterdir()):
                day.rmdir()

    def _prune_crops_by_size(self) -> None:
        """Crops share the log's size budget: drop the oldest beyond max_bytes."""
        crops = self._crop_files()
        total = sum(c.stat().st_size for c in crops)
        for crop in crops:
            if total <= self.limits.max_bytes:
                break
            total -= crop.stat().st_size
            crop.unlink(missing_ok=True)


def _append_whole(path: Path, line: bytes) -> None:
    """Append LINE to PATH, or nothing: a write cut short (disk full) is undone, so no half line is
    left for the next entry to be glued onto."""
    fd = open_private(path, os.O_WRONLY | os.O_APPEND)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def log_files(path: Path) -> list[Path]:
    """The audit files that exist, oldest first (`.3`, `.2`, `.1`, live)."""
    files = [path.with_name(f"{path.name}.{i}") for i in range(BACKUPS, 0, -1)] + [path]
    return [f for f in files if f.is_file()]


def prune_by_age(path: Path, max_age_s: float, now: float | None = None) -> None:
    """Remove entries older than MAX_AGE_S: whole rotated files, then old lines of each file."""
    cutoff = (time.time() if now is None else now) - max_age_s
    for file in log_files(path):
        if file.stat().st_mtime < cutoff:  # newest line of the file is older than the cutoff
            file.unlink()
            log.info("audit: removed %s (all entries older than %.0f days)", file, max_age_s / 86400)
            continue
        with open(file, "rb") as fh:
            first = _entry_time_of_line(fh.readline())
        if first is None or first >= cutoff:
            continue
        keep_from = 0
        with open(file, "rb") as fh:
            for raw in iter(fh.readline, b""):
                t = _entry_time_of_line(raw)
                if t is not None and t >= cutoff:
                    break
                keep_from = fh.tell()
            fh.seek(keep_from)
            tmp = file.with_name(file.name + ".tmp")
            with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as out:
                shutil.copyfileobj(fh, out)
        os.replace(tmp, file)


def _entry_time_of_line(raw: bytes) -> float | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return _entry_time(entry) if isinstance(entry, dict) else None


def read_entries(path: Path, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Entries of the log and its rotations, oldest first; corrupt lines are skipped and logged."""
    cutoff = since.timestamp() if since is not None else -math.inf
    for file in log_files(path):
        with open(file, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    entry = json.loads(raw)
                    if not isinstance(entry, dict):
                        raise ValueError("not an object")
                except ValueError:
                    log.warning("%s:%d: skipping a corrupt audit line", file, lineno)
                    continue
                t = _entry_time(entry)
                if t is None or t >= cutoff:
                    yield entry


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An aware datetime from ISO 8601 (naive = local time) or a relative age like `2h`, `30m`, `7d`."""
    match = _RELATIVE.match(text)
    if match:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2).lower()])
    stamp = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.astimezone()


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and spec:
        return format(value, spec)
    return str(value)


def _decision_label(entry: Mapping[str, Any]) -> str:
    """`unlock`, `deny`, or `deny/unknown` for a face that matched nobody."""
    decision = _fmt(entry.get("decision"))
    if entry.get("audit_stage") == "intent":
        return f"{decision}/intent"  # written before it was sent (audit.required); its outcome follows
    return f"{decision}/unknown" if entry.get("reason") == "unknown" and decision != "unknown" else decision


def format_table(entries: list[dict[str, Any]]) -> str:
    """Aligned human table, local time, one decision per row."""
    rows = []
    for e in entries:
        t = _entry_time(e)
        when = datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else _fmt(e.get("ts"))
        latency = e.get("latency_ms")
        rows.append((
            when, _fmt(e.get("door")), _decision_label(e), _fmt(e.get("identity")),
            _fmt(e.get("distance"), ".3f"), _fmt(e.get("frames")),
            _fmt(float(latency) if isinstance(latency, (int, float)) else latency, ".0f"),
            _fmt(e.get("crop")),
        ))
    return table(("TIME", "DOOR", "DECISION", "IDENTITY", "DISTANCE", "FRAMES", "LATENCY_MS", "CROP"), rows)
