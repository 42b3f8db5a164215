"""Camera capture on its own thread, handing over only the newest frame.

OpenCV `VideoCapture` reads a V4L2 device (index or path), an RTSP/HTTP stream or a video file.
The capture thread overwrites a one-frame slot, so a slow recognition step never builds a
backlog: the frame loop always sees the latest picture with the time it was captured. A source
that fails or stalls (no frame for `stall_timeout_s`) is reported as down and reopened with
capped exponential backoff; a video file ends the stream at its end unless `loop` is set, and is
paced at its own frame rate when `realtime` is set, as a live camera would deliver it.
"""
from __future__ import annotations

import enum
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facedoor.config import CameraConfig

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class CameraError(RuntimeError):
    """The camera source cannot be used at all (e.g. a video file that does not exist)."""


class CameraState(str, enum.Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"          # open failed, read failed or stalled; reopening with backoff
    ENDED = "ended"        # a video file reached its end (no loop)
    STOPPED = "stopped"


@dataclass(frozen=True)
class Frame:
    """One captured picture: BGR pixels, sequence number and capture times."""

    image: np.ndarray
    seq: int
    t_mono: float          # time.monotonic() at capture
    t_wall: float          # time.time() at capture


def parse_source(source: int | str) -> int | str:
    """A V4L2 index stays an int ("0" too); paths and URLs stay strings."""
    if isinstance(source, str) and source.strip().isdigit():
        return int(source.strip())
    return source


def is_video_file(source: int | str) -> bool:
    """True for a regular file path (not a device node, not a URL)."""
    if isinstance(source, int) or _URL.match(source):
        return False
    return not source.startswith("/dev/")


_SECRET_WORDS = r"(?:pass|pwd|token|key|secret|auth|sig|cred|session)"
_SECRET_PARAM = re.compile(rf"([?&;][^=&;#]*{_SECRET_WORDS}[^=&;#]*=)[^&;#]*", re.IGNORECASE)
# Path-style credentials (XMEye/DVR: rtsp://host/user=admin_password=secret_channel=1_stream=0.sdp):
# nothing marks the value's end (a password may hold '_' or '/'), so the rest of the path is masked.
_SECRET_PATH = re.compile(rf"([/_][^=/_?#]*{_SECRET_WORDS}[^=/_?#]*=)[^?#]*", re.IGNORECASE)


def describe(source: int | str) -> str:
    """The source for logs with every credential masked: user:password@, token@, ?password=, &token=,
    and path-style /user=admin_password=... (the rest of the path)."""
    text = str(source)
    scheme = _URL.match(text)
    if not scheme:
        return text
    rest = text[scheme.end():]
    at = rest.rfind("@")  # the last @ anywhere: a password may hold '/', '?' or '@'; better too much hidden
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        masked = f"{user}:***" if colon and user and not any(ch in user for ch in "/?#") else "***"
        rest = masked + rest[at:]
    path, query, fragment = re.match(r"([^?#]*)([^#]*)(.*)", rest, re.DOTALL).groups()  # type: ignore[union-attr]
    return scheme.group(0) + _SECRET_PATH.sub(r"\1***", path) + _SECRET_PARAM.sub(r"\1***", query + fragment)


class Camera:
    """Threaded capture with newest-frame hand-over, stall detection and reopen with backoff."""

    def __init__(self, cfg: CameraConfig, source: int | str | None = None, loop: bool | None = None):
        self.cfg = cfg
        self.source = parse_source(cfg.source if source is None else source)
        self.loop = cfg.loop if loop is None else loop
        self.is_file = is_video_file(self.source)
        if self.is_file and not Path(str(self.source)).is_file():
            raise CameraError(f"camera.source: video file {self.source} does not exist")
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._handed = 0
        self._seq = 0
        self._state = CameraState.STARTING
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_frame_mono: float | None = None
        self.heartbeat = time.monotonic()  # last time the capture thread made progress
        self.reopens = 0
        self.failures = 0

    # --- consumer side -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)
        self._thread.start()

    def get(self, timeout: float) -> Frame | None:
        """The newest frame not handed over yet, waiting up to TIMEOUT; None if none came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.seq == self._handed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._state in (CameraState.ENDED, CameraState.STOPPED):
                    return None
                self._cond.wait(remaining)
            self._handed = self._latest.seq
            return self._latest

    @property
    def state(self) -> CameraState:
        """UP only while frames keep coming; a stall longer than stall_timeout_s reads DOWN."""
        if self._state == CameraState.UP and self.last_frame_age() > self.cfg.stall_timeout_s:
            return CameraState.DOWN
        return self._state

    @property
    def ended(self) -> bool:
        return self._state in (CameraState.ENDED, CameraState.STOPPED)

    def last_frame_age(self) -> float:
        """Seconds since the last captured frame (inf before the first)."""
        if self._last_frame_mono is None:
            return float("inf")
        return time.monotonic() - self._last_frame_mono

    def alive(self, grace_s: float) -> bool:
        """False when the capture thread died or is stuck in a call for longer than GRACE_S."""
        if self._thread is None or not self._thread.is_alive():
            return self.ended
        return time.monotonic() - self.heartbeat <= grace_s

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._set_state(CameraState.STOPPED)

    # --- capture thread ----------------------------------------------------------------------
    def _set_state(self, state: CameraState) -> None:
        with self._cond:
            self._state = state
            self._cond.notify_all()

    def _open(self) -> cv2.VideoCapture | None:
        timeout_ms = int(self.cfg.stall_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        cap = cv2.VideoCapture(self.source, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            return None
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.cfg.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.cfg.height),
                            (cv2.CAP_PROP_FPS, self.cfg.fps)):
            if value and not self.is_file:
                cap.set(prop, value)
        if not self.is_file:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: keep the driver queue short, newest wins
        return cap

    def _run(self) -> None:
        backoff = self.cfg.reopen_backoff_initial_s
        first = True
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            cap = self._open()
            if cap is None:
                self.failures += 1
                log.warning("camera %s cannot be opened; retrying in %.1fs", describe(self.source), backoff,
                            extra={"fields": {"event": "camera_open_failed", "backoff_s": backoff}})
                self._set_state(CameraState.DOWN)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.cfg.reopen_backoff_max_s)
                continue
            if not first:
                self.reopens += 1
            first = False
            log.info("camera %s opened (%s)", describe(self.source), cap.getBackendName(),
                     extra={"fields": {"event": "camera_up", "reopens": self.reopens}})
            self._set_state(CameraState.UP)
            backoff = self.cfg.reopen_backoff_initial_s
            outcome = self._read_until_failure(cap)
            cap.release()
            if outcome == "ended":
                log.info("camera %s: end of video file", describe(self.source),
                         extra={"fields": {"event": "camera_ended"}})
                self._set_state(CameraState.ENDED)
                return
            if outcome == "failed":
                self.failures += 1
                log.warning("camera %s stopped delivering frames; reopening", describe(self.source),
                            extra={"fields": {"event": "camera_down"}})
                self._set_state(CameraState.DOWN)
                if self._stop.wait(backoff):
                    break
        self._set_state(CameraState.STOPPED)

    def _read_until_failure(self, cap: cv2.VideoCapture) -> str:
        """Read frames into the slot until stop ("stopped"), file end ("ended") or failure."""
        fps = cap.get(cv2.CAP_PROP_FPS) if self.is_file else 0.0
        period = 1.0 / fps if self.is_file and self.cfg.realtime and 0 < fps < 1000 else 0.0
        next_due = time.monotonic()
        while not self._stop.is_set():
            if period:
                delay = next_due - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return "stopped"
                next_due = max(next_due + period, time.monotonic() - period)
            ok, image = cap.read()
            now_mono, now_wall = time.monotonic(), time.time()
            self.heartbeat = now_mono
            if not ok or image is None:
                if self.is_file and self.loop and cap.set(cv2.CAP_PROP_POS_FRAMES, 0) and self._seq > 0:
                    continue
                return "ended" if self.is_file else "failed"
            if self._last_frame_mono is not None and now_mono - self._last_frame_mono > self.cfg.stall_timeout_s:
                log.warning("camera %s stalled for %.1fs", describe(self.source), now_mono - self._last_frame_mono,
                            extra={"fields": {"event": "camera_stall"}})
            with self._cond:
                self._seq += 1
                self._latest = Frame(image, self._seq, now_mono, now_wall)
                self._last_frame_mono = now_mono
                self._state = CameraState.UP
                self._cond.notify_all()
        return "stopped"
