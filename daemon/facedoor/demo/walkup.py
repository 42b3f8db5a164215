"""Synthetic door-camera footage: real face photos walking up to the door, written with OpenCV.

Each visitor's photo is pasted, with a feathered elliptical edge, on a background that pans,
has a passer-by moving across it and fresh sensor noise in every frame (or, `still`, a doorway
where only the visitor moves: the idle gate's case); the photo grows as the visitor approaches
and sways a little; a visitor with more photos of themselves shows them in turn, as a live face
turns and changes expression over a visit. Tests, the benchmark and `facedoor demo` use it to
drive the real daemon as a live camera would (a video file paced at its frame rate).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class Visitor:
    """Who walks up (a label for reports), the photo that shows their face, optionally more photos
    of the same person shown in turn over the visit, and the photo of someone walking up beside
    them (a little smaller, on their right)."""

    name: str
    photo: Path
    companion: Path | None = None
    more: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Segment:
    """When a visitor is in view, in seconds from the start of the video."""

    name: str
    photo: str
    start_s: float
    end_s: float

    def first_frame(self, fps: float) -> int:
        """Index of the first frame that shows the visitor (`render` draws frame i at i / FPS seconds)."""
        return next(i for i in itertools.count(max(0, math.floor(self.start_s * fps) - 1)) if i / fps >= self.start_s)


def _background(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A wall with a door frame and some texture, twice as wide as the frame so it can pan."""
    w, h = size
    bg = np.zeros((h, 2 * w, 3), np.float32)
    bg[:] = np.linspace(90, 170, 2 * w, dtype=np.float32)[None, :, None] * np.array([0.9, 1.0, 1.05], np.float32)
    for _ in range(12):
        x, y = int(rng.integers(0, 2 * w)), int(rng.integers(0, h))
        cw, ch = int(rng.integers(20, 160)), int(rng.integers(20, 160))
        cv2.rectangle(bg, (x, y), (x + cw, y + ch), rng.uniform(40, 220, 3).tolist(), -1)
    cv2.rectangle(bg, (w // 2 - 170, 10), (w // 2 + 170, h), (60, 70, 80), 18)
    return cv2.GaussianBlur(bg, (0, 0), 3)


def _load_photo(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return image


def _paste(frame: np.ndarray, photo: np.ndarray, cx: float, cy: float, height: float, gain: float) -> None:
    """Blend PHOTO scaled to HEIGHT pixels, centred at (cx, cy), with a soft elliptical edge."""
    ph, pw = photo.shape[:2]
    h = max(8, int(height))
    w = max(8, int(pw * h / ph))
    sprite = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA if h < ph else cv2.INTER_LINEAR).astype(np.float32)
    mask: np.ndarray = np.zeros((h, w), np.float32)
    cv2.ellipse(mask, (w // 2, h // 2), (int(w * 0.47), int(h * 0.48)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, h / 40))[..., None]
    x0, y0 = int(cx - w / 2), int(cy - h / 2)
    fx0, fy0 = max(0, x0), max(0, y0)
    fx1, fy1 = min(frame.shape[1], x0 + w), min(frame.shape[0], y0 + h)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    sx0, sy0 = fx0 - x0, fy0 - y0
    region = frame[fy0:fy1, fx0:fx1]
    s = sprite[sy0:sy0 + (fy1 - fy0), sx0:sx0 + (fx1 - fx0)] * gain
    m = mask[sy0:sy0 + (fy1 - fy0), sx0:sx0 + (fx1 - fx0)]
    frame[fy0:fy1, fx0:fx1] = region * (1 - m) + s * m


def plan(visitors: Sequence[Visitor], visit_s: float, gap_s: float) -> list[Segment]:
    """The timeline: a gap of empty doorway, then each visitor for VISIT_S, then a gap."""
    segments, t = [], gap_s
    for v in visitors:
        segments.append(Segment(v.name, str(v.photo), t, t + visit_s))
        t += visit_s + gap_s
    return segments


def render(visitors: Sequence[Visitor], *, fps: float = 10.0, size: tuple[int, int] = (640, 480),
           visit_s: float = 3.0, gap_s: float = 1.0, seed: int = 0, still: bool = False) -> Iterator[np.ndarray]:
    """Yield the BGR frames of the walk-up video (see `plan` for its timeline); STILL: no pan, no passer-by."""
    rng = np.random.default_rng(seed)
    w, h = size
    bg = _background(size, rng)
    photos = [[_load_photo(p) for p in (v.photo, *v.more)] for v in visitors]
    companions = [_load_photo(v.companion) if v.companion is not None else None for v in visitors]
    segments = plan(visitors, visit_s, gap_s)
    total = segments[-1].end_s + gap_s if segments else gap_s
    for i in range(int(round(total * fps))):
        t = i / fps
        pan = 0 if still else int((np.sin(t * 0.4) * 0.5 + 0.5) * w * 0.5)
        frame = bg[:, pan:pan + w].copy()
        if not still:
            walker_x = (t * 90) % (w + 200) - 100  # a passer-by crossing in the background
            cv2.ellipse(frame, (int(walker_x), int(h * 0.55)), (35, 110), 0, 0, 360, (50, 45, 40), -1)
        for seg, turns, companion in zip(segments, photos, companions):
            if seg.start_s <= t < seg.end_s:
                p = (t - seg.start_s) / (seg.end_s - seg.start_s)   # 0 -> 1 while approaching
                photo = turns[min(int(p * len(turns)), len(turns) - 1)]
                height = h * (0.42 + 0.38 * min(1.0, p * 1.5))
                cx = w * (0.38 + 0.12 * min(1.0, p * 2)) + 6 * np.sin(t * 5)
                cy = h * 0.48 + 4 * np.sin(t * 3.1)
                if companion is not None:  # beside them: 85 % of their size, a third of the frame to the right
                    _paste(frame, companion, cx + w * 0.33, cy + 3 * np.sin(t * 2.3), height * 0.85, 0.97)
                _paste(frame, photo, cx, cy, height, 0.95 + 0.05 * np.sin(t * 2))
        frame += rng.normal(0, 4.0, frame.shape).astype(np.float32)
        yield np.clip(frame, 0, 255).astype(np.uint8)


def write_walkup(path: str | Path, visitors: Sequence[Visitor], *, fps: float = 10.0,
                 size: tuple[int, int] = (640, 480), visit_s: float = 3.0, gap_s: float = 1.0,
                 seed: int = 0, still: bool = False) -> list[Segment]:
    """Write the walk-up video to PATH (Motion-JPEG AVI) and return its timeline (see `render`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*"MJPG")  # type: ignore[attr-defined]  # missing from the stubs
    writer = cv2.VideoWriter(str(path), fourcc, fps, size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 90)
    try:
        for frame in render(visitors, fps=fps, size=size, visit_s=visit_s, gap_s=gap_s, seed=seed, still=still):
            writer.write(frame)
    finally:
        writer.release()
    return plan(visitors, visit_s, gap_s)
