"""Structured log formatters and the shipped example configuration."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from facedoor.config import ConfigError, FacedoorConfig, load_config
from facedoor.logs import JsonFormatter, KeyValueFormatter

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "facedoor.yaml"


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


def test_example_config_is_complete_valid_and_the_defaults() -> None:
    text = EXAMPLE.read_text()
    assert load_config(EXAMPLE) == FacedoorConfig()
    for key in FacedoorConfig.model_fields:
        assert f"\n{key}:" in text, f"{key} missing from {EXAMPLE}"
    for section in ("camera", "recognition", "policy", "mqtt", "audit", "logging"):
        for key in type(getattr(FacedoorConfig(), section)).model_fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from {EXAMPLE}"
    for key in ("ca", "cert", "key", "topic", "payload", "lock_payload", "relock_after_s"):
        assert f"#  {key}:" in text or f"#  {key}: " in text, f"commented example of {key} missing"


def test_a_bad_value_names_file_key_and_expectation(tmp_path: Path) -> None:
    bad = tmp_path / "facedoor.yaml"
    bad.write_text(EXAMPLE.read_text().replace("frames_required: 3", "frames_required: many"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert str(bad) in message and "policy.frames_required" in message and "integer" in message
