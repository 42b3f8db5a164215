"""Camera capture: newest-frame hand-over, file end and loop, outage and reopen (real OpenCV decoding)."""
from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon_support import MjpegCamera
from facedoor.camera import Camera, CameraError, CameraState, describe, is_video_file, parse_source
from facedoor.config import CameraConfig


def numbered_video(path: Path, frames: int, fps: float = 20.0) -> Path:
    """A video whose frame i shows its number as a grey level, so tests can tell frames apart."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 120))
    for i in range(frames):
        writer.write(np.full((120, 160, 3), (i * 4) % 256, np.uint8))
    writer.release()
    return path


def drain(cam: Camera, timeout: float = 10.0) -> list:
    frames, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and not cam.ended:
        frame = cam.get(timeout=0.5)
        if frame is not None:
            frames.append(frame)
    return frames


def test_sources_are_classified_and_credentials_masked() -> None:
    assert parse_source("0") == 0 and parse_source(2) == 2 and parse_source("/dev/video0") == "/dev/video0"
    assert not is_video_file(0) and not is_video_file("/dev/video0") and not is_video_file("rtsp://cam/1")
    assert is_video_file("walk.avi")
    assert describe("rtsp://admin:s3cret@10.0.0.5/stream") == "rtsp://admin:***@10.0.0.5/stream"


@pytest.mark.parametrize("source, shown", [
    ("rtsp://admin:pa/ss@cam:554/s1", "rtsp://admin:***@cam:554/s1"),
    ("rtsp://admin:p@ss@cam/s1", "rtsp://admin:***@cam/s1"),
    ("rtsp://admin:pa?ss@cam/s1", "rtsp://admin:***@cam/s1"),
    ("rtsp://:tok3n@cam/s1", "rtsp://***@cam/s1"),
    ("rtsp://tok3n@cam/s1", "rtsp://***@cam/s1"),
    ("http://cam/video.cgi?user=admin&password=s3cret&res=hi", "http://cam/video.cgi?user=admin&password=***&res=hi"),
    ("http://cam/mjpg?token=s3cret", "http://cam/mjpg?token=***"),
    ("http://cam/mjpg?a=1&access_token=s3cret;pwd=x", "http://cam/mjpg?a=1&access_token=***;pwd=***"),
    ("HTTP://u:s3cret@cam/?API_KEY=s3cret#f", "HTTP://u:***@cam/?API_KEY=***#f"),
    ("rtsp://cam/stream?contact=a@b.example", "rtsp://***@b.example"),
    ("rtsp://cam:554/stream", "rtsp://cam:554/stream"),
    # XMEye / DVR path-style credentials (the password may hold '_' or '/': the rest of the path goes)
    ("rtsp://10.0.0.5:554/user=admin_password=s3cret_channel=1_stream=0.sdp?real_stream",
     "rtsp://10.0.0.5:554/user=admin_password=***?real_stream"),
    ("rtsp://dvr/user=admin_password=s3c_r/et_channel=1", "rtsp://dvr/user=admin_password=***"),
    ("rtsp://dvr/live/pwd=s3cret/ch1", "rtsp://dvr/live/pwd=***"),
    ("rtsp://cam/cam/realmonitor?channel=1&subtype=0", "rtsp://cam/cam/realmonitor?channel=1&subtype=0"),
    ("/srv/videos/user@host.avi", "/srv/videos/user@host.avi"),
    (0, "0"),
])
def test_every_form_of_url_credentials_is_masked(source: int | str, shown: str) -> None:
    assert describe(source) == shown
    assert "s3cret" not in describe(source) and "tok3n" not in describe(source)


def test_missing_video_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match="camera.source: video file .*nope.avi does not exist"):
        Camera(CameraConfig(source=str(tmp_path / "nope.avi")))


def test_a_slow_consumer_gets_the_newest_frame_not_a_backlog(tmp_path: Path) -> None:
    cam = Camera(CameraConfig(source=str(numbered_video(tmp_path / "n.avi", 60, fps=20))))
    cam.start()
    try:
        first = cam.get(timeout=5)
        assert first is not None
        time.sleep(1.0)  # a slow recognition step: ~20 frames are captured meanwhile
        newest = cam.get(timeout=5)
        assert newest is not None and newest.seq >= first.seq + 15
        assert time.monotonic() - newest.t_mono < 0.2  # fresh, not queued
        assert abs(newest.t_wall - time.time()) < 0.5
    finally:
        cam.stop()


def test_video_file_is_paced_and_ends_cleanly(tmp_path: Path) -> None:
    cam = Camera(CameraConfig(source=str(numbered_video(tmp_path / "n.avi", 20, fps=20))))
    start = time.monotonic()
    cam.start()
    frames = drain(cam)
    elapsed = time.monotonic() - start
    assert cam.ended and cam.state == CameraState.ENDED
    assert len(frames) == 20 and [f.seq for f in frames] == list(range(1, 21))
    assert elapsed >= 0.8  # 20 frames at 20 fps, delivered like a live camera (not instantly)
    cam.stop()


def test_loop_restarts_the_file(tmp_path: Path) -> None:
    cam = Camera(CameraConfig(source=str(numbered_video(tmp_path / "n.avi", 5, fps=50))), loop=True)
    cam.start()
    try:
        frames = [cam.get(timeout=2) for _ in range(12)]
        assert all(f is not None for f in frames) and not cam.ended
        levels = [int(f.image[0, 0, 0]) for f in frames]
        assert levels.count(levels[0]) >= 2  # the first frame came round again
    finally:
        cam.stop()


def test_a_camera_that_vanishes_is_reported_down_and_reopened(tmp_path: Path) -> None:
    frames = [np.full((120, 160, 3), 40 * i, np.uint8) for i in range(5)]
    server = MjpegCamera(frames, fps=20)
    server.up()
    cfg = CameraConfig(source=server.url, stall_timeout_s=1.0, reopen_backoff_initial_s=0.2, reopen_backoff_max_s=0.5)
    cam = Camera(cfg)
    cam.start()
    try:
        assert cam.get(timeout=5) is not None and cam.state == CameraState.UP
        server.down()
        deadline = time.monotonic() + 5
        while cam.state != CameraState.DOWN and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cam.state == CameraState.DOWN
        while cam.get(timeout=0.1) is not None:  # whatever was captured before the outage
            pass
        time.sleep(1.5)
        assert cam.get(timeout=0.1) is None and cam.state == CameraState.DOWN and cam.failures >= 2
        server.up()
        frame = cam.get(timeout=10)
        assert frame is not None and cam.state == CameraState.UP and cam.reopens >= 1
        assert cam.alive(grace_s=2.0)
    finally:
        cam.stop()
        server.down()
