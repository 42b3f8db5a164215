"""What an admin changes from the console: enrol by upload, remove, "this is X", "this was not X",
crop retention.

The face models stay out of the console's process (ONNX Runtime and FaceNet would take it far
above its memory budget for an action taken a few times a month): an enrolment runs the command
line's `enroll --json` in the enrolment worker (facedoor.web.worker, a child process started
when an admin opens a page that can enrol), so the photos pass exactly the gates of `facedoor
enroll` (one sharp face of enrolment size each), each rejected photo comes back with its
reason, and nothing is stored unless every photo passes. "This was not X" needs no model: the audit entry
keeps the face's embedding (with `audit.save_crops`), which joins the look-alike cohort.
Every change is one store transaction; the running door's StoreWatcher reloads within a second.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facedoor.audit import CROPS_DIR, append_event, decode_embedding
from facedoor.config import FacedoorConfig
from facedoor.images import FORMATS, MAX_PIXELS, ImageError, image_size
from facedoor.store import EmbeddingStore, StoreError, validate_name
from facedoor.web.visits import Visit
from facedoor.web.worker import EnrolWorker, WorkerError, config_argv

MAX_PHOTOS = 20            # photos per upload


class ActionError(ValueError):
    """An action that cannot be done; the message says why (nothing was changed)."""


@dataclass(frozen=True)
class Upload:
    """One photo to enrol: the name the browser gave (shown only, never used as a path) and the
    private file it was saved to."""

    name: str
    path: Path


@dataclass
class EnrolResult:
    """The outcome of an enrolment: enrolled, or each photo's reason for being rejected."""

    ok: bool
    message: str
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


HEADER_BYTES = 2 << 20  # read this much of an upload to check its format and size before the models see it


def check_upload(path: Path, max_bytes: int) -> str | None:
    """Why the file at PATH cannot be a photo (empty, too large, not an image format, too many
    pixels by its header), None when it may be one; a header this cannot parse is left to the
    enrolment's own reader, which says what is wrong with it."""
    size = path.stat().st_size
    if not size:
        return "empty file"
    if size > max_bytes:
        return f"larger than {max_bytes // (1024 * 1024)} MB"
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    try:
        dims = image_size(head)
    except ImageError:
        return None
    if dims is None:
        return f"not a readable image (expected {FORMATS})"
    width, height = dims
    if width <= 0 or height <= 0:
        return f"not a readable image (header says {width}x{height} pixels)"
    if width * height > MAX_PIXELS:
        return f"{width}x{height} pixels is above the limit of {MAX_PIXELS / 1e6:.0f} MP (scale the photo down)"
    return None


