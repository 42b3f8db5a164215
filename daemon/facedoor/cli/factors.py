"""`facedoor pin-hash`: a member's PIN line for the second-factor PIN file (facedoor.factors)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from facedoor.cli import EXIT_OK, CliContext, CliError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor pin-hash`."""
    parser = commands.add_parser(
        "pin-hash", help="hash a member's keypad PIN (scrypt) for policy.second_factor.pin.file",
        description="Reads the PIN (4-12 digits) from the terminal (asked twice) or one line of standard "
                    "input, and prints MEMBER:scrypt$... ; with --file, appends the line to that file, "
                    "created owner-only (0600). The PIN itself is never stored or printed.",
    )
    parser.add_argument("member", help="the enrolled member's name, as in `facedoor list`")
    parser.add_argument("--file", type=Path, default=None,
                        help="append to this PIN file (e.g. the configured policy.second_factor.pin.file)")
    parser.set_defaults(handler=_pin_hash_command)


def _read_pin() -> str:
    if sys.stdin.isatty():
        import getpass

        pin = getpass.getpass("PIN: ")
        if getpass.getpass("PIN again: ") != pin:
            raise CliError("the two PINs differ; nothing written")
        return pin
    return sys.stdin.readline().strip()


def _pin_hash_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.config import ConfigError
    from facedoor.factors import hash_pin, load_pin_file, valid_pin
    from facedoor.files import open_private

    member = args.member
    if not member or member != member.strip() or len(member) > 64:
        raise CliError(f"member name {member!r}: 1-64 characters without surrounding spaces")
    pin = _read_pin()
    if not valid_pin(pin):
        raise CliError("a PIN is 4-12 digits; nothing written")
    line = f"{member}:{hash_pin(pin)}"
    if args.file is None:
        print(line)
        return EXIT_OK
    if args.file.exists():
        try:
            if member in load_pin_file(args.file):
                raise CliError(f"{args.file} already holds a PIN for {member!r}; remove its line first")
        except ConfigError as exc:
            if "holds no PIN" not in str(exc):
                raise
    fd = open_private(args.file, os.O_WRONLY | os.O_APPEND)
    with os.fdopen(fd, "a") as fh:
        fh.write(line + "\n")
    ctx.emit({"member": member, "file": str(args.file)}, f"PIN of {member} added to {args.file}")
    return EXIT_OK
