"""`facedoor demo` end to end: real models, real broker, real video; enrolled in, strangers out."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from facedoor.cli import main
from facedoor.demo.runner import format_table
from facedoor.models import Manifest


@pytest.mark.slow
def test_demo_lets_enrolled_people_in_and_keeps_strangers_out(real_models: Path, celebrity_dir: Path,
                                                               tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo-out"
    code = main(["--models", str(real_models), "demo", "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert code == 0, printed
    assert results["ok"] and results["threshold"] == 0.7  # the product's default, as a real door runs
    outcomes = results["outcomes"]
    enrolled = [o for o in outcomes if o["enrolled"]]
    strangers = [o for o in outcomes if not o["enrolled"]]
    assert len(enrolled) >= 4 and strangers  # 5, or 4 and a held-out stranger without ../shared
    for o in enrolled:
        assert o["decision"] == "unlock" and o["identity"] == o["visitor"], o
        assert o["distance"] < results["threshold"] and o["latency_ms"] > 0
    assert all(o["decision"] != "unlock" for o in strangers)
    unlocks = [d for d in results["decisions"] if d["decision"] == "unlock"]
    assert sorted(d["identity"] for d in unlocks) == sorted(o["visitor"] for o in enrolled)  # one per visit
    assert results["unlock_actions"] == len(unlocks) and results["retained_actions"] == 0
    assert all(d["expires_at_ms"] == d["ts_ms"] + 1000 * d["ttl_s"] for d in results["decisions"])
    assert results["ha_discovery_messages"] >= 1
    # the audit log holds every decision, the contact sheet is a real image, the table is printed
    audit = [json.loads(line) for line in Path(results["audit_log"]).read_text().splitlines()]
    assert sorted(e["id"] for e in audit) == sorted(d["id"] for d in results["decisions"])
    sheet = cv2.imread(results["contact_sheet"])
    assert sheet is not None and sheet.shape[0] > 300 and sheet.shape[1] > 300
    assert "VISITOR" in printed and "strangers kept out" in printed
    # it says which encoder the door ran: the models' default
    encoder = Manifest.load(real_models).default_encoder
    assert results["encoder"] == encoder and f"encoder: {encoder} (" in printed and "the models' default" in printed


def test_demo_table_marks_wrong_outcomes() -> None:
    from facedoor.demo.runner import Outcome

    table = format_table([
        Outcome("alice", True, "unlock alice", "unlock", "alice", 0.41, 30.0, 35.0, 3.0, True),
        Outcome("mallory", False, "no unlock", "unlock", "alice", 0.69, 30.0, None, 9.0, False),
    ])
    lines = table.splitlines()
    assert lines[0].split()[0] == "VISITOR" and "ok" in lines[1]
    assert "WRONG (expected no unlock)" in lines[2]


def test_demo_without_models_or_exporter_is_a_clear_error(tmp_path: Path, monkeypatch, capsys) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorflow", "tf2onnx") else real_find_spec(name, *a))
    assert main(["--models", str(tmp_path / "models"), "demo", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install '.[export]'" in err
