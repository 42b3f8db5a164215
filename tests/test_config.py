"""Configuration: the shipped example, validation rules that prevent harm, and hostile YAML."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from pydantic import BaseModel

from facedoor.config import MAX_CONFIG_BYTES, ConfigError, FacedoorConfig, load_config, parse_config
from facedoor.config_docs import example_yaml
from facedoor.models import ModelEntry, threshold_warning

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "facedoor.yaml"


def test_example_config_is_complete_valid_and_the_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the models default is ./models when a checkout holds an export
    monkeypatch.delenv("FACEDOOR_MODELS", raising=False)
    text = EXAMPLE.read_text()
    assert text == example_yaml(), f"{EXAMPLE} is out of date: run `make docs` (facedoor config example)"
    assert load_config(EXAMPLE) == FacedoorConfig()
    for key in FacedoorConfig.model_fields:
        assert f"\n{key}:" in text, f"{key} missing from {EXAMPLE}"
    for section, info in FacedoorConfig.model_fields.items():
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            for key, field in model.model_fields.items():
                assert f"  {key}:" in text, f"{section}.{key} missing from {EXAMPLE}"
                assert field.description, f"{section}.{key} has no description to document it"
    for key in ("ca", "cert", "key", "topic", "payload", "lock_payload", "relock_after_s"):
        assert f"#  {key}:" in text or f"#  {key}: " in text, f"commented example of {key} missing"


def test_a_bad_value_names_file_key_and_expectation(tmp_path: Path) -> None:
    bad = tmp_path / "facedoor.yaml"
    bad.write_text(EXAMPLE.read_text().replace("min_good_frames: 3", "min_good_frames: many"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert str(bad) in message and "policy.min_good_frames" in message and "integer" in message


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "door.yaml")
    return str(err.value)


@pytest.mark.parametrize("threshold", [2.0, 3.5])
def test_a_threshold_that_matches_everyone_is_refused(threshold: float) -> None:
    assert "recognition.threshold" in _error({"recognition": {"threshold": threshold}})
    assert parse_config({"recognition": {"threshold": 1.99}}).recognition.threshold == 1.99


def test_a_threshold_above_the_manifest_operating_point_is_warned_about() -> None:
    facenet = ModelEntry.model_validate({
        "name": "facenet", "kind": "encoder", "file": "facenet.onnx", "sha256": "0" * 64,
        "input": {"name": "input", "shape": [None, 160, 160, 3], "layout": "NHWC"},
        "preprocessing": {"color": "RGB", "normalize": "per_image_standardization", "mean": [0, 0, 0], "scale": 1},
        "embedding_dim": 128, "threshold": 0.7})
    assert threshold_warning(0.7, facenet) is None and threshold_warning(0.6, facenet) is None
    assert "0.9 is above the facenet encoder's recommended 0.7" in threshold_warning(0.9, facenet)


@pytest.mark.parametrize("topic", ["zigbee2mqtt/+/set", "cmnd/door/#", "#"])
def test_a_wildcard_unlock_topic_is_refused_at_validation(topic: str) -> None:
    message = _error({"unlock_action": {"topic": topic, "payload": "ON", "lock_payload": "OFF"}})
    assert "unlock_action.topic" in message and "wildcards" in message
    assert parse_config({"unlock_action": {"topic": "cmnd/door/POWER", "payload": "ON", "lock_payload": "OFF"}})


def test_a_password_in_clear_text_to_a_remote_broker_is_refused() -> None:
    remote = {"host": "broker.lan", "username": "door", "password_file": "/etc/facedoor/mqtt-password"}
    message = _error({"mqtt": remote})
    assert "mqtt" in message and "clear text" in message and "allow_plaintext_password" in message
    assert parse_config({"mqtt": remote | {"allow_plaintext_password": True}}).mqtt.allow_plaintext_password
    assert parse_config({"mqtt": remote | {"tls": {"ca": "/etc/facedoor/ca.crt"}}}).mqtt.tls is not None
    for host in ("127.0.0.1", "127.0.0.53", "::1", "localhost"):
        assert parse_config({"mqtt": remote | {"host": host}}).mqtt.host == host
    assert parse_config({"mqtt": {"host": "broker.lan", "username": "door"}}).mqtt.password_file is None


def test_signing_key_file_is_a_path() -> None:
    cfg = parse_config({"mqtt": {"signing_key_file": "/etc/facedoor/signing-key"}})
    assert cfg.mqtt.signing_key_file == Path("/etc/facedoor/signing-key")
    assert FacedoorConfig().mqtt.signing_key_file is None


def test_billion_laughs_is_refused_before_expanding(tmp_path: Path) -> None:
    lines = ['lol: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    lines.append("door_id: *l9")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError) as err:
            load_config(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "anchors and aliases" in str(err.value) and str(bomb) in str(err.value)
    assert peak < 5_000_000 and len(str(err.value)) < 1000


def test_a_lone_alias_or_merge_key_is_refused_too(tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text("base: &b {threshold: 0.7}\nrecognition:\n  <<: *b\n")
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_config(config)


def test_huge_values_are_never_quoted_whole(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    config.write_text(f"door_id: {'x' * 20_000}\nrecognition:\n  threshold: [{', '.join(['1'] * 3000)}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    assert "door_id" in message and "recognition.threshold" in message and len(message) < 1000


def test_an_oversized_or_binary_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"door_id: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_an_unlock_action_needs_its_lock_payload() -> None:
    """The lock chases an unlock the broker did not acknowledge in time: without it, it cannot."""
    message = _error({"unlock_action": {"topic": "cmnd/door/POWER", "payload": "ON"}})
    assert "unlock_action.lock_payload" in message and "Field required" in message


def test_a_5000_deep_config_exits_2_with_one_line_naming_file_and_line(tmp_path: Path) -> None:
    """A recursion blow-up was exit 3, which systemd restarts forever; a bad config is exit 2."""
    import subprocess
    import sys

    deep = tmp_path / "deep.yaml"
    deep.write_text("door_id: front\ncamera: " + "[" * 5000 + "]" * 5000 + "\n")
    run = subprocess.run([str(Path(sys.executable).with_name("facedoor")), "--config", str(deep), "run"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and f"{deep}:2:" in run.stderr and "nested deeper than" in run.stderr
    block = tmp_path / "block.yaml"
    block.write_text("".join("  " * i + f"k{i}:\n" for i in range(40)))
    with pytest.raises(ConfigError, match=r"block\.yaml:\d+:\d+: not valid YAML: nested deeper than 32"):
        load_config(block)


@pytest.mark.parametrize("text, line", [
    ("camera:\n  source: [1, 2\nmqtt: {\n", 3),
    ("door_id: front\n\tmqtt: {}\n", 2),
    ("a: 1\nb: [\n", 3),
])
def test_a_yaml_error_is_one_line_with_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(config)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{config}:{line}:") and "not valid YAML" in message


@pytest.mark.parametrize("key, value", [
    ("discovery", {"prefix": "home/#"}), ("discovery", {"prefix": "home/+/x"}), ("discovery", {"prefix": "home//x"}),
    ("discovery", {"prefix": "/homeassistant"}), ("topic_prefix", "facedoor/"), ("topic_prefix", "a//b"),
    ("topic_prefix", "door\0"),
])
def test_a_topic_prefix_with_wildcards_or_empty_levels_is_refused(key: str, value: object) -> None:
    message = _error({"mqtt": {key: value}})
    assert f"mqtt.{key}" in message and "plain topic" in message
    assert parse_config({"mqtt": {"topic_prefix": "site/facedoor", "discovery": {"prefix": "ha/discovery"}}})


def test_audit_required_needs_the_audit_enabled() -> None:
    assert "audit.required needs audit.enabled" in _error({"audit": {"enabled": False, "required": True}})
    assert parse_config({"audit": {"required": True}}).audit.required


def test_anchor_doors_must_be_other_doors_that_can_beat_within_the_roster_age() -> None:
    fleet = {"site": "home", "key_file": "/etc/facedoor/site.key"}
    assert "lists this door itself (front)" in _error({"fleet": {**fleet, "anchor_doors": ["front"]}})
    assert "at least 3 mqtt.health_interval_s" in _error(
        {"fleet": {**fleet, "anchor_doors": ["office"], "max_roster_age_s": 20}})
    assert "fleet.anchor_doors.0" in _error({"fleet": {**fleet, "anchor_doors": ["no/slash"]}})
    cfg = parse_config({"fleet": {**fleet, "anchor_doors": ["office"], "max_roster_age_s": 30}})
    assert cfg.fleet is not None and cfg.fleet.anchor_doors == ["office"]
