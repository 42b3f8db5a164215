"""`facedoor web passwd` and the users file: argon2id in a 0600 file, resets, clear one-line
errors with exit 2 and nothing changed."""
from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from daemon_support import FACEDOOR
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
