"""The synthetic walk-up video: the timeline names the first frame that shows each visitor, and a
`still` doorway keeps the idle gate idle until then."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facedoor.config import IdleConfig
from facedoor.demo.walkup import Visitor, plan, render
from facedoor.motion import IdleGate


def checkerboard(tmp_path: Path) -> Path:
    """A high-contrast 'photo' that no background pixel can be mistaken for."""
    tiles = np.kron((np.indices((6, 5)).sum(axis=0) % 2) * 255, np.ones((20, 20))).astype(np.uint8)
    path = tmp_path / "visitor.png"
    cv2.imwrite(str(path), cv2.cvtColor(tiles, cv2.COLOR_GRAY2BGR))
    return path


def shown(frame: np.ndarray, empty: np.ndarray) -> float:
    """Fraction of pixels that differ from the empty doorway by more than sensor noise could."""
    return float(np.mean(np.abs(frame.astype(np.int16) - empty.astype(np.int16)).max(axis=2) > 60))


def test_first_frame_is_the_first_frame_that_shows_the_visitor(tmp_path: Path) -> None:
    visitors = [Visitor("a", checkerboard(tmp_path))] * 2
    for fps, gap in ((10.0, 0.3), (25.0, 0.7), (7.0, 0.5)):  # visit starts on and between frame times
        frames = list(render(visitors, fps=fps, visit_s=1.0, gap_s=gap, still=True))
        segments = plan(visitors, 1.0, gap)
        firsts = [seg.first_frame(fps) for seg in segments]
        for seg, first in zip(segments, firsts):
            assert first / fps >= seg.start_s > (first - 1) / fps
            assert shown(frames[first], frames[0]) > 0.02 and shown(frames[first - 1], frames[0]) == 0.0
        inside = {i for seg, first in zip(segments, firsts) for i in range(first, len(frames)) if i / fps < seg.end_s}
        assert all(shown(f, frames[0]) == 0.0 for i, f in enumerate(frames) if i not in inside)  # nothing else moves


def test_the_still_doorway_keeps_the_gate_idle_until_the_visitor_appears(tmp_path: Path) -> None:
    fps, idle = 10.0, IdleConfig()
    gap = idle.active_hold_s + 1.0
    visitors = [Visitor("a", checkerboard(tmp_path))] * 2
    first = [seg.first_frame(fps) for seg in plan(visitors, 1.0, gap)]
    gate = IdleGate.from_config(idle)
    states = []
    for i, frame in enumerate(render(visitors, fps=fps, visit_s=1.0, gap_s=gap, still=True)):
        detect = gate.should_detect(frame, i / fps)
        states.append((gate.state, detect))
    for f in first:
        assert states[f - 1][0] == "idle" and states[f] == ("active", True)  # woken by the visitor's first frame
    moving = list(render(visitors, fps=fps, visit_s=1.0, gap_s=gap))
    assert shown(moving[int(fps)], moving[0]) > 0.0  # the default doorway pans and has a passer-by
