"""`facedoor demo`: the whole door in one command (facedoor.demo.runner)."""
from __future__ import annotations

import argparse
from pathlib import Path

from facedoor.cli import CliContext, CliError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor demo`."""
    parser = commands.add_parser(
        "demo", help="the whole door in one command: models, enrolment, walk-up video, broker, decisions",
        description="Runs the door end to end without a camera or a configuration and prints who was let in. "
                    "Needs Debian's mosquitto (a private broker is started on a free loopback port).",
    )
    parser.add_argument("-o", "--out", type=Path, default=Path("demo-out"),
                        help="output directory (default ./demo-out)")
    parser.add_argument("--strangers", type=Path, metavar="DIR",
                        help="photos of people who are not enrolled: image files, or one folder of photos per "
                             "person (e.g. LFW); without it, one of the demo's people is held out as the stranger")
    parser.add_argument("--threshold", type=float, default=None,
                        help="match threshold for the demo door (default: the product's, recognition.threshold)")
    parser.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.demo.broker import BrokerError
    from facedoor.demo.runner import DemoError, run_demo

    threshold = ctx.config.recognition.threshold if args.threshold is None else args.threshold
    if not 0 < threshold < 2:
        raise CliError(f"--threshold: expected a number in (0, 2), got {threshold:g}")
    if args.strangers is not None and not args.strangers.is_dir():
        raise CliError(f"--strangers: {args.strangers} is not a directory")
    try:
        code, _ = run_demo(args.out, ctx.config.models, threshold, args.strangers)
    except (DemoError, BrokerError) as exc:
        raise CliError(str(exc)) from None
    return code
