"""Output directories of the door and its tools (export, stylize, demo)."""
from __future__ import annotations

import tempfile
from pathlib import Path


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
