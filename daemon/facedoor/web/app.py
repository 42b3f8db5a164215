"""The console's routes (Starlette, server-rendered Jinja2 pages; htmx, vendored and pinned by
hash, only refreshes parts of a page).

Access: every page but /login needs a signed-in user (a signed, HttpOnly, SameSite=Strict session
cookie that expires after `web.session_hours`); a viewer sees everything, only an admin enrols,
removes, labels and changes the crop retention; every POST carries the session's CSRF token.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from facedoor.audit import audit_path
from facedoor.config import FacedoorConfig
from facedoor.files import open_private, private_dir
from facedoor.web.actions import MAX_PHOTOS, ActionError, Actions, EnrolResult, Upload
from facedoor.web.door import DiskUsage, DoorWatch, models_info, store_info
from facedoor.web.guard import BodyLimit, LoginLimiter, Refused, SecurityHeaders, check_csrf, csrf_token
from facedoor.web.users import User, Users, users_path
from facedoor.web.visits import INDEX_FILE, Filters, VisitIndex

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
HTMX_FILE = HERE / "static" / "htmx.min.js"
HTMX_VERSION = "2.0.4"  # npm pack htmx.org@2.0.4: dist/htmx.min.js
HTMX_SHA256 = "e209dda5c8235479f3166defc7750e1dbcd5a5c1808b7792fc2e6733768fb447"
SECRET_FILE = "web-secret"
RETENTION_EVERY_S = 3600.0
COOKIE = "facedoor_session"


class ConsoleError(RuntimeError):
    """The console cannot start (a tampered vendored file, an unreadable users file...)."""


def check_vendored() -> None:
    """Refuse to serve a vendored htmx whose SHA-256 is not the pinned one."""
    actual = hashlib.sha256(HTMX_FILE.read_bytes()).hexdigest()
    if actual != HTMX_SHA256:
        raise ConsoleError(f"{HTMX_FILE}: SHA-256 {actual}, expected the pinned {HTMX_SHA256} (htmx "
                           f"{HTMX_VERSION}); reinstall facedoor")


def session_secret(state_dir: Path) -> str:
    """The cookie signing key: made once (0600 in the state directory), so sessions survive a restart."""
    path = state_dir / SECRET_FILE
    private_dir(state_dir)
    try:
        secret = path.read_text().strip()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(48)
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    with open(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret


class Console:
    """The console's state for one configuration: users, audit index, door watch, actions."""

    def __init__(self, cfg: FacedoorConfig, config_path: Path | None = None, *, watch_door: bool = True,
                 encoder_sha256: str | None = None):
        from facedoor.models import Manifest, ModelError

        check_vendored()
        self.cfg = cfg
        self.audit_file = audit_path(cfg)
        self.users = Users(users_path(cfg.state_dir, cfg.web.users_file))
        self.index = VisitIndex(self.audit_file, cfg.state_dir / INDEX_FILE)
        if encoder_sha256 is None:
            try:
                manifest = Manifest.load(cfg.models)
                encoder_sha256 = manifest.entry(manifest.encoder_name(cfg.recognition.encoder)).sha256
            except ModelError as exc:
                raise ConsoleError(str(exc)) from None
        self.actions = Actions(cfg, config_path, self.audit_file, encoder_sha256)
        self.door = DoorWatch(cfg)
        self.disk = DiskUsage(cfg, self.audit_file)
        self.limiter = LoginLimiter(cfg.web.login_attempts_per_minute, self._lockout)
        self.watch_door = watch_door
        self._stop = threading.Event()
        self._write = threading.Lock()  # one change at a time (enrolments are child processes)

    def _lockout(self, client: str) -> None:
        log.warning("login lockout for %s", client, extra={"fields": {"event": "web_lockout", "client": client}})
        try:
            self.actions.audit({"event": "web_lockout", "client": client,
                                "limit_per_minute": self.cfg.web.login_attempts_per_minute})
        except OSError as exc:
            log.error("cannot write the lockout of %s to the audit log: %s", client, exc)

    def retention_days(self) -> float | None:
        stored = self.index.setting("crop_retention_days")
        return float(stored) if stored else self.cfg.web.crop_retention_days

    def apply_retention(self) -> int | None:
        days = self.retention_days()
        if days is None:
            return None
        removed = self.actions.prune_crops(days)
        self.index.set_setting("last_prune", f"{removed} crop(s) older than {days:g} days removed at "
                                             f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.disk.forget()
        return removed

    def start(self) -> None:
        """Index the audit log, watch the door, apply the crop retention hourly."""
        self.index.refresh()
        self._stop.clear()
        if self.watch_door:
            self.door.start()
        threading.Thread(target=self._housekeeping, name="facedoor-web-retention", daemon=True).start()

    def _housekeeping(self) -> None:
        while not self._stop.wait(0 if not self.index.setting("last_prune") else RETENTION_EVERY_S):
            try:
                self.apply_retention()
            except Exception:
                log.exception("crop retention failed; retrying in an hour")
            if not self.index.setting("last_prune"):
                self.index.set_setting("last_prune", "nothing to do (no retention set)")

    def stop(self) -> None:
        """Stop the background parts (the enrolment worker, the door watch, retention); the index stays open."""
        self._stop.set()
        self.actions.worker.stop()
        self.door.stop()


def create_app(console: Console, *, https: bool = False) -> Starlette:
    """The ASGI application of CONSOLE (HTTPS: the session cookie is also Secure)."""
    cfg = console.cfg
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(htmx_version=HTMX_VERSION, door=cfg.door_id)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        user: User | None = request.scope.get("user")
        flash = request.session.pop("flash", None) if "session" in request.scope else None
        return templates.TemplateResponse(request, name, {
            "user": user, "csrf": csrf_token(request.session), "flash": flash, **context}, status_code=status)

    def flash(request: Request, text: str, ok: bool = True) -> None:
        request.session["flash"] = {"text": text[:2000], "ok": ok}

    def page(role: str | None = "viewer") -> Callable[[Callable[..., Awaitable[Response]]],
                                                      Callable[[Request], Awaitable[Response]]]:
        """Wrap an endpoint: a signed-in user (an admin for ROLE admin), CSRF on POST, refusals as pages."""
        def wrap(endpoint: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            async def handler(request: Request) -> Response:
                try:
                    if role is not None:
                        user = console.users.lookup(str(request.session.get("user", "")),
                                                    str(request.session.get("fp", "")))
                        if user is None:
                            request.session.pop("user", None)
                            if request.method == "GET":
                                return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)
                            raise Refused(401, "not signed in (or the session ended): sign in again")
                        request.scope["user"] = user
                        if role == "admin" and user.role != "admin":
                            raise Refused(403, f"{user.name} is a viewer: only an admin may change this")
                    form: Any = {}
                    if request.method == "POST":
                        form = await request.form(max_files=MAX_PHOTOS, max_fields=32)
                        try:
                            check_csrf(request, form)
                            return await endpoint(request, form)
                        finally:
                            await form.close()
                    return await endpoint(request, form)
                except Refused as exc:
                    if "text/html" not in request.headers.get("accept", ""):
                        return PlainTextResponse(exc.reason, exc.status, exc.headers)
                    response = render(request, "message.html", exc.status, title="Refused", text=exc.reason)
                    response.headers.update(exc.headers)
                    return response
            return handler
        return wrap

    # -- sign in ----------------------------------------------------------------------------
    @page(role=None)
    async def login(request: Request, form: Any) -> Response:
        if request.method == "GET":
            return render(request, "login.html", next=_safe_next(request.query_params.get("next")),
                          no_users=len(console.users) == 0)
        client = request.client.host if request.client else "unknown"
        console.limiter.attempt(client)
        name, password = str(form.get("user", ""))[:64], str(form.get("password", ""))[:2048]
        user = await run_in_threadpool(console.users.authenticate, name, password)
        if user is None:
            log.warning("failed console login for %r from %s", name, client)
            return render(request, "login.html", 401, next=_safe_next(form.get("next")), error="wrong user or password")
        request.session.clear()  # a fresh session (and CSRF token) at every sign-in: no fixation
        request.session.update({"user": user.name, "fp": user.fingerprint})
        csrf_token(request.session)
        return RedirectResponse(_safe_next(form.get("next")), 303)

    @page()
    async def logout(request: Request, form: Any) -> Response:
        request.session.clear()
        return RedirectResponse("/login", 303)

    # -- visits -------------------------------------------------------------------------------
    @page()
    async def visits(request: Request, form: Any) -> Response:
        q = request.query_params
        filters = Filters(q.get("person") or None, q.get("decision") or None, q.get("from") or None,
                          q.get("to") or None)
        before = None
        if q.get("before"):
            try:
                ts, seq = q["before"].split(".")
                before = (int(ts), int(seq))
            except ValueError:
                raise Refused(400, "bad page cursor") from None

        def query() -> Any:
            console.index.refresh()
            rows, more = console.index.page(filters, before)
            return rows, more, console.index.count(filters), console.index.identities(), console.index.reasons()
        try:
            rows, more, total, people, reasons = await run_in_threadpool(query)
        except ValueError:
            raise Refused(400, "bad date: use YYYY-MM-DD") from None
        params = {k: v for k, v in (("person", filters.identity), ("decision", filters.decision),
                                    ("from", filters.day_from), ("to", filters.day_to)) if v}
        older = "/visits?" + urlencode({**params, "before": f"{more[0]}.{more[1]}"}) if more else None
        template = "_visits_table.html" if request.headers.get("hx-request") else "visits.html"
        return render(request, template, visits=rows, older=older, total=total, people=people, reasons=reasons,
                      filters=filters, first_page=before is None, newest="/visits?" + urlencode(params))

    @page()
    async def crop(request: Request, form: Any) -> Response:
        visit = console.index.get(request.path_params["seq"])
        path = console.index.crop_file(visit, request.path_params["n"]) if visit else None
        if path is None:
            return PlainTextResponse("no such crop", 404)
        return FileResponse(path, media_type="image/jpeg")

    def visit_or_404(request: Request) -> Any:
        visit = console.index.get(request.path_params["seq"])
        if visit is None:
            raise Refused(404, "no such visit (the audit log may have rotated it away)")
        return visit

    @page(role="admin")
    async def this_is(request: Request, form: Any) -> Response:
        visit = visit_or_404(request)
        if request.method == "GET":
            console.actions.worker.warm()  # the models load while the admin picks the name
            people = await run_in_threadpool(_people_names, console)
            return render(request, "confirm.html", visit=visit, action="this-is", people=people)
        name = str(form.get("name", "")).strip()
        if form.get("confirm") != "yes":
            raise Refused(400, "not confirmed: tick the confirmation box")
        crop_path = console.index.crop_file(visit, 0)
        try:
            with console._write:
                result = await run_in_threadpool(console.actions.this_is, visit, name, crop_path,
                                                 request.scope["user"].name)
        except ActionError as exc:
            raise Refused(400, str(exc)) from None
        return report(request, result, "/visits")

    @page(role="admin")
    async def not_x(request: Request, form: Any) -> Response:
        visit = visit_or_404(request)
        if request.method == "GET":
            return render(request, "confirm.html", visit=visit, action="not-x")
        if form.get("confirm") != "yes":
            raise Refused(400, "not confirmed: tick the confirmation box")
        try:
            with console._write:
                size = await run_in_threadpool(console.actions.was_not, visit, request.scope["user"].name)
        except (ActionError, OSError) as exc:
            raise Refused(400, str(exc)) from None
        flash(request, f"this face joined the look-alike cohort against {visit['identity']} ({size} in the cohort): "
                       "it is denied from now on; recorded in the audit log")
        return RedirectResponse("/visits", 303)

    def report(request: Request, result: EnrolResult, back: str) -> Response:
        if result.ok:
            flash(request, f"{result.message} ({result.seconds:.1f} s)")
            return RedirectResponse(back, 303)
        return render(request, "message.html", 422, title="Nothing enrolled", text=result.message,
                      rejected=result.rejected)

    # -- people -------------------------------------------------------------------------------
    @page()
    async def people(request: Request, form: Any) -> Response:
        if request.scope["user"].role == "admin":
            console.actions.worker.warm()  # the models load while the admin picks photos
        members, cohort = await run_in_threadpool(_people, console)
        return render(request, "people.html", members=members, cohort=cohort,
                      max_mb=cfg.web.max_upload_mb, max_photos=MAX_PHOTOS)

    @page(role="admin")
    async def enrol(request: Request, form: Any) -> Response:
        name = str(form.get("name", "")).strip()
        files = [f for f in form.getlist("photos") if isinstance(f, UploadFile) and (f.filename or f.size)]
        if not files:
            raise Refused(400, "choose at least one photo")
        if len(files) > MAX_PHOTOS:
            raise Refused(400, f"{len(files)} photos: at most {MAX_PHOTOS} at a time")
        tmp = tempfile.mkdtemp(prefix="facedoor-web-")
        try:
            uploads = []
            for i, f in enumerate(files):
                target = Path(tmp) / f"photo-{i:02d}"  # the browser's file name is only shown
                with open(open_private(target, os.O_WRONLY), "wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, f.file, out, 1 << 20)
                uploads.append(Upload((f.filename or f"photo {i + 1}")[:200], target))
            try:
                with console._write:
                    result = await run_in_threadpool(console.actions.enrol, name, uploads, request.scope["user"].name)
            except ActionError as exc:
                raise Refused(400, str(exc)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return report(request, result, "/people")

    @page(role="admin")
    async def remove(request: Request, form: Any) -> Response:
        name = str(form.get("name", ""))
        if form.get("confirm") != "yes":
            raise Refused(400, "not confirmed: tick the confirmation box")
        try:
            with console._write:
                removed = await run_in_threadpool(console.actions.remove, name, request.scope["user"].name)
        except ActionError as exc:
            raise Refused(400, str(exc)) from None
        flash(request, f"removed {name} ({removed} embedding(s)); the door stops matching them within a second")
        return RedirectResponse("/people", 303)

    # -- door status --------------------------------------------------------------------------
    def status_context() -> dict[str, Any]:
        console.index.refresh()
        return {"health": console.door.health if console.door.reporting() else None, "watch": console.door,
                "broker": console.door.broker_state(), "models": models_info(cfg), "store": store_info(cfg.store),
                "usage": console.disk.usage(), "last": console.index.last_decision(),
                "retention": console.retention_days(), "last_prune": console.index.setting("last_prune"),
                "store_path": cfg.store, "audit_file": console.audit_file}

    @page()
    async def status(request: Request, form: Any) -> Response:
        context = await run_in_threadpool(status_context)
        template = "_status_panel.html" if request.headers.get("hx-request") else "status.html"
        return render(request, template, **context)

    @page(role="admin")
    async def retention(request: Request, form: Any) -> Response:
        raw = str(form.get("days", "")).strip()
        try:
            days = float(raw) if raw else None
        except ValueError:
            raise Refused(400, f"retention: expected a number of days, got {raw[:20]!r}") from None
        if days is not None and not 0 < days <= 3650:
            raise Refused(400, "retention: between 0 and 3650 days")
        console.index.set_setting("crop_retention_days", None if days is None else repr(days))
        removed = await run_in_threadpool(console.apply_retention)
        if removed is None:
            flash(request, "crop retention off: crops are kept as long as the audit log")
        else:
            flash(request, f"crop retention {days:g} days: {removed} crop(s) removed")
        return RedirectResponse("/status", 303)

    async def root(request: Request) -> Response:
        return RedirectResponse("/visits", 303)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.get_running_loop().run_in_executor(None, console.start)
        try:
            yield
        finally:
            console.stop()

    routes = [
        Route("/", root),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/visits", visits),
        Route("/visits/{seq:int}/crop/{n:int}", crop),
        Route("/visits/{seq:int}/this-is", this_is, methods=["GET", "POST"]),
        Route("/visits/{seq:int}/not-x", not_x, methods=["GET", "POST"]),
        Route("/people", people),
        Route("/people/enrol", enrol, methods=["POST"]),
        Route("/people/remove", remove, methods=["POST"]),
        Route("/status", status),
        Route("/status/retention", retention, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    body_limit = (cfg.web.max_upload_mb * 4 + 1) * 1024 * 1024
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(BodyLimit, max_bytes=body_limit),
        Middleware(SessionMiddleware, secret_key=session_secret(cfg.state_dir), session_cookie=COOKIE,
                   max_age=int(cfg.web.session_hours * 3600), same_site="strict", https_only=https),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _safe_next(value: Any) -> str:
    """A local path to go to after sign-in; anything else (another site, a scheme) goes to /visits."""
    text = str(value or "")
    if not text.startswith("/") or text.startswith("//") or "\\" in text or any(ord(c) < 32 for c in text):
        return "/visits"
    return text[:300]


def _people_names(console: Console) -> list[str]:
    from facedoor.store import EmbeddingStore, StoreError

    try:
        with EmbeddingStore(console.cfg.store, console.actions.encoder_sha256, create=False, readonly=True) as store:
            return [i.name for i in store.identities()]
    except StoreError:
        return []


def _people(console: Console) -> tuple[list[dict[str, Any]], int]:
    from facedoor.store import EmbeddingStore, StoreError

    try:
        with EmbeddingStore(console.cfg.store, console.actions.encoder_sha256, create=False, readonly=True) as store:
            members = [{"identity": i, "templates": store.templates(i.name)} for i in store.identities()]
            return members, len(store.cohort()[0])
    except StoreError as exc:
        if not console.cfg.store.exists():
            return [], 0
        raise Refused(500, str(exc)) from None
