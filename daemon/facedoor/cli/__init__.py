"""`facedoor` command line: one module per command group in this package.

Adding a command group takes one line: put its module in `COMMAND_MODULES`. That module imports
nothing heavy at the top (so `facedoor list` never loads OpenCV, ONNX Runtime or paho) and defines

    def add_command(commands: argparse._SubParsersAction) -> None:
        parser = commands.add_parser("run", help="...", parents=[REPORTING])  # REPORTING adds --json
        parser.add_argument(...)
        parser.set_defaults(handler=_run)          # _run(args, ctx: CliContext) -> int exit code

Handlers get a `CliContext` (config with --models/--store applied, lazy pipeline and store,
`emit()` for text or `--json` lines) and raise `CliError` (or ConfigError/ModelError/StoreError)
for bad input: `main` prints one line on stderr and returns 2, never a traceback.

Exit codes, the same in `facedoor`, `facedoor-export` and `facedoor-stylize`: 0 ok, 1 no match
(`verify`), 2 bad input or a configuration, model or store fault (systemd does not restart the
door for these), 3 an unexpected error (systemd restarts the door), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from facedoor.config import DEFAULT_CONFIG_PATH, ConfigError, FacedoorConfig, load_config
from facedoor.models import ModelError
from facedoor.store import StoreError

if TYPE_CHECKING:
    from facedoor.pipeline import FacePipeline
    from facedoor.store import EmbeddingStore

log = logging.getLogger(__name__)

# Command groups (each module defines `add_command(commands)`); one line each.
COMMAND_MODULES: tuple[str, ...] = (
    "facedoor.cli.recognition",
    "facedoor.cli.cohort",
    "facedoor.cli.audit",
    "facedoor.cli.homeassistant",
    "facedoor.cli.run",
    "facedoor.cli.demo",
    "facedoor.cli.signing",
    "facedoor.cli.fleet",
    "facedoor.cli.reference",
    "facedoor.cli.web",
    "facedoor.cli.factors",
)

EXIT_OK, EXIT_NO_MATCH, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# Parent parser for commands that report: gives them `--json` (one JSON object per line).
REPORTING = argparse.ArgumentParser(add_help=False)
REPORTING.add_argument(
    "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object per line on stdout"
)


class CliError(Exception):
    """Bad input on the command line: printed as one line on stderr, exit code 2."""


@dataclass
class CliContext:
    """What a subcommand handler needs: the effective config and lazily opened resources."""

    config: FacedoorConfig
    json: bool = False
    _pipeline: FacePipeline | None = field(default=None, repr=False)
    _store: EmbeddingStore | None = field(default=None, repr=False)

    def pipeline(self, threads: int | None = None) -> FacePipeline:
        """The face pipeline from the configured models directory (hash-checked once); THREADS, on the
        first call, overrides the ONNX Runtime threads of each session (`FacePipeline.from_config`)."""
        if self._pipeline is None:
            from facedoor.pipeline import FacePipeline

            self._pipeline = FacePipeline.from_config(self.config, threads)
        return self._pipeline

    def store(self, *, create: bool = False) -> EmbeddingStore:
        """The embedding store bound to the loaded encoder; CREATE allows a new file."""
        if self._store is None:
            from facedoor.store import EmbeddingStore

            path = self.config.store
            if not create and not path.exists():
                raise CliError(f"no embedding store at {path}: "
                               "enrol someone first with `facedoor enroll NAME IMAGE...`")
            self._store = EmbeddingStore(path, self.encoder_sha256())
        return self._store

    def encoder_sha256(self) -> str:
        """The configured encoder's SHA-256: from the loaded pipeline, else the manifest (no hashing)."""
        if self._pipeline is not None:
            return self._pipeline.encoder_sha256
        from facedoor.models import Manifest

        manifest = Manifest.load(self.config.models)
        return manifest.entry(manifest.encoder_name(self.config.recognition.encoder)).sha256

    def emit(self, record: dict[str, Any], text: str, file: TextIO | None = None) -> None:
        """Report one result: RECORD as a JSON line with --json, else the human TEXT (on FILE, default stdout)."""
        print(json.dumps(record, sort_keys=False) if self.json else text, file=file or sys.stdout, flush=True)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="facedoor", description="Face-recognition door unit: enrol faces, verify, identify, run the door."
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help=f"YAML configuration (default: {DEFAULT_CONFIG_PATH} when it exists, else built-in defaults)",
    )
    parser.add_argument("--models", type=Path, default=None, help="models directory (overrides config `models`)")
    parser.add_argument("--store", type=Path, default=None, help="embedding store file (overrides config `store`)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_command(commands)
    return parser


def _effective_config(args: argparse.Namespace) -> FacedoorConfig:
    path = args.config
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    config = load_config(path)
    overrides = {k: v for k, v in (("models", args.models), ("store", args.store)) if v is not None}
    return config.model_copy(update=overrides) if overrides else config


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ARGV, run the subcommand and return its exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx: CliContext | None = None
    try:
        ctx = CliContext(config=_effective_config(args), json=bool(args.json))
        handler: Callable[[argparse.Namespace, CliContext], int] = args.handler
        return handler(args, ctx)
    except (CliError, ConfigError, ModelError, StoreError) as exc:
        print(f"facedoor {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"facedoor {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # last resort: one line (traceback with -v); a code systemd restarts on
        log.error("unexpected error", exc_info=args.verbose)
        print(f"facedoor {args.command}: internal error: {type(exc).__name__}: {exc} (run with -v for details)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
