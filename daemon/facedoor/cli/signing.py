"""`facedoor check-message`: verify signed door messages as a consumer would (facedoor.signing)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facedoor.cli import EXIT_NO_MATCH, EXIT_OK, REPORTING, CliContext, CliError


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor check-message`."""
    parser = commands.add_parser(
        "check-message", parents=[REPORTING],
        help="verify decision messages: HMAC signature, id, expires_at_ms, replays (exit 1 if any fails)",
        description="Reads one JSON message per line (from FILE or standard input, e.g. piped from "
                    "`mosquitto_sub -t facedoor/front/decision`) and prints ok or why each is refused: "
                    "bad-signature, unsigned, expired, replay, ... Replays are caught within one run.",
    )
    parser.add_argument("file", nargs="?", type=Path, help="messages, one per line (default: standard input)")
    parser.add_argument("--key-file", type=Path, help="HMAC key (default: mqtt.signing_key_file of the config)")
    parser.set_defaults(handler=_check_command)


def _check_command(args: argparse.Namespace, ctx: CliContext) -> int:
    import time

    from facedoor.signing import ReplayCache, check_message, load_key

    key_file = args.key_file or ctx.config.mqtt.signing_key_file
    if key_file is None:
        raise CliError("no key: pass --key-file or set mqtt.signing_key_file in the configuration")
    key = load_key(key_file)
    try:
        lines = args.file.read_bytes().splitlines() if args.file else sys.stdin.buffer.read().splitlines()
    except OSError as exc:
        raise CliError(f"{args.file}: cannot read ({exc.strerror})") from None
    seen = ReplayCache()
    refused = 0
    for line in (raw.strip() for raw in lines):
        if not line:
            continue
        verdict = check_message(line, key, int(time.time() * 1000), seen)
        refused += not verdict.ok
        message_id = verdict.payload.get("id") if verdict.payload else None
        ctx.emit({"ok": verdict.ok, "reason": verdict.reason, "id": message_id},
                 f"{'ok' if verdict.ok else 'REFUSED'} {verdict.reason} {message_id or ''}".rstrip())
    return EXIT_NO_MATCH if refused else EXIT_OK
