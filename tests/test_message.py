"""The decision message: one model, its JSON Schema in docs/ kept current, signing over exactly the
published object, and the Home Assistant templates reading only fields the schema has."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from facedoor.config import parse_config
from facedoor.homeassistant import discovery_payload
from facedoor.message import EXAMPLE, DecisionMessage, json_schema
from facedoor.signing import ReplayCache, check_message

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "docs" / "decision.schema.json"
KEY = b"facedoor-example-key-0123456789abcdef"


def test_the_schema_in_docs_is_the_models() -> None:
    assert json.loads(SCHEMA.read_text()) == json_schema(), f"{SCHEMA} is out of date: run `make docs`"


def test_the_example_is_a_valid_message_with_every_field_of_the_schema() -> None:
    message = DecisionMessage.model_validate(EXAMPLE)
    assert set(message.payload()) == set(json_schema()["properties"]) - {"sig"}
    assert "sig" not in message.payload()  # unsigned: no member at all


@pytest.mark.parametrize("change", [{"decision": "open"}, {"reason": "friend"}, {"extra": 1}, {"frames": -1},
                                    {"id": ""}])
def test_a_message_outside_the_contract_is_refused(change: dict) -> None:
    with pytest.raises(ValidationError):
        DecisionMessage.model_validate({**EXAMPLE, **change})


def test_signing_covers_exactly_the_published_object() -> None:
    signed = DecisionMessage.model_validate(EXAMPLE).signed(KEY)
    raw = json.dumps(signed.payload()).encode()
    now = EXAMPLE["ts_ms"] + 1000
    assert check_message(raw, KEY, now, ReplayCache()).ok
    tampered = json.dumps({**signed.payload(), "identity": "mallory"}).encode()
    assert check_message(tampered, KEY, now, ReplayCache()).reason == "bad-signature"


def _fields(template: str) -> set[str]:
    return set(re.findall(r"(?:value_json|payload_json)\.([a-z_]+)", template))


def test_home_assistant_templates_read_only_fields_of_the_schema() -> None:
    """Every template on the decision topic (discovery) and in the shipped automation reads a field
    the schema defines: a renamed field fails here, not silently in Home Assistant."""
    cfg = parse_config({})
    properties = set(json_schema()["properties"])
    components = discovery_payload(cfg)["cmps"].values()
    on_decision = [c for c in components if c.get("state_topic") == cfg.topic("decision")]
    assert on_decision, "no discovery component reads the decision topic"
    read = set()
    for component in on_decision:
        for key in ("value_template", "json_attributes_template"):
            read |= _fields(component.get(key, ""))
    read |= _fields((REPO / "config" / "homeassistant-automation.yaml").read_text())
    assert read and read <= properties, f"templates read {sorted(read - properties)}, not in the schema"
    assert {"decision", "identity", "expires_at_ms"} <= read
