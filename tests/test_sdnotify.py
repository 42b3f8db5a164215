"""systemd notify protocol over a fake $NOTIFY_SOCKET, and the watchdog of a stalled frame loop."""
from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon_support import FakeSystemd
from facedoor.camera import Camera
from facedoor.config import parse_config
from facedoor.match import Gallery
from facedoor.mqtt import MqttLink
from facedoor.sdnotify import Notifier, watchdog_interval_s
from facedoor.service import DoorService


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_reaches_path_and_abstract_sockets(tmp_path: Path, kind: str) -> None:
    address = str(tmp_path / "notify") if kind == "path" else f"@facedoor-test-{uuid.uuid4().hex}"
    systemd = FakeSystemd(address)
    try:
        n = Notifier(address)
        assert n.ready("up") and n.watchdog() and n.status("fine") and n.stopping()
        time.sleep(0.3)
        lines = [line for _, line in systemd.messages]
        assert lines == ["READY=1", "STATUS=up", "WATCHDOG=1", "STATUS=fine", "STOPPING=1", "STATUS=stopping"]
    finally:
        systemd.close()


def test_without_notify_socket_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready("x") and not n.watchdog()


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval_s() is None


class StallablePipeline:
    """Finds no faces, instantly, until `stall` is set: then hangs like a wedged inference."""

    embedding_dim = 128

    def __init__(self) -> None:
        self.stall = threading.Event()
        self.release = threading.Event()

    def analyze(self, image: np.ndarray) -> list:
        if self.stall.is_set():
            self.release.wait(30)
        return []


def test_a_stalled_frame_loop_stops_watchdog_pings(tmp_path: Path, mosquitto, monkeypatch) -> None:
    video = tmp_path / "grey.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 20, (160, 120))
    for i in range(20):
        writer.write(np.full((120, 160, 3), i * 10, np.uint8))
    writer.release()
    address = f"@facedoor-test-{uuid.uuid4().hex}"
    systemd = FakeSystemd(address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4 s: ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = parse_config({"mqtt": {"port": mosquitto.port}, "camera": {"source": str(video), "loop": True}})
    pipeline = StallablePipeline()
    link = MqttLink(cfg)
    link.start()
    assert link.wait_connected(5)
    gallery = Gallery(["alice"], np.full((1, 128), 128 ** -0.5, np.float32), 0.7)
    service = DoorService(cfg, pipeline, lambda: gallery, Camera(cfg.camera), link, Notifier(address))
    service.camera.start()
    loop = threading.Thread(target=service.run, daemon=True)
    loop.start()
    try:
        time.sleep(1.5)
        assert systemd.lines("READY=1"), systemd.messages
        assert len(systemd.lines("WATCHDOG=1")) >= 4
        pipeline.stall.set()
        time.sleep(0.5)  # the frame in progress finishes; the next one hangs
        stalled_at = time.monotonic()
        time.sleep(2.0)
        assert [t for t in systemd.lines("WATCHDOG=1") if t > stalled_at] == []
        pipeline.stall.clear()
        pipeline.release.set()
        time.sleep(1.0)
        assert len([t for t in systemd.lines("WATCHDOG=1") if t > stalled_at]) >= 2
    finally:
        pipeline.release.set()
        service.request_stop()
        loop.join(5)
        service.close()
        systemd.close()
    assert systemd.lines("STOPPING=1")
