"""Helpers for the web console tests: a console on a temporary state directory, signed-in clients."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from facedoor.config import FacedoorConfig, parse_config
from facedoor.web.app import Console, create_app
from facedoor.web.users import set_password

PASSWORD = "correct horse battery"
ENCODER = "ab" * 32


def console_config(state: Path, models: Path | None = None, **web: Any) -> FacedoorConfig:
    return parse_config({"state_dir": str(state), "store": str(state / "store.db"),
                         "models": str(models or state / "models"), "audit": {"save_crops": True},
                         "web": web})


def make_console(cfg: FacedoorConfig, *, real_models: bool = False) -> Console:
    for user, role in (("alice", "admin"), ("victor", "viewer")):
        set_password(cfg.state_dir / "web-users.json", user, PASSWORD, role)
    return Console(cfg, watch_door=False, encoder_sha256=None if real_models else ENCODER)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def sign_in(client: TestClient, user: str, password: str = PASSWORD) -> str:
    """Sign USER in; return the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    page = client.post("/login", data={"user": user, "password": password, "csrf": token})
    assert page.status_code == 200 and "Sign out" in page.text, page.text[:500]
    return csrf_of(page.text)


def client_for(console: Console, **kwargs: Any) -> TestClient:
    return TestClient(create_app(console), follow_redirects=True, **kwargs)


def write_audit(path: Path, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        for e in entries:
            fh.write(json.dumps(e) + "\n")


def visit(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"visit-{i}", "door": "front", "decision": "deny", "reason": "unknown", "identity": None,
            "distance": 0.9, "threshold": 0.7, "live_score": None, "ts_ms": 1_700_000_000_000 + i * 1000,
            "delivered": True, **fields}
