"""The shipped systemd unit passes `systemd-analyze verify` and rates <= 1.3 exposure offline."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "facedoor.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian package `systemd`)")


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's facedoor (verify needs an existing binary)."""
    facedoor = Path(sys.executable).with_name("facedoor")
    text = UNIT.read_text()
    assert "ExecStart=/opt/facedoor/bin/facedoor " in text
    out = tmp_path / "facedoor.service"
    out.write_text(text.replace("/opt/facedoor/bin/facedoor", str(facedoor)))
    return out


def test_unit_verifies(rendered: Path) -> None:
    proc = subprocess.run([ANALYZE, "verify", str(rendered)], capture_output=True, text=True, cwd=rendered.parent)
    assert proc.returncode == 0, proc.stderr
    assert "facedoor.service" not in proc.stderr, proc.stderr  # no warnings about our unit


def test_unit_exposure_is_at_most_1_3(rendered: Path) -> None:
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", str(rendered)], capture_output=True, text=True,
                          cwd=rendered.parent)
    found = re.search(r"Overall exposure level for facedoor\.service: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr
    assert float(found.group(1)) <= 1.3, proc.stdout


def test_unit_keeps_the_camera_reachable_and_is_a_notify_service() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "DevicePolicy=closed", "DeviceAllow=char-video4linux rw", "SupplementaryGroups=video",
                 "StateDirectory=facedoor", "ProtectSystem=strict", "NoNewPrivileges=yes", "Restart=on-failure",
                 "RestartPreventExitStatus=2", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert line in text.splitlines(), line
    assert "WatchdogSec=" in text and not any(line.startswith("PrivateDevices=") for line in text.splitlines())


def test_unit_state_dir_is_private_and_the_network_an_allow_list() -> None:
    """The door creates its state 0700 (biometric data): the unit must not widen it; only loopback
    (and the addresses an operator adds in a drop-in, documented in the unit) are reachable."""
    lines = UNIT.read_text().splitlines()
    assert "StateDirectoryMode=0700" in lines
    assert "IPAddressDeny=any" in lines and "IPAddressAllow=localhost" in lines
    assert "#   IPAddressAllow=192.168.1.10 192.168.1.20" in lines  # the broker/camera line to add
    assert not any(line.startswith("RestrictAddressFamilies=") and "AF_NETLINK" in line for line in lines)
