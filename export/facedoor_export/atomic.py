"""Write files under a temporary name and rename them, so no half-written output is ever seen."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from facedoor_export.errors import ExportError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write DATA to PATH via a temp file in the same directory + fsync + rename."""
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_temp(path: Path, data: bytes) -> Path:
    """Write DATA (fsynced) to a hidden temp file beside PATH and return the temp path."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ExportError(f"cannot write to output directory {path.parent}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the daemon user must read models
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return Path(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
