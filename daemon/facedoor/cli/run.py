"""`facedoor run`: the door service (facedoor.service), systemd-ready."""
from __future__ import annotations

import argparse

from facedoor.cli import CliContext, CliError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor run`."""
    parser = commands.add_parser(
        "run", help="run the door service: camera -> recognition -> MQTT decisions (systemd-ready)",
        description="Watch the camera, decide, publish unlock/deny decisions over MQTT. "
                    "SIGHUP reloads the store; SIGTERM/SIGINT stop cleanly. Exit 2: configuration, "
                    "model or store fault (not restarted); 3: unexpected error (systemd restarts).",
    )
    parser.add_argument("--source", default=None,
                        help="camera source overriding camera.source: V4L2 index or /dev/videoN, "
                             "rtsp:// or http:// URL, or a video file")
    parser.add_argument("--loop", action="store_true", default=None,
                        help="restart a video file at its end instead of stopping")
    parser.set_defaults(handler=_run_command)


def _run_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.camera import CameraError
    from facedoor.service import run_daemon

    try:
        return run_daemon(ctx.config, source=args.source, loop=args.loop)
    except CameraError as exc:
        raise CliError(str(exc)) from None
