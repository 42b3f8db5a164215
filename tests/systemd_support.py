"""The shipped systemd units, checked with `systemd-analyze` as installed: render one with ExecStart
pointing at this venv's facedoor (verify needs an existing binary), verify it, rate its exposure."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze not installed (Debian package `systemd`)")


def render(name: str, directory: Path) -> Path:
    """systemd/NAME with its ExecStart on this venv's facedoor, written into DIRECTORY."""
    text = (UNITS / name).read_text()
    assert "ExecStart=/opt/facedoor/bin/facedoor " in text
    out = directory / name
    out.write_text(text.replace("/opt/facedoor/bin/facedoor", str(Path(sys.executable).with_name("facedoor"))))
    return out


def verify(unit: Path) -> None:
    """`systemd-analyze verify` passes with no warning about UNIT itself."""
    assert ANALYZE is not None
    proc = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, cwd=unit.parent)
    assert proc.returncode == 0, proc.stderr
    assert unit.name not in proc.stderr, proc.stderr


def exposure(unit: Path) -> float:
    """The overall exposure level `systemd-analyze security --offline=yes` gives UNIT (0 best, 10 worst)."""
    assert ANALYZE is not None
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", str(unit)], capture_output=True, text=True,
                          cwd=unit.parent)
    found = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    return float(found.group(1))
