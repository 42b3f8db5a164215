"""Structured log formatters."""
from __future__ import annotations

import json
import logging

from facedoor.logs import JsonFormatter, KeyValueFormatter


def record(msg: str, **fields) -> logging.LogRecord:
    rec = logging.LogRecord("facedoor.service", logging.INFO, __file__, 1, msg, (), None)
    rec.fields = fields
    return rec


def test_key_value_lines_carry_the_fields_quoted_where_needed() -> None:
    line = KeyValueFormatter().format(record("decision unlock", identity="alice", distance=0.41234, note="two words",
                                             nothing=None))
    assert line.startswith("ts=") and "level=INFO" in line and "logger=facedoor.service" in line
    assert 'msg="decision unlock"' in line and "identity=alice" in line and "distance=0.4123" in line
    assert 'note="two words"' in line and "nothing=null" in line


def test_json_lines_are_objects_with_the_fields() -> None:
    body = json.loads(JsonFormatter().format(record("decision", identity=None, frames="3/5")))
    assert body["msg"] == "decision" and body["identity"] is None and body["frames"] == "3/5"
    assert body["ts"].endswith("Z") and body["level"] == "INFO"
