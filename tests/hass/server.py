"""A real Home Assistant Core for the tests: started headless on loopback from its own venv
(`make hass-venv`), onboarded and given the MQTT integration through its REST API, read back
through REST (states, templates) and, for automation traces, its websocket API."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from facedoor.demo.broker import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Where `make hass-venv` (tests/hass/install.sh) puts it; FACEDOOR_HASS_VENV overrides.
VENV = Path(os.environ.get("FACEDOOR_HASS_VENV")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facedoor" / "hass-venv")
AUTOMATION = REPO / "config" / "homeassistant-automation.yaml"
# Log lines at WARNING or above: `2026-01-01 12:00:00.123 WARNING (MainThread) [logger] message`.
PROBLEM = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) \((\S+)\) \[([^\]]+)\] (.*)$")


class HassError(RuntimeError):
    """Home Assistant did not do what the test needs (start, onboard, accept a flow)."""


def installed() -> str | None:
    """The Home Assistant version installed in VENV, or None (then the live tests skip)."""
    marker = VENV / ".installed"
    return (marker.read_text().split() or ["?"])[0] if marker.is_file() else None


class HomeAssistant:
    """One Home Assistant instance in CONFIG_DIR; `start()`/`stop()` may repeat (a restart)."""

    def __init__(self, config_dir: Path):
        self.config_dir = config_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = f"{self.url}/"
        self.log_path = config_dir / "home-assistant.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token: str | None = None
        self.refresh_token: str | None = None
        self.earlier_logs = ""  # HA rolls its log over at each start
        config_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "configuration.yaml", config_dir / "configuration.yaml")
        (config_dir / AUTOMATION.name).write_text("[]\n")  # until MQTT is set up: see add_automation

    # -- process -----------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Start HA and wait until it runs (its HTTP API answers and the core state is RUNNING)."""
        if self.log_path.is_file():
            self.earlier_logs += self.log_path.read_text(errors="replace")
        env = {**os.environ, "FACEDOOR_HASS_PORT": str(self.port)}
        env.pop("PYTHONPATH", None)
        out = open(self.config_dir / "stdout.log", "ab")
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "hass"), "--config", str(self.config_dir), "--skip-pip",
             "--log-file", str(self.log_path), "--log-no-color"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        if self.token is None and self.refresh_token is None:
            self._wait(lambda: self._get_open("/api/onboarding"), timeout, "its onboarding API")
        else:
            self.login()
        if self.token is not None:
            self._wait(lambda: self.request("GET", "/api/config").get("state") == "RUNNING", timeout,
                       "the RUNNING state")

    def stop(self, timeout: float = 60.0) -> None:
        """Stop HA as its service manager would (SIGTERM), waiting for a clean exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def _wait(self, ready: Callable[[], Any], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HassError(f"Home Assistant exited ({self.proc.returncode}) before {what}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except (OSError, HassError):
                pass
            time.sleep(0.25)
        raise HassError(f"Home Assistant did not reach {what} within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        text = ""
        for path in (self.config_dir / "stdout.log", self.log_path):
            if path.is_file():
                text += path.read_text(errors="replace")
        return text[-chars:]

    def problems(self) -> list[str]:
        """Every WARNING/ERROR/CRITICAL record of HA's logs (all runs) as `LEVEL [logger] message`."""
        text = self.earlier_logs + (self.log_path.read_text(errors="replace") if self.log_path.is_file() else "")
        return [f"{m[1]} [{m[3]}] {m[4]}" for line in text.splitlines() if (m := PROBLEM.match(line))]

    # -- REST --------------------------------------------------------------------------------
    def _get_open(self, path: str) -> bool:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return bool(resp.status == 200)

    def request(self, method: str, path: str, body: Any = None, *, form: dict[str, str] | None = None,
                auth: bool = True) -> Any:
        """One REST call; the decoded JSON (or text) answer. HassError with the body on HTTP errors."""
        headers = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                raw = resp.read().decode()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise HassError(f"{method} {path}: HTTP {exc.code} {exc.read().decode(errors='replace')[:500]}") from None
        return json.loads(raw) if "json" in ctype else raw

    def onboard(self) -> None:
        """Create the owner through the onboarding API and log in with the code it returns."""
        answer = self.request("POST", "/api/onboarding/users", {
            "client_id": self.client_id, "name": "Test Owner", "username": "owner",
            "password": "facedoor-test-password", "language": "en"}, auth=False)
        self._token({"grant_type": "authorization_code", "code": answer["auth_code"], "client_id": self.client_id})
        self._wait(lambda: self.request("GET", "/api/config").get("state") == "RUNNING", 120, "the RUNNING state")

    def login(self) -> None:
        """A fresh access token from the refresh token (after a restart)."""
        assert self.refresh_token is not None
        self._wait(lambda: self._token({"grant_type": "refresh_token", "refresh_token": self.refresh_token,
                                        "client_id": self.client_id}), 120, "its auth API")

    def _token(self, form: dict[str, str]) -> bool:
        answer = self.request("POST", "/auth/token", form=form, auth=False)
        self.token = answer["access_token"]
        self.refresh_token = answer.get("refresh_token", self.refresh_token)
        return True

    def add_mqtt(self, host: str, port: int) -> dict[str, Any]:
        """The MQTT integration through the config-entry flow (user step, then the broker step)."""
        step = self.request("POST", "/api/config/config_entries/flow",
                            {"handler": "mqtt", "show_advanced_options": False})
        for _ in range(3):
            if step.get("type") != "form":
                break
            if step["step_id"] != "broker":
                raise HassError(f"unexpected MQTT flow step: {step}")
            step = self.request("POST", f"/api/config/config_entries/flow/{step['flow_id']}",
                                {"broker": host, "port": port})
        if step.get("type") != "create_entry":
            raise HassError(f"the MQTT flow did not create an entry: {step}")
        return dict(step)

    def add_automation(self) -> None:
        """Put the shipped automation in place and reload automations, as a user pasting it would
        (once MQTT is set up: an MQTT trigger without MQTT is an error in HA's log)."""
        shutil.copy(AUTOMATION, self.config_dir / AUTOMATION.name)
        self.request("POST", "/api/services/automation/reload", {})

    def state(self, entity_id: str) -> dict[str, Any] | None:
        """The entity's state object, or None when HA has no such entity."""
        try:
            return dict(self.request("GET", f"/api/states/{entity_id}"))
        except HassError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def wait_state(self, entity_id: str, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 30.0) -> dict[str, Any]:
        """Poll the entity until PREDICATE holds for its state object; HassError naming the last one."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.state(entity_id)
            if last is not None and predicate(last):
                return last
            time.sleep(0.2)
        raise HassError(f"{entity_id} did not reach the expected state within {timeout:.0f} s; last: {last}")

    def render(self, template: str) -> str:
        """Render a template in HA (device registry look-ups and the like)."""
        return str(self.request("POST", "/api/template", {"template": template}))

    def ws(self, message: dict[str, Any]) -> Any:
        """One websocket command's result (run by HA's own Python: aiohttp lives there)."""
        proc = subprocess.run([str(VENV / "bin" / "python"), str(HERE / "ws.py"), self.url, str(self.token),
                               json.dumps(message)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise HassError(f"websocket {message['type']} failed: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout)
