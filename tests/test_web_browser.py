"""The console in a real headless Chromium (Debian's `chromium`, driven by Playwright through
`executable_path`; no Playwright browser is downloaded), beside the real daemon as a subprocess
on a real Mosquitto, with the real face models.

The door watches a looping walk-up video of someone who is not enrolled. In the browser an admin
signs in, enrols a person by uploading photos, labels the stranger's denied visit "this is X"
(the next walk-up unlocks for X) and then that unlock "this was not X" (the next walk-up is
denied as a look-alike); a viewer cannot change anything and a request without the CSRF token is
refused. With FACEDOOR_WEB_SCREENSHOTS=DIR, each page is also saved there as a PNG (docs/).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon_support import FACEDOOR, Daemon, Subscriber, write_config
from facedoor.demo.broker import PrivateBroker
from facedoor.demo.walkup import Visitor, write_walkup
from web_support import PASSWORD

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
STRANGER = "elton_john"
MEMBER = "mindy_kaling"
SHOTS = os.environ.get("FACEDOOR_WEB_SCREENSHOTS")


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium installed (`make mosquitto` installs Debian's chromium)")
    return path


@dataclass
class Site:
    url: str
    state: Path
    store: Path
    sub: Subscriber
    daemon: Daemon
    console: subprocess.Popen[bytes]
    member_photos: list[Path]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pick_stranger(models: Path, celebrity_dir: Path) -> Path:
    """A val photo of STRANGER with one face big enough to be tracked in the walk-up video."""
    import cv2

    from facedoor.config import parse_config
    from facedoor.pipeline import FacePipeline

    pipeline = FacePipeline.from_config(parse_config({"models": str(models), "recognition": {"threads": 1}}))
    for photo in sorted((celebrity_dir / "val" / STRANGER).glob("*.jpg")):
        faces = pipeline.detect_still(cv2.imread(str(photo)))
        if len(faces) == 1 and faces[0].box[2] - faces[0].box[0] >= 60:
            return photo
    pytest.fail(f"no usable val photo of {STRANGER}")


@pytest.fixture(scope="module")
def site(real_models: Path, celebrity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    chromium_path()
    pytest.importorskip("playwright.sync_api", reason="Playwright (pip) not installed: pip install -e '.[web,test]'")
    from facedoor.models import Manifest
    from facedoor.store import EmbeddingStore

    work = tmp_path_factory.mktemp("web")
    state = work / "state"
    store = state / "store.db"
    EmbeddingStore(store, Manifest.load(real_models).entry("facenet").sha256).close()  # empty: all denied
    video = work / "walkup.avi"
    write_walkup(video, [Visitor(STRANGER, _pick_stranger(real_models, celebrity_dir))], visit_s=4.0, gap_s=1.5)
    broker = PrivateBroker(work / "mosquitto")
    if not broker.start():
        pytest.fail("mosquitto not installed: `make test` installs Debian's mosquitto")
    port = _free_port()
    config = write_config(state / "facedoor.yaml", real_models, store, broker.port,
                          audit={"enabled": True, "save_crops": True},
                          policy={"unknown_interval_s": 1.0, "cooldown_s": 2.0},
                          web={"port": port})
    for user, role in (("alice", "admin"), ("victor", "viewer")):
        subprocess.run([str(FACEDOOR), "--config", str(config), "web", "passwd", "--role", role,
                        "--password-stdin", user], input=PASSWORD.encode(), check=True, capture_output=True)
    sub = Subscriber("127.0.0.1", broker.port, "facedoor/front/decision")
    daemon = Daemon(config, str(video), "--loop")
    log = open(work / "console.log", "wb")
    console = subprocess.Popen([str(FACEDOOR), "--config", str(config), "web", "serve"],
                               stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and console.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        pytest.fail("the console did not start: " + (work / "console.log").read_text()[-2000:])
    photos = sorted((celebrity_dir / "train" / MEMBER).glob("*.jpg"))[:5]
    try:
        yield Site(f"http://127.0.0.1:{port}", state, store, sub, daemon, console, photos)
    finally:
        console.terminate()
        console.wait(15)
        log.close()
        daemon.terminate()
        daemon.kill()
        sub.stop()
        broker.stop()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def signed_in(browser: Any, site: Site, user: str) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(60_000)
    page.goto(site.url + "/visits")
    assert page.url.endswith("/login?next=%2Fvisits")
    shot(page, "web-login")
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/visits")
    return page


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def decision_after(site: Site, t: float, timeout: float = 90) -> dict[str, Any]:
    """The first decision naming someone (an unlock or a look-alike deny) received after T."""
    found = site.sub.wait_for(lambda m: m["recv"] > t and ('"unlock"' in m["payload"] or '"lookalike"' in m["payload"]),
                              timeout)
    assert found is not None, site.daemon.log()[-3000:]
    return json.loads(found["payload"])


def test_admin_uploads_photos_and_sees_the_person(browser: Any, site: Site) -> None:
    page = signed_in(browser, site, "alice")
    page.click("text=People")
    page.fill("input[name=name]", "mindy")
    page.set_input_files("input[name=photos]", [str(p) for p in site.member_photos])
    page.click("form[action='/people/enrol'] button[type=submit]")
    page.wait_for_selector("tr[data-person=mindy]")
    assert "enrolled mindy: 5 photo(s)" in page.inner_text(".flash")
    shot(page, "web-people")
    page.close()


def test_this_is_x_lets_x_in_at_the_next_walk_up_and_this_was_not_x_denies_that_face(
        browser: Any, site: Site) -> None:
    assert site.sub.wait_for(lambda m: '"unknown"' in m["payload"], 90), site.daemon.log()[-3000:]
    page = signed_in(browser, site, "alice")
    page.reload()
    page.wait_for_selector("text=This is…")
    page.click("text=This is…")
    page.fill("input[name=name]", "elton")
    page.check("input[name=confirm]")
    shot(page, "web-this-is")
    t_enrolled = time.time()
    page.click("button:has-text('Enrol this face')")
    page.wait_for_selector(".flash.ok")
    assert "enrolled elton" in page.inner_text(".flash")
    assert "the visit's fused view (1 new)" in page.inner_text(".flash")  # the door's own view of the visit

    unlock = decision_after(site, t_enrolled)
    assert unlock["decision"] == "unlock" and unlock["identity"] == "elton", unlock

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the door's audit writer and the console's index catch up
        page.goto(site.url + "/visits?decision=unlock")
        if page.query_selector("text=This was not elton"):
            break
        time.sleep(0.5)
    page.click("text=This was not elton")
    page.check("input[name=confirm]")
    t_labelled = time.time()
    page.click("button:has-text('Deny this face from now on')")
    page.wait_for_selector(".flash.ok")
    assert "look-alike cohort against elton" in page.inner_text(".flash")

    denied = decision_after(site, t_labelled + 0.5)
    assert (denied["decision"], denied["reason"], denied["identity"]) == ("deny", "lookalike", "elton"), denied
    later = [json.loads(m["payload"]) for m in site.sub.on("decision") if m["recv"] > t_labelled + 1.0]
    assert not any(d["decision"] == "unlock" for d in later), later
    page.goto(site.url + "/visits?decision=console")
    assert "web_not_x elton by alice" in page.inner_text("#visits")
    page.goto(site.url + "/visits")
    page.wait_for_load_state("networkidle")
    broken = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length")
    assert broken == 0 and page.evaluate("document.images.length") > 0  # the crops are served
    shot(page, "web-visits")
    page.goto(site.url + "/status")
    page.wait_for_selector("text=reporting")
    shot(page, "web-status")
    page.close()


def test_a_viewer_cannot_change_anything_and_no_csrf_token_is_refused(browser: Any, site: Site) -> None:
    viewer = signed_in(browser, site, "victor")
    viewer.goto(site.url + "/people")
    assert viewer.query_selector("form[action='/people/enrol']") is None
    assert viewer.query_selector("form[action='/people/remove']") is None
    token = viewer.get_attribute("form[action='/logout'] input[name=csrf]", "value")
    refused = viewer.request.post(site.url + "/people/remove", form={"name": "mindy", "confirm": "yes", "csrf": token})
    assert refused.status == 403 and "viewer" in refused.text()
    viewer.close()

    admin = signed_in(browser, site, "alice")
    no_token = admin.request.post(site.url + "/people/remove", form={"name": "mindy", "confirm": "yes"})
    assert no_token.status == 403 and "CSRF" in no_token.text()
    admin.goto(site.url + "/people")
    assert admin.query_selector("tr[data-person=mindy]") is not None
    admin.close()


def test_removing_a_person_reaches_the_running_door_within_a_second(browser: Any, site: Site) -> None:
    page = signed_in(browser, site, "alice")
    page.goto(site.url + "/people")
    row = page.locator("tr[data-person=elton]")
    row.locator("input[name=confirm]").check()
    t_removed = time.time()
    row.locator("button:has-text('Remove')").click()
    page.wait_for_selector(".flash.ok")
    assert "removed elton" in page.inner_text(".flash") and page.query_selector("tr[data-person=elton]") is None
    after = site.sub.wait_for(lambda m: m["recv"] > t_removed + 1.0 and '"deny"' in m["payload"], 60)
    assert after is not None, site.daemon.log()[-3000:]
    late = [json.loads(m["payload"]) for m in site.sub.on("decision") if m["recv"] > t_removed + 1.0]
    assert late and all(d["identity"] is None and d["reason"] == "unknown" for d in late), late
    page.close()
