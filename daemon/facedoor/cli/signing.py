"""`facedoor check-message`: verify signed door messages as a consumer would (facedoor.signing).

Two ways to read: a FILE (or standard input) of messages checked as one batch, or `--follow`:
standard input line by line as the messages arrive, each verdict printed (and flushed) before
the next line is read, so it can sit in a pipe behind `mosquitto_sub`. With `--follow` the ids
of accepted messages are kept in a small SQLite file (`--seen`, default
`<state_dir>/seen-messages.db`) until their `expires_at_ms`, so a verifier that restarts still
refuses a replay. `--forward` prints each accepted message itself on stdout (verdicts go to
stderr): a verifier in front of a consumer that cannot check signatures, e.g.

    mosquitto_sub -t facedoor/front/decision | facedoor check-message --follow --forward \\
        | mosquitto_pub -l -t verified/front/decision
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from facedoor.cli import EXIT_NO_MATCH, EXIT_OK, REPORTING, CliContext, CliError

SEEN_FILE = "seen-messages.db"


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor check-message`."""
    parser = commands.add_parser(
        "check-message", parents=[REPORTING],
        help="verify decision messages: HMAC signature, id, expires_at_ms, replays (exit 1 if any fails)",
        description="Reads one JSON message per line (from FILE or standard input, e.g. piped from "
                    "`mosquitto_sub -t facedoor/front/decision`) and prints ok or why each is refused: "
                    "bad-signature, unsigned, expired, too-far-ahead, replay, ... A FILE is one batch; "
                    "--follow checks each line as it arrives and remembers accepted ids on disk.",
    )
    parser.add_argument("file", nargs="?", type=Path, help="messages, one per line (default: standard input)")
    parser.add_argument("--key-file", type=Path, help="HMAC key (default: mqtt.signing_key_file of the config)")
    parser.add_argument("--follow", action="store_true",
                        help="read standard input line by line as messages arrive; one flushed verdict per line")
    parser.add_argument("--seen", type=Path, metavar="FILE",
                        help=f"replay cache that survives restarts (default with --follow: <state_dir>/{SEEN_FILE}; "
                             "without --follow: memory only)")
    parser.add_argument("--forward", action="store_true",
                        help="print each accepted message on stdout, verdicts on stderr (a verifier in a pipe)")
    parser.set_defaults(handler=_check_command)


def _lines(stream: IO[bytes], limit: int) -> Iterator[bytes]:
    """Lines of STREAM as they arrive, each cut at LIMIT bytes (the rest of a longer line is
    skipped, and what is returned is then over the limit): bounded memory whatever comes in."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
                pass
        yield line


def _check_command(args: argparse.Namespace, ctx: CliContext) -> int:
    import time

    from facedoor.signing import MAX_MESSAGE_BYTES, DiskReplayCache, ReplayCache, check_message, load_key

    key_file = args.key_file or ctx.config.mqtt.signing_key_file
    if key_file is None:
        raise CliError("no key: pass --key-file or set mqtt.signing_key_file in the configuration")
    if args.follow and args.file is not None:
        raise CliError("--follow reads standard input; drop FILE (or pipe it in)")
    key = load_key(key_file)
    seen_path = args.seen or (ctx.config.state_dir / SEEN_FILE if args.follow else None)
    seen = DiskReplayCache(seen_path) if seen_path is not None else ReplayCache()
    try:
        stream = open(args.file, "rb") if args.file else sys.stdin.buffer  # noqa: SIM115  (closed below)
    except OSError as exc:
        raise CliError(f"{args.file}: cannot read ({exc.strerror})") from None
    verdicts = sys.stderr if args.forward else sys.stdout
    refused = 0
    try:
        for raw in _lines(stream, MAX_MESSAGE_BYTES + 1):
            line = raw.strip()
            if not line:
                continue
            verdict = check_message(line, key, int(time.time() * 1000), seen)
            refused += not verdict.ok
            message_id = verdict.payload.get("id") if verdict.payload else None
            text = f"{'ok' if verdict.ok else 'REFUSED'} {verdict.reason} {message_id or ''}".rstrip()
            ctx.emit({"ok": verdict.ok, "reason": verdict.reason, "id": message_id}, text, file=verdicts)
            if args.forward and verdict.ok:
                sys.stdout.buffer.write(line + b"\n")
                sys.stdout.buffer.flush()
    except OSError as exc:
        raise CliError(f"{args.file or 'standard input'}: read failed ({exc.strerror or exc})") from None
    finally:
        if args.file:
            stream.close()
        if isinstance(seen, DiskReplayCache):
            seen.close()
    return EXIT_NO_MATCH if refused else EXIT_OK
