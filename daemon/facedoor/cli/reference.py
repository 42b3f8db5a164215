"""`facedoor config example` and `facedoor schema decision`: the reference texts, generated.

The example configuration comes from the config models' descriptions (facedoor.config_docs) and
the decision message's JSON Schema from its model (facedoor.message); config/facedoor.yaml and
docs/decision.schema.json are these commands' output (`make docs`), checked by the tests.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from facedoor.cli import CliContext


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `facedoor config` and `facedoor schema`."""
    config = commands.add_parser("config", help="print the commented example configuration (every key, its "
                                 "default and what it does)")
    config.add_argument("what", choices=("example",), help="example: the commented defaults")
    config.add_argument("-o", "--out", type=Path, help="write to this file instead of stdout")
    config.set_defaults(handler=_config)
    schema = commands.add_parser("schema", help="print the JSON Schema of a message the door publishes")
    schema.add_argument("what", choices=("decision",), help="decision: <prefix>/<door>/decision")
    schema.add_argument("-o", "--out", type=Path, help="write to this file instead of stdout")
    schema.set_defaults(handler=_schema)


def _write(text: str, out: Path | None) -> int:
    if out is None:
        print(text, end="")
    else:
        out.write_text(text)
    return 0


def _config(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.config_docs import example_yaml

    return _write(example_yaml(), args.out)


def _schema(args: argparse.Namespace, ctx: CliContext) -> int:
    from facedoor.message import json_schema

    return _write(json.dumps(json_schema(), indent=2) + "\n", args.out)
