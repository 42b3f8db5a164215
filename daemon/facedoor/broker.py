"""A private Mosquitto broker on a free loopback port (demo, tests, benchmarks; never production).

The door itself talks to the building's broker; this only starts Debian's `mosquitto` binary for
runs that must be self-contained. `stop()` and `start()` keep the same port, so callers can
simulate a broker outage and its return.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """Mosquitto exited or did not listen in time; the message points at its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary, or None when it is not installed."""
    return shutil.which("mosquitto") or next((p for p in CANDIDATES if Path(p).exists()), None)


class PrivateBroker:
    """Mosquitto listening on 127.0.0.1:<free port>, anonymous, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = mosquitto_binary()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    @property
    def available(self) -> bool:
        return self.binary is not None

    def start(self, timeout_s: float = 10.0) -> bool:
        """Start (no-op if running); False when mosquitto is not installed, BrokerError on failure."""
        if self.binary is None:
            return False
        if self.proc is not None:
            return True
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
                        "log_dest stderr\nlog_type error\nlog_type warning\n")
        with open(self.log, "ab") as log_file:
            self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log_file, stderr=log_file)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port}; see {self.log}")

    def stop(self) -> None:
        """Terminate the broker (killed after 5 s); the port stays reserved for start()."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "PrivateBroker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
