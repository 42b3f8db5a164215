"""`facedoor web passwd` and `facedoor web serve` refusals: argon2id in a 0600 file, clear
one-line errors with exit 2, a non-loopback bind without TLS refused."""
from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from daemon_support import FACEDOOR
from facedoor.config import ConfigError, parse_config
from facedoor.web.users import Users


def passwd(state: Path, *args: str, password: str = "long enough password") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FACEDOOR), "web", "passwd", "--state-dir", str(state), "--password-stdin", *args],
                          input=password + "\n", capture_output=True, text=True, timeout=60)


def test_passwd_writes_argon2id_0600_and_resets(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = passwd(state, "--role", "admin", "alice")
    assert done.returncode == 0 and "added console user alice (admin)" in done.stdout, done.stderr
    path = state / "web-users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    first = json.loads(path.read_text())["users"]["alice"]
    assert first["hash"].startswith("$argon2id$") and first["role"] == "admin" and "long enough" not in path.read_text()
    users = Users(path)
    assert users.authenticate("alice", "long enough password") is not None
    assert users.authenticate("alice", "wrong") is None and users.authenticate("bob", "long enough password") is None
    reset = passwd(state, "alice", password="another long password")
    assert reset.returncode == 0 and "reset console user alice (viewer)" in reset.stdout
    user = users.authenticate("alice", "another long password")
    assert user is not None and user.role == "viewer" and users.authenticate("alice", "long enough password") is None


@pytest.mark.parametrize(("args", "password", "message"), [
    (["alice"], "short", "shorter than 10"),
    (["../etc/passwd"], "long enough password", "user name"),
    (["--role", "root", "alice"], "long enough password", "invalid choice"),
])
def test_passwd_refuses_bad_input_and_changes_nothing(tmp_path: Path, args: list[str], password: str,
                                                       message: str) -> None:
    done = passwd(tmp_path, *args, password=password)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "web-users.json").exists()


def test_a_damaged_users_file_stops_the_console_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "web-users.json").write_text('{"users": {"eve": {"hash": "plain", "role": "admin"}}}')
    done = subprocess.run([str(FACEDOOR), "--models", str(tmp_path), "web", "serve", "--state-dir", str(tmp_path),
                           "--no-door-watch"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "invalid name, role or hash" in done.stderr and "Traceback" not in done.stderr


def test_a_non_loopback_bind_needs_tls(tmp_path: Path) -> None:
    done = subprocess.run([str(FACEDOOR), "web", "serve", "--state-dir", str(tmp_path), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "clear text" in done.stderr and done.stderr.count("\n") == 1
    with pytest.raises(ConfigError, match="web.tls_cert"):
        parse_config({"web": {"host": "192.168.1.5"}})
    assert parse_config({"web": {"host": "192.168.1.5", "allow_insecure_bind": True}}).web.host == "192.168.1.5"
    assert parse_config({"web": {"host": "::1"}}).web.host == "::1"
    with pytest.raises(ConfigError, match="together"):
        parse_config({"web": {"host": "0.0.0.0", "tls_cert": "/x.pem"}})
