"""The console's users: argon2id password hashes and a role each, in one JSON file only the
facedoor user reads (0600).

`facedoor web passwd [--role admin|viewer] USER` adds a user or resets a password (there is no
other way to recover one: a reset needs a shell on the door unit). A viewer sees; an admin also
enrols, removes and labels. A session remembers a fingerprint of the user's hash and role, so a
reset password or a changed role ends every session of that user at its next request.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from facedoor.files import open_private, private_dir

Role = Literal["admin", "viewer"]
ROLES: tuple[Role, ...] = ("admin", "viewer")
USERS_FILE = "web-users.json"
USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 10
MAX_PASSWORD = 1024
MAX_FILE_BYTES = 1_000_000
# argon2id at OWASP's floor (19 MiB, 2 passes): ~40 ms a check on this hardware and a bounded memory
# peak; checks run one at a time (`_VERIFY`), so parallel logins cannot multiply it.
HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
_VERIFY = threading.Lock()
# Checked when the user is unknown, so an unknown name costs the same time as a wrong password.
_DUMMY = HASHER.hash("facedoor-no-such-user")


class UsersError(ValueError):
    """The users file is unreadable or invalid, or a name or password is refused; the message says why."""


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    fingerprint: str   # changes when the password or the role changes: sessions from before end


def users_path(state_dir: Path, configured: Path | None) -> Path:
    """`web.users_file`, else `<state_dir>/web-users.json`."""
    return configured or state_dir / USERS_FILE


def _fingerprint(encoded: str, role: str) -> str:
    return hashlib.sha256(f"{role}\0{encoded}".encode()).hexdigest()[:24]


def load_users(path: Path) -> dict[str, tuple[str, Role]]:
    """USER -> (argon2id hash, role); an absent file is no users. UsersError names the file and the fault."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsersError(f"{path}: cannot read the console's users ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise UsersError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a users file")
    try:
        raw = json.loads(data)
        users = {name: (str(entry["hash"]), entry["role"]) for name, entry in raw["users"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsersError(f"{path}: not a facedoor users file ({type(exc).__name__}: {exc})") from None
    for name, (encoded, role) in users.items():
        if not USER_RE.match(name) or role not in ROLES or not encoded.startswith("$argon2id$"):
            raise UsersError(f"{path}: user {name[:64]!r} has an invalid name, role or hash")
    return users


def check_name(name: str) -> str:
    """A user name: 1-64 of letters, digits and `_ . @ -`."""
    if not USER_RE.match(name):
        raise UsersError(f"user name {name[:64]!r}: use 1-64 letters, digits, '_', '.', '@' or '-'")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise UsersError(f"the password is shorter than {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UsersError(f"the password is longer than {MAX_PASSWORD} characters")
    return password


def set_password(path: Path, name: str, password: str, role: Role) -> bool:
    """Add NAME or reset its password and role, writing the file atomically 0600; True when NAME is new.

    Run as root, the file is given to the owner of its directory (the facedoor user's state
    directory), so the console, running as that user, can read it and nobody else can."""
    check_name(name)
    check_password(password)
    if role not in ROLES:
        raise UsersError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    users = load_users(path)
    new = name not in users
    users[name] = (HASHER.hash(password), role)
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"users": {n: {"hash": h, "role": r} for n, (h, r) in sorted(users.items())}}, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if os.geteuid() == 0:
            owner = path.parent.stat()
            os.chown(tmp, owner.st_uid, owner.st_gid)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return new


class Users:
    """The users file as the console reads it: re-read when it changes (a `passwd` while it runs)."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._users: dict[str, tuple[str, Role]] = {}
        self._lock = threading.Lock()
        self._current()

    def _current(self) -> dict[str, tuple[str, Role]]:
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        with self._lock:
            if signature != self._seen:
                self._users = load_users(self.path) if signature else {}
                self._seen = signature
            return self._users

    def __len__(self) -> int:
        return len(self._current())

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when NAME exists and PASSWORD is right, else None (in about the same time)."""
        entry = self._current().get(name)
        if len(password) > MAX_PASSWORD:
            return None
        with _VERIFY:
            try:
                HASHER.verify(entry[0] if entry else _DUMMY, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return None
        return User(name, entry[1], _fingerprint(*entry)) if entry else None

    def lookup(self, name: str, fingerprint: str) -> User | None:
        """The signed-in user of a session, None when removed, or its password or role changed since."""
        entry = self._current().get(name)
        if entry is None or _fingerprint(*entry) != fingerprint:
            return None
        return User(name, entry[1], fingerprint)
