"""Files the door and its tools write.

Biometric data (store, audit log, face crops) is created 0600 in 0700 directories whatever the
process umask (a mode the umask narrowed, e.g. 0400, is set back); files and directories that
already exist keep their mode. Output directories of the tools (export, stylize, demo) are
checked for writability before any slow work.
"""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from facedoor.config import ConfigError

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create PATH and its missing parents 0700; existing directories are left as they are."""
    missing: list[Path] = []
    current = Path(path)
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # another process made it first: not ours to chmod
        os.chmod(directory, DIR_MODE)


def open_private(path: Path, flags: int) -> int:
    """os.open PATH with FLAGS (O_WRONLY, O_APPEND, O_TRUNC...), creating it 0600 when absent."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return os.open(path, flags | os.O_CLOEXEC)
    os.fchmod(fd, FILE_MODE)
    return fd


def read_secret(path: Path, setting: str, max_bytes: int, error: type[ConfigError] = ConfigError) -> bytes:
    """The bytes of a secret file (a key, PIN hashes): a regular file readable by its owner only, at most
    MAX_BYTES; else ERROR (a ConfigError) naming SETTING and PATH."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise error(f"{setting}: cannot read {path} ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{setting}: {path} is not a regular file")
        if mode & 0o077:
            raise error(
                f"{setting}: {path} has mode {stat.S_IMODE(mode):04o}; it must be readable by its "
                f"owner only (chmod 600 {path}, owned by the user the door runs as)"
            )
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{setting}: {path} is longer than {max_bytes} bytes")
    return data


class NotWritableError(OSError):
    """An output directory cannot be created or written; the message names it and why."""


def check_writable(directory: Path) -> None:
    """Create DIRECTORY if needed and prove a file can be created in it (before any slow work)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise NotWritableError(f"output directory {directory} is not writable: {exc.strerror or exc}") from exc
