"""The console's request guards: CSRF tokens, the login rate limit, the request size limit and
the security headers every response carries.

- CSRF: each session holds a random token; every state-changing request (POST) must carry it (a
  `csrf` form field or an `X-CSRF-Token` header) and, when the browser sends one, an Origin of
  this very host. Anything else is refused with 403 before it is acted on.
- Login: at most N attempts per client address per minute; the attempt beyond is refused (429,
  Retry-After) and the lockout written once to the audit log.
- Size: a request body over the limit is refused (413) as soon as it is declared or read, so an
  oversize upload costs neither memory nor disk.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
MAX_CLIENTS = 10_000  # rate-limit memory bound: beyond it the oldest client records go
CSP = ("default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


class Refused(Exception):
    """A request the guards refuse: HTTP STATUS with a one-line reason."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, made on first use."""
    token = session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(request: Request, form: Mapping[str, Any]) -> None:
    """Refuse (403) a state-changing request without this session's token, or from another origin."""
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        if urlsplit(origin).netloc != host:
            raise Refused(403, f"cross-origin request from {origin[:100]} refused")
    expected = request.session.get("csrf")
    given = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    if not isinstance(expected, str) or not isinstance(given, str) or not expected \
            or not hmac.compare_digest(expected.encode(), given.encode()):
        raise Refused(403, "missing or wrong CSRF token: reload the page and try again")


class LoginLimiter:
    """At most LIMIT login attempts per client in WINDOW_S; ON_LOCKOUT hears each new lockout once."""

    def __init__(self, limit: int, on_lockout: Callable[[str], None], window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self.on_lockout = on_lockout
        self.clock = clock
        self._attempts: dict[str, deque[float]] = {}
        self._locked: set[str] = set()
        self._lock = threading.Lock()

    def attempt(self, client: str) -> None:
        """Count one attempt of CLIENT; Refused (429) when it is over the limit."""
        now = self.clock()
        with self._lock:
            times = self._attempts.pop(client, deque())
            while times and now - times[0] >= self.window_s:
                times.popleft()
            self._attempts[client] = times  # most recent last: the oldest clients go first
            if len(self._attempts) > MAX_CLIENTS:
                self._attempts.pop(next(iter(self._attempts)))
            if len(times) >= self.limit:
                retry = max(1, int(self.window_s - (now - times[0])) + 1)
                new_lockout = client not in self._locked
                self._locked.add(client)
            else:
                times.append(now)
                self._locked.discard(client)
                return
        if new_lockout:
            self.on_lockout(client)
        raise Refused(429, f"too many login attempts from {client}: wait {retry} s", {"Retry-After": str(retry)})


class BodyLimit:
    """ASGI middleware: a request body over MAX_BYTES is refused with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = PlainTextResponse(f"request larger than {self.max_bytes // (1024 * 1024)} MB refused; "
                                    "nothing was stored", 413)
        try:
            if declared is not None and int(declared) > self.max_bytes:
                await too_big(scope, receive, send)
                return
        except ValueError:
            await PlainTextResponse("bad Content-Length", 400)(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooBig()
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooBig:
            if not started:
                await too_big(scope, receive, send)


class _TooBig(Exception):
    pass


class SecurityHeaders:
    """ASGI middleware: CSP (self only, no inline script), no sniffing, no framing, no referrer, no caching."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
               (b"cache-control", b"no-store")]

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in self.HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, with_headers)
