"""`facedoor web serve`: refusals at start (one line, exit 2) and HTTPS with a configured certificate."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from daemon_support import FACEDOOR
from facedoor.config import ConfigError, parse_config


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


def test_https_with_a_configured_certificate_on_any_address(tmp_path: Path, real_models: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (needed to make a test certificate)")
    cert, key = tmp_path / "web.crt", tmp_path / "web.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=door",
                    "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "facedoor.yaml"
    config.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "models": str(real_models),
                                      "store": str(tmp_path / "store.db"),
                                      "web": {"host": "0.0.0.0", "port": port, "tls_cert": str(cert),
                                              "tls_key": str(key)}}))
    console = subprocess.Popen([str(FACEDOOR), "--config", str(config), "web", "serve", "--no-door-watch"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(f"https://127.0.0.1:{port}/login", verify=str(cert), timeout=5)
                break
            except httpx.HTTPError:
                if console.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert page.status_code == 200 and "Sign in" in page.text
        cookie = page.headers["set-cookie"]
        assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)  # no plain HTTP beside it
    finally:
        console.terminate()
        console.wait(15)
