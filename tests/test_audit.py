"""Audit log: real files, rotation within the size budget, age pruning, write failures contained."""
from __future__ import annotations

import errno
import json
import os
import stat
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from facedoor import audit
from facedoor.audit import AuditLimits, AuditLog, log_files, parse_time, prune_by_age, read_entries
from facedoor.cli import main


def decision(i: int, kind: str = "unlock", ts_ms: int | None = None) -> dict:
    return {"id": f"d{i}", "decision": kind, "identity": "alice" if kind == "unlock" else None,
            "distance": 0.41 + i / 1000, "threshold": 0.7, "frames": 3, "latency_ms": 42.5,
            **({"ts_ms": ts_ms} if ts_ms is not None else {})}


def make_log(path: Path, max_bytes: int = 1_000_000, max_age_days: float = 90, crops: bool = False) -> AuditLog:
    return AuditLog(path, AuditLimits(max_bytes=max_bytes, max_age_s=max_age_days * 86400, save_crops=crops), "front")


def test_every_decision_is_one_json_line(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    alog = make_log(path)
    for i, kind in enumerate(["unlock", "deny", "unknown"]):
        assert alog.record(decision(i, kind))
    alog.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    assert [e["decision"] for e in entries] == ["unlock", "deny", "unknown"]
    first = entries[0]
    assert first["door"] == "front" and first["identity"] == "alice" and first["frames"] == 3
    assert first["distance"] == pytest.approx(0.41) and first["latency_ms"] == 42.5
    assert first["ts"].endswith("Z") and isinstance(first["ts_ms"], int)
    assert [e["id"] for e in read_entries(path)] == ["d0", "d1", "d2"]


def test_rotation_keeps_total_within_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    alog = make_log(path, max_bytes=10_000)
    for i in range(400):
        alog.record(decision(i))
    alog.close()
    files = log_files(path)
    assert [f.name for f in files] == ["audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"]
    assert sum(f.stat().st_size for f in files) <= 10_000
    ids = [int(e["id"][1:]) for e in read_entries(path)]
    assert ids == sorted(ids) and ids[-1] == 399 and ids[0] > 0  # oldest dropped, newest kept, in order


def test_age_pruning_drops_old_files_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    now = time.time()
    old_ms, new_ms = int((now - 10 * 86400) * 1000), int((now - 3600) * 1000)
    rotated = path.with_name("audit.jsonl.1")
    rotated.write_text(json.dumps(decision(0, ts_ms=old_ms)) + "\n")
    os.utime(rotated, (now - 10 * 86400, now - 10 * 86400))
    lines = [(1, old_ms), (2, old_ms), (3, new_ms)]
    path.write_text("".join(json.dumps(decision(i, ts_ms=t)) + "\n" for i, t in lines))
    prune_by_age(path, max_age_s=7 * 86400, now=now)
    assert not rotated.exists()
    assert [e["id"] for e in read_entries(path)] == ["d3"]


def test_writer_prunes_by_age_on_start(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old_ms = int((time.time() - 3 * 86400) * 1000)
    path.write_text(json.dumps(decision(0, ts_ms=old_ms)) + "\n")
    alog = make_log(path, max_age_days=1)
    alog.record(decision(1))
    alog.close()
    assert [e["id"] for e in read_entries(path)] == ["d1"]


def test_disk_full_is_logged_and_never_raised(tmp_path: Path, monkeypatch, caplog) -> None:
    path = tmp_path / "audit.jsonl"
    real_open = audit.open_private

    def full_disk(file: Path, flags: int) -> int:
        if str(file) == str(path) and flags & os.O_APPEND:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, flags)

    monkeypatch.setattr(audit, "open_private", full_disk)
    alog = make_log(path)
    assert alog.record(decision(1, "deny"))   # the caller is unaffected
    assert alog.record(decision(2, "deny"))
    alog.flush()
    assert alog.dropped == 2 and alog.written == 0
    errors = [r for r in caplog.records if "cannot write audit log" in r.getMessage()]
    assert len(errors) == 1 and "disk full" in errors[0].getMessage()  # once per streak, not per entry
    monkeypatch.setattr(audit, "open_private", real_open)
    alog.record(decision(3))
    alog.close()
    assert [e["id"] for e in read_entries(path)] == ["d3"]  # recovers once the disk has room


def test_unwritable_state_dir_does_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")  # ENOTDIR/EEXIST, even for root
    alog = make_log(blocker / "audit.jsonl")
    assert alog.record(decision(1, "deny"))
    alog.close()
    assert alog.dropped == 1 and alog.written == 0
    assert blocker.read_text().startswith("a file")


def test_crops_saved_as_jpeg_when_enabled(tmp_path: Path) -> None:
    import cv2

    path = tmp_path / "audit.jsonl"
    alog = make_log(path, crops=True)
    crop = np.full((80, 60, 3), 128, np.uint8)
    alog.record(decision(1), crop)
    alog.record(decision(2), None)
    alog.close()
    first, second = read_entries(path)
    assert Path(first["crop"]).is_file() and cv2.imread(first["crop"]).shape == (80, 60, 3)
    assert "crop" not in second


def test_parse_time_relative_and_iso() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("30m", now) == now - timedelta(minutes=30)
    assert parse_time("2024-05-01T08:00:00Z") == datetime(2024, 5, 1, 8, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_cli_audit_since_json_and_table(tmp_path: Path, capsys) -> None:
    path = tmp_path / "audit.jsonl"
    now_ms = int(time.time() * 1000)
    path.write_text(
        json.dumps({**decision(1, ts_ms=now_ms - 5 * 3600_000), "door": "front"}) + "\n"
        + "{not json\n"
        + json.dumps({**decision(2, "deny", ts_ms=now_ms - 60_000), "door": "front"}) + "\n"
    )
    assert main(["audit", "--path", str(path), "--since", "2h", "--json"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["id"] for e in out] == ["d2"]
    assert main(["audit", "--path", str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["TIME", "DOOR", "DECISION", "IDENTITY"]
    assert "alice" in table[1] and "0.411" in table[1] and "deny" in table[2]
    assert main(["audit", "--path", str(path), "--since", "last tuesday"]) == 2
    assert "--since" in capsys.readouterr().err


def test_log_rotations_pruned_files_and_crops_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit.jsonl"
    old = os.umask(0)
    try:
        alog = make_log(path, max_bytes=40_000, crops=True)
        for i in range(100):
            alog.record(decision(i), np.full((40, 30, 3), i, np.uint8))
        alog.close()
        old_ms = int((time.time() - 3 * 86400) * 1000)
        with open(path, "r+") as fh:  # an old first line: pruning rewrites the file through a temporary
            lines = fh.readlines()
            fh.seek(0)
            fh.writelines([json.dumps(decision(-1, ts_ms=old_ms)) + "\n", *lines])
        prune_by_age(path, max_age_s=86400)
    finally:
        os.umask(old)
    assert "d-1" not in path.read_text()
    files = list((tmp_path / "state").rglob("*"))
    assert len(log_files(path)) > 1 and any(p.suffix == ".jpg" for p in files)
    modes = {p.relative_to(tmp_path): oct(stat.S_IMODE(p.stat().st_mode)) for p in [path.parent, *files]}
    assert set(modes.values()) == {"0o600", "0o700"}, modes
    assert all(mode == "0o700" for p, mode in modes.items() if (tmp_path / p).is_dir())


def test_a_write_cut_short_by_a_full_disk_leaves_no_half_line(tmp_path: Path, monkeypatch) -> None:
    """The disk fills in the middle of an entry: that entry is dropped whole, the next one is intact."""
    path = tmp_path / "audit.jsonl"
    alog = AuditLog(path, AuditLimits(max_bytes=10_000_000, max_age_s=86400.0, save_crops=False))
    alog.record(decision(1))
    alog.flush()
    real_write, calls = os.write, []

    def filling_up(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # half fits
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit.os, "write", filling_up)
    alog.record(decision(2))
    alog.flush()
    monkeypatch.setattr(audit.os, "write", real_write)
    alog.record(decision(3))
    alog.close()
    assert [e["id"] for e in read_entries(path)] == ["d1", "d3"] and alog.dropped == 1
    assert path.read_bytes().count(b"\n") == 2


def test_a_companion_decision_keeps_the_strangers_crops(tmp_path: Path) -> None:
    from decision_support import decision_event
    from facedoor.camera import Frame
    from facedoor.detect import Face

    def face_at(x: int) -> Face:
        return Face(box=np.array([x, 10, x + 40, 50], np.float32), score=0.99, landmarks=np.zeros((5, 2), np.float32))

    image = np.random.default_rng(1).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    event = decision_event("deny", reason="companion", identity="alice",
                           frame=Frame(image, 1, time.monotonic(), time.time()), faces=(face_at(10), face_at(120)),
                           companions=(1,))
    path = tmp_path / "audit.jsonl"
    alog = AuditLog(path, AuditLimits(max_bytes=10_000_000, max_age_s=86400.0, save_crops=True))
    alog.on_decision(event)
    alog.close()
    [entry] = read_entries(path)
    assert entry["reason"] == "companion" and Path(entry["crop"]).is_file()
    [stranger] = entry["stranger_crops"]
    assert "stranger1" in stranger and Path(stranger).stat().st_mode & 0o777 == 0o600


def test_required_audit_refuses_to_start_when_it_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the audit directory should be")
    with pytest.raises(audit.AuditError, match=r"audit.required: cannot write the audit log .*not-a-dir/audit.jsonl"):
        AuditLog(blocker / "audit.jsonl", AuditLimits(1_000_000, 86400.0, False), "front", required=True)
    make_log(blocker / "audit.jsonl").close()  # not required: it starts, and logs its write errors


def test_required_audit_writes_the_unlock_before_it_is_sent_and_says_when_it_cannot(tmp_path: Path) -> None:
    """A full disk (the file is /dev/full: every write fails with ENOSPC, even as root)."""
    path = tmp_path / "audit.jsonl"
    alog = AuditLog(path, AuditLimits(1_000_000, 86400.0, False), "front", required=True)
    try:
        assert alog.write_ahead(decision(1)) and alog.state == "ok"
        [intent] = list(read_entries(path))
        assert intent["id"] == "d1" and intent["audit_stage"] == "intent" and intent["door"] == "front"
        path.rename(tmp_path / "audit.jsonl.saved")
        path.symlink_to("/dev/full")
        assert not alog.write_ahead(decision(2)) and alog.state == "failing"
        path.unlink()
        assert alog.write_ahead(decision(3)) and alog.state == "ok"  # writable again
        assert [e["id"] for e in read_entries(path)] == ["d3"]
    finally:
        alog.close()
    assert "unlock/intent" in audit.format_table(list(read_entries(path)))
