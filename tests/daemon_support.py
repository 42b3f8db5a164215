"""Helpers for the daemon tests: an MQTT recorder, the daemon as a subprocess, an MJPEG camera."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from facedoor.demo.broker import Subscriber, retained  # noqa: F401  (re-exported for the tests)

FACEDOOR = Path(sys.executable).with_name("facedoor")


def write_config(path: Path, models: Path, store: Path, port: int, **sections: Any) -> Path:
    """A daemon config for tests: real models and store, a private broker, short timings."""
    cfg: dict[str, Any] = {
        "door_id": "front",
        "state_dir": str(path.parent),
        "models": str(models),
        "store": str(store),
        "recognition": {"threads": 1},
        "mqtt": {"host": "127.0.0.1", "port": port, "health_interval_s": 1.0, "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0},
        "audit": {"enabled": False},
        # photos stand in for people in these tests and a photo moves as a plane: recognition tests
        # run with the liveness gate off, said here; the gate's own tests turn it on (test_liveness.py)
        "liveness": {"enabled": False},
        "logging": {"level": "INFO", "format": "json"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg))
    return path


def log_events(text: str, name: str) -> list[dict[str, Any]]:
    """The JSON log records in TEXT with event=NAME, from complete lines only: a process that is still
    running may be halfway through writing the last one."""
    complete = text[: text.rfind("\n") + 1]
    return [r for line in complete.splitlines()
            if line.startswith("{") and (r := json.loads(line)).get("event") == name]


class Daemon:
    """`facedoor --config CFG run --source SRC ...` as a real subprocess, logging to a file."""

    def __init__(self, config: Path, source: str, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None):
        self.log_path = config.with_suffix(".log")
        cmd = [*(prefix or []), str(FACEDOOR), "--config", str(config), "run", "--source", source, *args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """Structured (JSON) log records with event=NAME."""
        return log_events(self.log(), name)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def run_gate_until(config: Path, video: Path, broker: Any, done: Callable[[dict[str, Any]], bool],
                   timeout: float = 240.0) -> tuple[list[dict[str, Any]], Daemon, list[dict[str, Any]]]:
    """The daemon with the liveness gate on VIDEO (looped, paced like a camera) until a decision satisfies
    DONE or TIMEOUT runs out; then SIGTERM (exit 0). Returns every decision received, the daemon and every
    message it published (as `Subscriber` records); its health reports and decisions must say the gate is on."""
    sub = Subscriber(broker.host, broker.port, "facedoor/front/#")
    daemon = Daemon(config, str(video), "--loop")
    try:
        sub.wait_for(lambda m: m["topic"].endswith("/decision") and done(json.loads(m["payload"])), timeout)
        assert daemon.terminate() == 0, daemon.log()[-3000:]
        delivered = sum(1 for e in daemon.events("decision") if e.get("delivered"))
        decisions = [json.loads(m["payload"]) for m in sub.wait_count("facedoor/front/decision", delivered, 10.0)]
        health = [json.loads(m["payload"]) for m in sub.on("health")]
        messages = list(sub.messages)
    finally:
        daemon.kill()
        sub.stop()
    assert health and all(h["liveness"] == "on" for h in health), health
    assert decisions and all(d["liveness"] == "on" for d in decisions), daemon.log()[-3000:]
    return decisions, daemon, messages


class MjpegCamera:
    """An HTTP Motion-JPEG camera (as IP cameras serve) that can vanish and come back on its port."""

    def __init__(self, frames: list[np.ndarray], fps: float = 10.0):
        self.jpegs = [cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for f in frames]
        self.fps = fps
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._server: ThreadingHTTPServer | None = None
        self._alive = threading.Event()

    def up(self) -> None:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                while camera._alive.is_set():
                    jpeg = camera.jpegs[i % len(camera.jpegs)]
                    try:
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpeg) + jpeg + b"\r\n")
                    except OSError:
                        return
                    i += 1
                    time.sleep(1.0 / camera.fps)
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._alive.set()
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stop streaming and refuse connections (the camera lost power)."""
        self._alive.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class FakeSystemd:
    """A bound datagram socket standing in for systemd's notify socket (path or abstract)."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[float]:
        return [t for t, line in list(self.messages) if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
