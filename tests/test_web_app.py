"""The console's routes through the ASGI test client: sign-in, roles, CSRF, the login rate limit,
bad uploads, path tricks, paging and filters. No face models here (tests/test_web_browser.py
enrols with the real ones)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from facedoor.audit import encode_embedding
from facedoor.store import EmbeddingStore
from facedoor.web.app import COOKIE, HTMX_FILE, HTMX_SHA256, ConsoleError, check_vendored
from web_support import (
    ENCODER,
    PASSWORD,
    client_for,
    console_config,
    csrf_of,
    make_console,
    sign_in,
    visit,
    write_audit,
)


@pytest.fixture
def console(tmp_path: Path):
    cfg = console_config(tmp_path / "state")
    with EmbeddingStore(cfg.store, ENCODER) as store:
        store.enroll("bob", np.eye(1, 128, dtype=np.float32), ["1" * 64])
    write_audit(cfg.state_dir / "audit.jsonl", [visit(i) for i in range(3)] + [
        visit(3, decision="unlock", reason="match", identity="bob", distance=0.41,
              embedding=encode_embedding(np.eye(1, 128, 5, dtype=np.float32)[0]))])
    return make_console(cfg)


def test_nothing_is_seen_without_signing_in(console) -> None:
    with client_for(console) as client:
        for path in ("/visits", "/people", "/status", "/visits/1/crop/0", "/visits/1/this-is"):
            page = client.get(path)
            assert page.url.path == "/login" and "Sign in" in page.text, path
        assert client.post("/people/remove", data={"name": "bob", "confirm": "yes"}).status_code == 401
    with EmbeddingStore(console.cfg.store, ENCODER, readonly=True) as store:
        assert [i.name for i in store.identities()] == ["bob"]


def test_session_cookie_is_signed_httponly_strict_and_expires(console) -> None:
    with client_for(console) as client:
        token = csrf_of(client.get("/login").text)
        page = client.post("/login", data={"user": "alice", "password": PASSWORD, "csrf": token},
                           follow_redirects=False)
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie and "samesite=strict" in cookie
        assert f"Max-Age={12 * 3600}" in cookie
        value = cookie.split(";")[0].split("=", 1)[1]
        client.cookies.set(COOKIE, value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))  # forged signature
        assert client.get("/visits").url.path == "/login"


def test_wrong_password_and_unknown_user_are_refused_alike(console) -> None:
    with client_for(console) as client:
        token = csrf_of(client.get("/login").text)
        for user in ("alice", "mallory"):
            page = client.post("/login", data={"user": user, "password": "wrong password!", "csrf": token})
            assert page.status_code == 401 and "wrong user or password" in page.text
        assert client.get("/visits").url.path == "/login"


def test_wrong_password_100_times_locks_out_and_is_audited(console) -> None:
    with client_for(console) as client:
        token = csrf_of(client.get("/login").text)
        codes = [client.post("/login", data={"user": "alice", "password": f"guess {i}", "csrf": token},
                             follow_redirects=False).status_code for i in range(100)]
        assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
        locked = client.post("/login", data={"user": "alice", "password": PASSWORD, "csrf": token})
        assert locked.status_code == 429 and "too many login attempts" in locked.text
        assert 1 <= int(locked.headers["retry-after"]) <= 61
    lockouts = [json.loads(line) for line in console.audit_file.read_text().splitlines() if "web_lockout" in line]
    assert len(lockouts) == 1 and lockouts[0]["client"] == "testclient"  # once per lockout, not 95 times


def test_login_after_the_window_passes(console) -> None:
    now = [1000.0]
    console.limiter.clock = lambda: now[0]
    with client_for(console) as client:
        token = csrf_of(client.get("/login").text)
        for _ in range(6):
            client.post("/login", data={"user": "alice", "password": "nope nope nope", "csrf": token})
        now[0] += 61
        assert sign_in(client, "alice")


def test_a_post_without_or_with_a_wrong_csrf_token_is_refused(console) -> None:
    with client_for(console) as client:
        token = sign_in(client, "alice")
        for data in ({"name": "bob", "confirm": "yes"}, {"name": "bob", "confirm": "yes", "csrf": token[:-2] + "xx"}):
            page = client.post("/people/remove", data=data)
            assert page.status_code == 403 and "CSRF" in page.text
        cross = client.post("/people/remove", data={"name": "bob", "confirm": "yes", "csrf": token},
                            headers={"origin": "https://evil.example"})
        assert cross.status_code == 403
        no_token_login = client.post("/login", data={"user": "alice", "password": PASSWORD})
        assert no_token_login.status_code == 403
    with EmbeddingStore(console.cfg.store, ENCODER, readonly=True) as store:
        assert [i.name for i in store.identities()] == ["bob"]
    # the header form of the token (htmx requests) is accepted
    with client_for(console) as client:
        token = sign_in(client, "alice")
        done = client.post("/people/remove", data={"name": "bob", "confirm": "yes"}, headers={"x-csrf-token": token})
        assert done.status_code == 200 and "removed bob" in done.text


def test_a_viewer_sees_but_cannot_change_anything(console) -> None:
    with client_for(console) as client:
        token = sign_in(client, "victor")
        assert "This was not" not in client.get("/visits").text and "Enrol someone" not in client.get("/people").text
        seq = _seq(console, "visit-3")
        for path, data in (("/people/remove", {"name": "bob", "confirm": "yes"}),
                           (f"/visits/{seq}/not-x", {"confirm": "yes"}),
                           (f"/visits/{_seq(console, 'visit-0')}/this-is", {"name": "x", "confirm": "yes"}),
                           ("/status/retention", {"days": "1"})):
            page = client.post(path, data={**data, "csrf": token})
            assert page.status_code == 403 and "viewer" in page.text, path
        assert client.post("/people/enrol", data={"name": "x", "csrf": token},
                           files=[("photos", ("a.jpg", b"\xff\xd8", "image/jpeg"))]).status_code == 403
        assert client.get(f"/visits/{seq}/not-x").status_code == 403
    with EmbeddingStore(console.cfg.store, ENCODER, readonly=True) as store:
        assert [i.name for i in store.identities()] == ["bob"] and store.cohort()[0] == []


def test_this_was_not_x_puts_the_face_in_the_cohort_and_the_audit_log(console) -> None:
    with client_for(console) as client:
        token = sign_in(client, "alice")
        seq = _seq(console, "visit-3")
        assert "This was not bob" in client.get(f"/visits/{seq}/not-x").text
        assert client.post(f"/visits/{seq}/not-x", data={"csrf": token}).status_code == 400  # not confirmed
        done = client.post(f"/visits/{seq}/not-x", data={"csrf": token, "confirm": "yes"})
        assert done.status_code == 200 and "look-alike cohort against bob" in done.text
        unknown = client.post(f"/visits/{_seq(console, 'visit-0')}/not-x", data={"csrf": token, "confirm": "yes"})
        assert unknown.status_code == 400
    with EmbeddingStore(console.cfg.store, ENCODER, readonly=True) as store:
        labels, vectors = store.cohort()
    assert labels == ["not bob (visit visit-3)"] and np.allclose(vectors[0], np.eye(1, 128, 5)[0])
    events = [json.loads(line) for line in console.audit_file.read_text().splitlines() if "web_not_x" in line]
    assert events and events[0]["identity"] == "bob" and events[0]["user"] == "alice"


def test_visits_page_filters_and_pages_newest_first(tmp_path: Path) -> None:
    cfg = console_config(tmp_path / "state")
    write_audit(cfg.state_dir / "audit.jsonl",
                [visit(i, **({"decision": "unlock", "reason": "match", "identity": "bob"} if i % 3 == 0 else {}))
                 for i in range(130)])
    console = make_console(cfg)
    with client_for(console) as client:
        sign_in(client, "victor")
        page = client.get("/visits")
        ids = re.findall(r'data-id="(visit-\d+)"', page.text)
        assert ids[:3] == ["visit-129", "visit-128", "visit-127"] and len(ids) == 50 and "130 matching" in page.text
        older = re.search(r'href="(/visits\?before=[^"]+)"', page.text).group(1).replace("&amp;", "&")
        assert re.findall(r'data-id="(visit-\d+)"', client.get(older).text)[0] == "visit-79"
        bob = client.get("/visits", params={"person": "bob", "decision": "unlock"}).text
        assert "44 matching" in bob
        assert set(re.findall(r'data-id="visit-(\d+)"', bob)) <= {str(i) for i in range(0, 130, 3)}
        day, next_day = (time.strftime("%Y-%m-%d", time.localtime(t)) for t in (1_700_000_060, 1_700_086_460))
        assert "130 matching" in client.get("/visits", params={"from": day, "to": day}).text
        assert "0 matching" in client.get("/visits", params={"from": next_day}).text
        assert client.get("/visits", params={"from": "2023-13-45"}).status_code == 400
        assert client.get("/visits", params={"before": "x.y"}).status_code == 400
        fragment = client.get("/visits", headers={"hx-request": "true"}).text
        assert "<html" not in fragment and "visit-129" in fragment


def test_crops_are_served_only_from_the_crops_directory(tmp_path: Path) -> None:
    cfg = console_config(tmp_path / "state")
    crops = cfg.state_dir / "audit-crops" / "20231114"
    crops.mkdir(parents=True)
    (crops / "a.jpg").write_bytes(b"\xff\xd8face")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"secret")
    (crops / "link.jpg").symlink_to(secret)
    write_audit(cfg.state_dir / "audit.jsonl", [
        visit(0, crop=str(crops / "a.jpg")), visit(1, crop=str(secret)),
        visit(2, crop=str(crops / ".." / ".." / ".." / "secret.jpg")), visit(3, crop=str(crops / "link.jpg")),
        visit(4, crop="/etc/passwd")])
    console = make_console(cfg)
    with client_for(console) as client:
        sign_in(client, "victor")
        seqs = [_seq(console, f"visit-{i}") for i in range(5)]
        assert client.get(f"/visits/{seqs[0]}/crop/0").content == b"\xff\xd8face"
        for seq in seqs[1:]:
            assert client.get(f"/visits/{seq}/crop/0").status_code == 404
        for path in ("/visits/1/crop/7", "/visits/99999/crop/0", "/visits/../../etc/passwd",
                     "/static/../users.py", "/static/%2e%2e/users.py"):
            page = client.get(path)
            assert page.status_code == 404 and b"argon2" not in page.content, path


def test_oversize_and_odd_uploads_are_refused_and_nothing_is_stored(console) -> None:
    with client_for(console) as client:
        token = sign_in(client, "alice")
        limit = console.cfg.web.max_upload_mb * 1024 * 1024

        def enrol(files: list, name: str = "eve") -> tuple[int, str]:
            page = client.post("/people/enrol", data={"name": name, "csrf": token}, files=files)
            return page.status_code, page.text

        code, text = enrol([("photos", ("big.jpg", b"\xff\xd8" + b"\0" * (limit + 10), "image/jpeg"))])
        assert code == 422 and "larger than 16 MB" in text
        code, text = enrol([("photos", ("huge.jpg", b"\0" * (5 * limit), "image/jpeg"))])
        assert code == 413 and "nothing was stored" in text
        png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + (30000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0"
        code, text = enrol([("photos", ("bomb.png", png, "image/png"))])
        assert code == 422 and "30000x30000 pixels is above the limit" in text
        code, text = enrol([("photos", ("../../etc/passwd", b"root:x:0:0", "text/plain")),
                            ("photos", ("<script>alert(1)</script>.jpg", b"", "image/jpeg"))])
        assert code == 422 and "not a readable image" in text and "empty file" in text
        assert "<script>alert(1)" not in text and "&lt;script&gt;" in text
        code, text = enrol([("photos", ("a.jpg", b"\xff\xd8", "image/jpeg"))], name="../../x\u0000")
        assert code == 400 and "control characters" in text
        code, text = enrol([("photos", ("a.jpg", b"\xff\xd8", "image/jpeg"))] * 21)
        assert code == 400
        assert enrol([])[0] == 400
    with EmbeddingStore(console.cfg.store, ENCODER, readonly=True) as store:
        assert [i.name for i in store.identities()] == ["bob"]
    assert not list(console.cfg.state_dir.rglob("photo-*"))


def test_sign_in_redirects_only_to_local_pages(console) -> None:
    with client_for(console) as client:
        for target, expected in (("/people", "/people"), ("https://evil.example/", "/visits"),
                                 ("//evil.example/", "/visits"), ("/\\evil.example", "/visits")):
            token = csrf_of(client.get("/login").text)
            page = client.post("/login", data={"user": "victor", "password": PASSWORD, "csrf": token,
                                               "next": target})
            assert page.url.path == expected and page.url.host == "testserver", target
            client.cookies.clear()


def test_a_reset_password_ends_the_old_sessions(console) -> None:
    from facedoor.web.users import set_password

    with client_for(console) as client:
        sign_in(client, "victor")
        assert client.get("/people").url.path == "/people"
        set_password(console.users.path, "victor", "a brand new password", "viewer")
        assert client.get("/people").url.path == "/login"
        sign_in(client, "victor", "a brand new password")


def test_pages_carry_security_headers_and_the_pinned_htmx(console, tmp_path: Path) -> None:
    import hashlib

    assert hashlib.sha256(HTMX_FILE.read_bytes()).hexdigest() == HTMX_SHA256
    with client_for(console) as client:
        page = client.get("/login")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        assert client.get("/static/htmx.min.js").content == HTMX_FILE.read_bytes()


def test_a_tampered_htmx_stops_the_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("facedoor.web.app.HTMX_SHA256", "0" * 64)
    with pytest.raises(ConsoleError, match="pinned"):
        check_vendored()


def test_status_page_and_crop_retention(console) -> None:
    crops = console.cfg.state_dir / "audit-crops" / "20200101"
    crops.mkdir(parents=True)
    for i in range(3):
        (crops / f"{i}.jpg").write_bytes(b"x")
    import os
    os.utime(crops / "0.jpg", (time.time() - 10 * 86400,) * 2)
    with client_for(console) as client:
        token = sign_in(client, "alice")
        page = client.get("/status")
        assert "not reporting" in page.text and "schema 3" in page.text and "3 crops" in page.text
        assert "Last decision" in page.text and "unlock / match" in page.text
        done = client.post("/status/retention", data={"days": "5", "csrf": token})
        assert "crop retention 5 days: 1 crop(s) removed" in done.text and "2 crops" in done.text
        assert client.post("/status/retention", data={"days": "-1", "csrf": token}).status_code == 400
    assert sorted(p.name for p in crops.iterdir()) == ["1.jpg", "2.jpg"] and console.retention_days() == 5.0


def _seq(console, visit_id: str) -> int:
    console.index.refresh()
    row = console.index._db.execute("SELECT seq FROM visits WHERE id = ?", (visit_id,)).fetchone()
    assert row, visit_id
    return int(row[0])
