"""The shipped systemd unit passes `systemd-analyze verify` and rates <= 1.3 exposure offline."""
from __future__ import annotations

from pathlib import Path

from systemd_support import UNITS, exposure, needs_analyze, render, verify

UNIT = UNITS / "facedoor.service"


@needs_analyze
def test_unit_verifies(tmp_path: Path) -> None:
    verify(render("facedoor.service", tmp_path))


@needs_analyze
def test_unit_exposure_is_at_most_1_3(tmp_path: Path) -> None:
    assert exposure(render("facedoor.service", tmp_path)) <= 1.3


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