class Actions:
    """The console's changes to the door's data, for one configuration."""

    def __init__(self, cfg: FacedoorConfig, config_path: Path | None, audit_file: Path, encoder_sha256: str):
        self.cfg = cfg
        self.config_path = config_path
        self.audit_file = audit_file
        self.encoder_sha256 = encoder_sha256
        self.worker = EnrolWorker(config_argv(config_path, cfg.models, cfg.store))

    def audit(self, entry: dict[str, Any]) -> None:
        """Write a console event to the audit log; a failure is raised (an unrecorded label is refused)."""
        append_event(self.audit_file, {"door": self.cfg.door_id, **entry})

    # -- enrolment ------------------------------------------------------------------------------
    def enrol(self, name: str, uploads: list[Upload], user: str, *, source: str = "upload",
              visit: str | None = None) -> EnrolResult:
        """Enrol NAME from UPLOADS through `facedoor enroll` (all pass, or nothing is stored)."""
        try:
            validate_name(name)
        except StoreError as exc:
            raise ActionError(str(exc)) from None
        if not uploads:
            raise ActionError("no photo given")
        if len(uploads) > MAX_PHOTOS:
            raise ActionError(f"{len(uploads)} photos: at most {MAX_PHOTOS} at a time")
        started = time.monotonic()
        limit = self.cfg.web.max_upload_mb * 1024 * 1024
        rejected = [(u.name, why) for u in uploads if (why := check_upload(u.path, limit)) is not None]
        if rejected:
            return EnrolResult(False, f"{len(rejected)} of {len(uploads)} photo(s) rejected, nothing enrolled "
                               f"for {name!r}", rejected, time.monotonic() - started)
        proc = self._enroll_child(name, [u.path for u in uploads])
        names = {str(u.path): u.name for u in uploads}
        records = _json_lines(proc.stdout)
        rejected = [(names.get(r.get("image", ""), "?"), str(r.get("reason"))) for r in records
                    if r.get("status") == "rejected"]
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            error = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
            if rejected:
                error = f"{len(rejected)} of {len(uploads)} photo(s) rejected, nothing enrolled for {name!r}"
            for path, original in names.items():
                error = error.replace(path, original)
            return EnrolResult(False, error.removeprefix("facedoor enroll: error: "), rejected, seconds)
        summary = next((r for r in records if "enrolled" in r), {})
        self.audit({"event": "web_enrol", "identity": name, "photos": len(uploads), "source": source,
                    "visit": visit, "user": user})
        return EnrolResult(True, f"enrolled {name}: {summary.get('enrolled', len(uploads))} photo(s), "
                           f"{summary.get('new', '?')} new embedding(s)", [], seconds)

    def _enroll_child(self, name: str, paths: list[Path]) -> subprocess.CompletedProcess[str]:
        try:
            return self.worker.run(["enroll", name, *map(str, paths)])
        except WorkerError as exc:
            raise ActionError(f"{exc}; nothing was stored") from None

    def this_is(self, visit: Visit, name: str, crop: Path | None, user: str) -> EnrolResult:
        """Enrol a visit denied as unknown for NAME: its face crop (the enrolment gates apply), then
        the visit's fused embedding, which is the door's own view of that face over the visit's
        frames (one re-detected crop alone can sit near the threshold from the next walk-up)."""
        if visit["decision"] != "deny" or visit["reason"] != "unknown":
            raise ActionError("only a visit denied as unknown can be enrolled as someone")
        if crop is None:
            raise ActionError("this visit has no face crop (turn on audit.save_crops, or the crop was removed)")
        result = self.enrol(name, [Upload(crop.name, crop)], user, source="visit", visit=visit["id"])
        text = visit["embedding"]
        if not result.ok or not isinstance(text, str):
            return result
        try:
            vector = decode_embedding(text)
            with EmbeddingStore(self.cfg.store, self.encoder_sha256, create=False) as store:
                new = store.enroll(name, vector[None, :], [hashlib.sha256(vector.tobytes()).hexdigest()])
                self._publish(store, [name])
        except (ValueError, StoreError) as exc:
            return EnrolResult(False, f"{result.message}; the visit's fused embedding was NOT added ({exc})",
                               [], result.seconds)
        return EnrolResult(True, f"{result.message} + the visit's fused view ({new} new)", [], result.seconds)

    # -- negative feedback ----------------------------------------------------------------------
    def was_not(self, visit: Visit, user: str) -> int:
        """"This was not X": the visit's face joins the look-alike cohort, so that face is denied
        next time; recorded in the audit log. Returns the cohort's size."""
        identity = visit["identity"]
        if not identity or visit["decision"] not in ("unlock", "deny") or visit["reason"] == "unknown":
            raise ActionError("only a visit that unlocked or was taken for someone can be marked as not them")
        text = visit["embedding"]
        if not isinstance(text, str):
            raise ActionError("this visit has no recorded face embedding (audit.save_crops was off, or the "
                              "entry predates it); nothing changed")
        try:
            vector = decode_embedding(text)
        except ValueError as exc:
            raise ActionError(f"the visit's recorded embedding is unreadable ({exc}); nothing changed") from None
        label = f"not {identity} (visit {visit['id']})"
        try:
            with EmbeddingStore(self.cfg.store, self.encoder_sha256, create=False) as store:
                size = store.add_cohort(label, vector)
                self.audit({"event": "web_not_x", "identity": identity, "visit": visit["id"], "cohort": size,
                            "user": user})
                self._publish(store, [], cohort=True)
        except StoreError as exc:
            raise ActionError(str(exc)) from None
        return size

    def remove(self, name: str, user: str) -> int:
        try:
            with EmbeddingStore(self.cfg.store, self.encoder_sha256, create=False) as store:
                removed = store.remove(name)
                self.audit({"event": "web_remove", "identity": name, "embeddings": removed, "user": user})
                self._publish(store, [name])
        except StoreError as exc:
            raise ActionError(str(exc)) from None
        return removed

    def _publish(self, store: EmbeddingStore, names: list[str], *, cohort: bool = False) -> None:
        """With a site roster (`fleet:`), publish the change to the other doors, as the command line
        does; a broker that does not take it is said, with what to run (the store has the change)."""
        if self.cfg.fleet is None:
            return
        from facedoor.config import ConfigError
        from facedoor.fleet import FleetError, publish_changes

        try:
            publish_changes(self.cfg, store, names, cohort=cohort)
        except (FleetError, ConfigError) as exc:
            raise ActionError(f"stored at this door, but NOT published to site {self.cfg.fleet.site}: {exc}; "
                              "the other doors do not know yet: run `facedoor fleet publish` when the broker "
                              "is back") from None

    # -- retention ------------------------------------------------------------------------------
    def prune_crops(self, days: float, now: float | None = None) -> int:
        """Remove audit face crops older than DAYS (by file time); return how many went."""
        cutoff = (time.time() if now is None else now) - days * 86400.0
        root = self.audit_file.parent / CROPS_DIR
        removed = 0
        if not root.is_dir():
            return 0
        for day in sorted(root.iterdir()):
            if not day.is_dir() or day.is_symlink():
                continue
            for crop in day.iterdir():
                try:
                    if crop.is_file() and not crop.is_symlink() and crop.stat().st_mtime < cutoff:
                        crop.unlink()
                        removed += 1
                except OSError:
                    continue
            if not any(day.iterdir()):
                shutil.rmtree(day, ignore_errors=True)
        return removed


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out
