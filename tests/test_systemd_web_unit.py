"""The console's systemd unit passes `systemd-analyze verify` and rates <= 2.0 exposure offline."""
from __future__ import annotations

from pathlib import Path

from systemd_support import UNITS, exposure, needs_analyze, render, verify

UNIT = UNITS / "facedoor-web.service"


@needs_analyze
def test_web_unit_verifies(tmp_path: Path) -> None:
    verify(render("facedoor-web.service", tmp_path))


@needs_analyze
def test_web_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    assert exposure(render("facedoor-web.service", tmp_path)) <= 2.0


def test_web_unit_runs_the_console_as_the_door_user_without_devices() -> None:
    lines = UNIT.read_text().splitlines()
    for line in ("User=facedoor", "StateDirectory=facedoor", "PrivateDevices=yes", "ProtectSystem=strict",
                 "NoNewPrivileges=yes", "RestartPreventExitStatus=2", "MemoryDenyWriteExecute=yes"):
        assert line in lines, line
    assert any(line.startswith("ExecStart=") and line.endswith(" web serve") for line in lines)
