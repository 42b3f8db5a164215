"""Fixtures for the export tests (helpers live in export_support.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def export_cli(capsys: pytest.CaptureFixture[str]):
    """Run `facedoor-export ARGS` in this process; returns (exit code, stdout, stderr)."""
    from facedoor_export.cli import main

    def run(*args: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run

