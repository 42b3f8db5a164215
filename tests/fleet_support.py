"""Helpers for the fleet tests and benchmark: site configs, roster-only doors, a bridge, a cuttable link."""
from __future__ import annotations

import base64
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon_support import FACEDOOR, log_events, write_config
from facedoor.demo.broker import PrivateBroker, Subscriber
from facedoor.fleet import Refused, Sealed, SiteKeys, open_sealed

SITE = "home"
ROSTER_ENCODER = "ab" * 32  # the encoder hash of a roster-only door without real models


def site_key(path: Path) -> Path:
    """A fresh site key file, 0600."""
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def roster_models(path: Path, sha256: str = ROSTER_ENCODER) -> Path:
    """A models directory whose manifest names a facenet encoder (no model files): enough for
    roster-only doors and for `facedoor remove`, which never load a model."""
    path.mkdir(parents=True, exist_ok=True)
    entry = {"kind": "encoder", "file": "facenet.onnx", "sha256": sha256,
             "input": {"name": "input", "shape": [None, 160, 160, 3], "layout": "NHWC"},
             "preprocessing": {"color": "RGB", "normalize": "per_image_standardization", "mean": [0, 0, 0],
                               "scale": 1.0},
             "embedding_dim": 128, "threshold": 0.7}
    (path / "manifest.json").write_text(json.dumps({"format": 1, "models": {"facenet": entry}}))
    return path


def site_config(workdir: Path, door_id: str, models: Path, port: int, key: Path, *, store: Path | None = None,
                **sections: Any) -> Path:
    """A door config of SITE: its own store under WORKDIR/<door_id>/ unless STORE is given."""
    home = workdir / door_id
    home.mkdir(parents=True, exist_ok=True)
    fleet = {"site": SITE, "key_file": str(key), **sections.pop("fleet", {})}
    return write_config(home / "facedoor.yaml", models, store or home / "store.db", port, door_id=door_id,
                        fleet=fleet, **sections)


class Agent:
    """`facedoor --config CFG fleet agent` (a roster-only door) as a real subprocess, logging to a file."""

    def __init__(self, config: Path):
        self.config = config
        self.log_path = config.with_suffix(".log")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(FACEDOOR), "--config", str(config), "fleet", "agent"],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        return log_events(self.log(), name)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`facedoor --config CONFIG ARGS...`, its output captured."""
    return subprocess.run([str(FACEDOOR), "--config", str(config), *args], capture_output=True, text=True,
                          timeout=timeout)


class DoorRecords:
    """Every door record of SITE on a broker, verified with the site key, as they arrive."""

    def __init__(self, host: str, port: int, keys: SiteKeys, prefix: str = "facedoor"):
        self.keys = keys
        self.sub = Subscriber(host, port, f"{prefix}/site/{keys.site}/door/+")

    def all(self) -> list[tuple[float, Sealed]]:
        """(receive time, record) of every verified record so far."""
        out = []
        for m in list(self.sub.messages):
            try:
                out.append((m["recv"], open_sealed(self.keys, m["raw"], "door", m["topic"].rsplit("/", 1)[-1])))
            except Refused:
                continue
        return out

    def latest(self) -> dict[str, Sealed]:
        return {r.key: r for _, r in self.all()}

    def wait(self, check: Callable[[dict[str, Sealed]], bool], timeout: float) -> dict[str, Sealed]:
        """The latest records once CHECK holds for them (AssertionError after TIMEOUT)."""
        return wait_until(lambda: (latest := self.latest()) and check(latest) and latest, timeout,
                          "door records to satisfy the check")

    def stop(self) -> None:
        self.sub.stop()


def bridged_pair(workdir: Path) -> tuple[PrivateBroker, PrivateBroker]:
    """Two Mosquitto brokers, site B bridged to site A for every facedoor topic (both ways, QoS 1)."""
    a = PrivateBroker(workdir / "broker-a")
    b_port = socket.socket()
    b_port.bind(("127.0.0.1", 0))
    port = b_port.getsockname()[1]
    b_port.close()
    b = PrivateBroker(workdir / "broker-b", port, extra_conf=(
        f"connection site-a\naddress 127.0.0.1:{a.port}\ntopic facedoor/# both 1\n"
        "cleansession true\nrestart_timeout 1 2\nbridge_protocol_version mqttv50\n"))
    return a, b


class CuttableLink:
    """A TCP forwarder between doors and the broker: `cut()` drops every connection and refuses new
    ones (the door's network is down, the broker is not); `restore()` lets them through again."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.server.listen(16)
        self._up = threading.Event()
        self._up.set()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self._up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self.cut()
        self.server.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """PREDICATE's truthy result, polled until TIMEOUT (AssertionError naming WHAT)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(poll)
    return result
