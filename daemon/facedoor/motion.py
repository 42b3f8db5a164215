"""Idle gating: a cheap change test on a small grey thumbnail, and the idle/active state machine.

Most of a door's day shows an empty scene, so the full detector need not run on every frame.
`MotionDetector` (after Frigate's approach: shrink, grey, compare with a running-average
background, count changed pixels) costs a fraction of a millisecond a frame. Each thumbnail is
normalised to zero mean and unit contrast before the comparison, so a uniform brightness change
(a cloud, a lamp, auto-exposure) is not motion; a change over most of the picture at once is
taken as a light change too (Frigate's "lightning" rule): the background is reset, nothing wakes.

`IdleGate` decides per frame whether the detector runs. Idle: at `detect_fps` only. Active
(motion seen or a face found within `active_hold_s`): every frame. A frame with motion is
detected at once, and a face that arrives without motion is caught by the next low-rate pass,
so the first decision is never later than one detector period. The gate is pure logic: the
caller passes each frame's capture time and reports the faces the detector found.
"""
from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np

State = Literal["idle", "active"]
SCHEDULE_SLACK_S = 0.002  # a frame this close to the next low-rate slot takes it (capture jitter)


class MotionDetector:
    """Changed-area test of each frame against a running-average background of grey thumbnails."""

    def __init__(self, height: int = 48, pixel_threshold: float = 0.6, min_area: float = 0.004,
                 lightning_area: float = 0.6, background_alpha: float = 0.2):
        self.height = int(height)
        self.pixel_threshold = float(pixel_threshold)
        self.min_area = float(min_area)
        self.lightning_area = float(lightning_area)
        self.background_alpha = float(background_alpha)
        self._background: np.ndarray | None = None
        self.changed = 0.0  # fraction of thumbnail pixels that changed in the last frame

    def thumbnail(self, image_bgr: np.ndarray) -> np.ndarray:
        """The frame as a HEIGHT-row grey float32 thumbnail of zero mean and unit standard deviation."""
        h, w = image_bgr.shape[:2]
        width = max(1, round(w * self.height / h))
        # bilinear to twice the size, then 2x2 area: a sixth of the cost of one area resize of
        # the full frame, and still an average of 16 pixels per thumbnail pixel against noise
        half = cv2.resize(image_bgr, (2 * width, 2 * self.height), interpolation=cv2.INTER_LINEAR)
        small = cv2.resize(half, (width, self.height), interpolation=cv2.INTER_AREA)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        grey = cv2.GaussianBlur(grey.astype(np.float32), (3, 3), 0)
        return (grey - grey.mean()) / max(float(grey.std()), 4.0)

    def __call__(self, image_bgr: np.ndarray) -> bool:
        """Whether IMAGE shows motion against the background; the background then moves toward it."""
        thumb = self.thumbnail(image_bgr)
        if self._background is None or self._background.shape != thumb.shape:
            self._background, self.changed = thumb, 0.0
            return False
        diff = np.abs(thumb - self._background)
        self.changed = float(np.count_nonzero(diff > self.pixel_threshold)) / diff.size
        if self.changed >= self.lightning_area:
            self._background = thumb  # the light changed everywhere at once: start again from here
            return False
        cv2.accumulateWeighted(thumb, self._background, self.background_alpha)
        return self.changed >= self.min_area


class IdleGate:
    """Per frame: run the full detector (True) or skip it (False); idle at a low rate, active at full."""

    def __init__(self, detect_fps: float = 3.0, active_hold_s: float = 2.0, motion: MotionDetector | None = None,
                 enabled: bool = True):
        self.period = 1.0 / float(detect_fps)
        self.active_hold_s = float(active_hold_s)
        self.motion = motion if motion is not None else MotionDetector()
        self.enabled = enabled
        self._last_detect: float | None = None
        self._active_until = float("-inf")
        self._now = float("-inf")

    @classmethod
    def from_config(cls, idle: Any) -> IdleGate:
        """The gate the `idle` config section describes."""
        motion = MotionDetector(idle.motion_height, idle.pixel_threshold, idle.min_area, idle.lightning_area,
                                idle.background_alpha)
        return cls(idle.detect_fps, idle.active_hold_s, motion, idle.enabled)

    @property
    def state(self) -> State:
        """"active" while motion or a face was seen within `active_hold_s`, else "idle" (for health)."""
        return "active" if not self.enabled or self._now < self._active_until else "idle"

    def should_detect(self, image_bgr: np.ndarray, captured: float) -> bool:
        """Whether the frame captured at CAPTURED (seconds, monotonic) goes through the detector."""
        self._now = captured
        if not self.enabled:
            return True
        if self.motion(image_bgr):
            self._active_until = captured + self.active_hold_s
        due = self._last_detect is None or captured - self._last_detect >= self.period - SCHEDULE_SLACK_S
        if self.state == "active" or due:
            self._last_detect = captured
            return True
        return False

    def observe(self, captured: float, faces: int) -> None:
        """Report the detector's result for the frame captured at CAPTURED: a face keeps the gate active."""
        if faces:
            self._active_until = max(self._active_until, captured + self.active_hold_s)
