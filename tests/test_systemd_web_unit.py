"""The console's systemd unit passes `systemd-analyze verify` and rates <= 2.0 exposure offline."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "facedoor-web.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package `systemd`)")


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    facedoor = Path(sys.executable).with_name("facedoor")
    text = UNIT.read_text()
    assert "ExecStart=/opt/facedoor/bin/facedoor " in text
    out = tmp_path / "facedoor-web.service"
    out.write_text(text.replace("/opt/facedoor/bin/facedoor", str(facedoor)))
    return out


def test_web_unit_verifies(rendered: Path) -> None:
    proc = subprocess.run([ANALYZE, "verify", str(rendered)], capture_output=True, text=True, cwd=rendered.parent)
    assert proc.returncode == 0, proc.stderr
    assert "facedoor-web.service" not in proc.stderr, proc.stderr


def test_web_unit_exposure_is_at_most_2(rendered: Path) -> None:
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", str(rendered)], capture_output=True, text=True,
                          cwd=rendered.parent)
    found = re.search(r"Overall exposure level for facedoor-web\.service: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    assert float(found.group(1)) <= 2.0, proc.stdout


def test_web_unit_runs_the_console_as_the_door_user_without_devices() -> None:
    lines = UNIT.read_text().splitlines()
    for line in ("User=facedoor", "StateDirectory=facedoor", "PrivateDevices=yes", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "RestartPreventExitStatus=2", "MemoryDenyWriteExecute=yes"):
        assert line in lines, line
    assert any(line.startswith("ExecStart=") and line.endswith(" web serve") for line in lines)
