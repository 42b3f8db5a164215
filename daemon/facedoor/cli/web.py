"""`facedoor web serve | passwd`: the operator's web console (facedoor.web).

`serve` runs the console on `web.host:web.port` (127.0.0.1:8080 by default; a non-loopback
address needs `web.tls_cert`/`web.tls_key`, or `web.allow_insecure_bind`), beside the door and
sharing its store and audit log. `passwd USER` adds a console user or resets their password
(argon2id, in a 0600 file the facedoor user owns): the way back in after a lost password.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import sys
from pathlib import Path

from facedoor.cli import EXIT_OK, REPORTING, CliContext, CliError
from facedoor.config import DEFAULT_CONFIG_PATH, STORE_FILE, WebConfig


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor web serve` and `facedoor web passwd`."""
    parser = commands.add_parser("web", help="the operator's web console: visits, people, door status")
    sub = parser.add_subparsers(dest="web_command", metavar="serve|passwd", required=True)

    p = sub.add_parser("serve", help="run the console (its own process; the door keeps deciding without it)",
                       description="Serve the console over HTTP on loopback, or HTTPS with web.tls_cert.")
    p.add_argument("--host", default=None, help="address to listen on (overrides web.host)")
    p.add_argument("--port", type=int, default=None, help="TCP port (overrides web.port)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the door's state directory: audit log, console users and index (overrides state_dir)")
    p.add_argument("--no-door-watch", action="store_true",
                   help="do not subscribe to the door's health topic (the status page then shows no live data)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("passwd", parents=[REPORTING], help="add a console user or reset a password",
                       description="Sets USER's password (asked twice, or one line on stdin with "
                                   "--password-stdin) and role. Run it as the facedoor user, or as root.")
    p.add_argument("user", metavar="USER")
    p.add_argument("--role", choices=("admin", "viewer"), default="viewer",
                   help="viewer sees; admin also enrols, removes and labels (default viewer)")
    p.add_argument("--state-dir", type=Path, default=None, help="overrides state_dir (where the users file is)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin (scripts)")
    p.set_defaults(handler=_passwd)


def _need_extra() -> None:
    """Refuse in one line when the `[web]` extra (Starlette, uvicorn, argon2...) is not installed."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "jinja2", "argon2", "itsdangerous", "multipart")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise CliError(f"the web console needs {', '.join(missing)}: pip install 'facedoor[web]'")


def _with_state_dir(ctx: CliContext, state_dir: Path | None) -> None:
    """--state-dir moves the console's state, and the store with it when the store was the default one there."""
    if state_dir is not None:
        update: dict[str, Path] = {"state_dir": state_dir}
        if ctx.config.store == ctx.config.state_dir / STORE_FILE:
            update["store"] = state_dir / STORE_FILE
        ctx.config = ctx.config.model_copy(update=update)


def _passwd(args: argparse.Namespace, ctx: CliContext) -> int:
    _need_extra()
    from facedoor.web.users import UsersError, check_name, check_password, set_password, users_path

    _with_state_dir(ctx, args.state_dir)
    try:
        check_name(args.user)
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"new console password for {args.user}: ")
            check_password(password)
            if getpass.getpass("again: ") != password:
                raise CliError("the passwords differ; nothing changed")
        path = users_path(ctx.config.state_dir, ctx.config.web.users_file)
        new = set_password(path, args.user, password, args.role)
    except UsersError as exc:
        raise CliError(f"{exc}; nothing changed") from None
    except OSError as exc:
        raise CliError(f"cannot write the users file: {exc}; nothing changed") from None
    ctx.emit({"user": args.user, "role": args.role, "new": new, "file": str(path)},
             f"{'added' if new else 'reset'} console user {args.user} ({args.role}) in {path}"
             + ("" if new else "; their open sessions have ended"))
    return EXIT_OK


def _serve(args: argparse.Namespace, ctx: CliContext) -> int:
    _need_extra()
    import uvicorn
    from pydantic import ValidationError

    from facedoor.logs import setup_logging
    from facedoor.web.app import Console, ConsoleError, create_app
    from facedoor.web.users import UsersError

    _with_state_dir(ctx, args.state_dir)
    cfg = ctx.config
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        try:
            web = WebConfig.model_validate({**cfg.web.model_dump(), **overrides})
        except ValidationError as exc:
            raise CliError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        cfg = cfg.model_copy(update={"web": web})
    for path in (cfg.web.tls_cert, cfg.web.tls_key):
        if path is not None and not path.is_file():
            raise CliError(f"web TLS: {path} is not a readable file")
    setup_logging(cfg.logging.level, cfg.logging.format)
    config_path = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None)
    try:
        console = Console(cfg, config_path, watch_door=not args.no_door_watch)
    except (ConsoleError, UsersError) as exc:
        raise CliError(str(exc)) from None
    if not len(console.users):
        logging.getLogger("facedoor.web").warning(
            "no console user yet: nobody can sign in until `facedoor web passwd --role admin USER` is run")
    https = cfg.web.tls_cert is not None
    print(f"facedoor web: console on {'https' if https else 'http'}://{cfg.web.host}:{cfg.web.port}/ "
          f"(store {cfg.store}, audit {console.audit_file})", file=sys.stderr, flush=True)
    uvicorn.run(create_app(console, https=https), host=cfg.web.host, port=cfg.web.port,
                ssl_certfile=str(cfg.web.tls_cert) if https else None,
                ssl_keyfile=str(cfg.web.tls_key) if https else None,
                log_level="warning", server_header=False, proxy_headers=False, access_log=False)
    return EXIT_OK
