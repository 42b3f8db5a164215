"""Files and directories only their owner can open: the biometric data (store, audit log, face crops).

New files are created 0600 and new directories 0700 whatever the process umask (a mode the umask
narrowed, e.g. 0400, is set back); files and directories that already exist keep their mode.
"""
from __future__ import annotations

import os
from pathlib import Path

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
