"""`facedoor audit`: print the local audit log of door decisions."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facedoor.cli import REPORTING, CliContext, CliError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor audit`."""
    parser = commands.add_parser(
        "audit", parents=[REPORTING], help="print the local audit log of door decisions",
        description="Print the audit log (<state_dir>/audit.jsonl and its rotations), oldest first.",
    )
    parser.add_argument("--since", metavar="WHEN",
                        help="only entries at or after WHEN: ISO 8601 (2024-05-01T08:00) or an age (30m, 2h, 7d)")
    parser.add_argument("--path", type=Path, help="audit file to read (default: from the config)")
    parser.set_defaults(handler=_audit_command)


def _audit_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.audit import audit_path, format_table, log_files, parse_time, read_entries

    since = None
    if args.since:
        try:
            since = parse_time(args.since)
        except ValueError:
            raise CliError(f"--since: expected ISO 8601 time or an age like 30m, 2h, 7d; got {args.since!r}") from None
    path = args.path or audit_path(ctx.config)
    if not log_files(path):
        if args.path is not None:
            raise CliError(f"no audit log at {path}")
        print(f"no audit entries yet ({path} does not exist)", file=sys.stderr)
        return 0
    try:
        entries = read_entries(path, since)
        if ctx.json:
            for entry in entries:
                print(json.dumps(entry))
        else:
            print(format_table(list(entries)))
    except OSError as exc:
        raise CliError(f"cannot read audit log {path}: {exc.strerror or exc}") from None
    return 0
