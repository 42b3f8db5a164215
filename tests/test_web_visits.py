"""The console's audit index: incremental, through the door's rotations and age pruning, never
a line twice or half a line."""
from __future__ import annotations

import os
from pathlib import Path

from facedoor.audit import AuditLimits, AuditLog, prune_by_age
from facedoor.web.visits import Filters, VisitIndex
from web_support import visit, write_audit


def ids(index: VisitIndex) -> list[str]:
    index.refresh()
    rows, _ = index.page(Filters(), size=10_000)
    return [v["id"] for v in rows]


def test_index_follows_appends_and_waits_for_a_whole_line(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    write_audit(audit, [visit(0), visit(1)])
    index = VisitIndex(audit, tmp_path / "index.db")
    assert ids(index) == ["visit-1", "visit-0"]
    with open(audit, "a") as fh:
        fh.write('{"id": "visit-2", "decision": "deny", "ts_ms": 1700000002000')  # the door is mid-write
    assert ids(index) == ["visit-1", "visit-0"]
    with open(audit, "a") as fh:
        fh.write('}\nnot json at all\n[1, 2]\n{"id": "no-time", "decision": "deny"}\n')
    assert ids(index) == ["visit-2", "visit-1", "visit-0"]
    assert index.refresh() == 0  # nothing new: nothing read


def test_index_survives_the_doors_rotation_and_pruning(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    log = AuditLog(audit, AuditLimits(max_bytes=4 * 2000, max_age_s=1e9, save_crops=False))
    index = VisitIndex(audit, tmp_path / "index.db")
    written = []
    for i in range(60):  # ~200 bytes each: rotates every ~10 entries, keeps the newest ~40
        log.record(visit(i))
        written.append(f"visit-{i}")
        if i % 7 == 0:
            log.flush()
            index.refresh()
    log.close()
    on_disk = [line for f in sorted(tmp_path.glob("audit.jsonl*")) for line in f.read_text().splitlines()]
    seen = ids(index)
    assert len(seen) == len(set(seen)) == len(on_disk)  # every kept line once, the rotated-away ones gone
    assert seen == sorted(seen, key=lambda v: -int(v.split("-")[1])) and seen[0] == "visit-59"
    # age pruning rewrites a file (a new inode): its rows are indexed again, once
    oldest = int(seen[-1].split("-")[1])
    prune_by_age(audit, max_age_s=0, now=(1_700_000_000_000 + (oldest + 5) * 1000) / 1000 + 0.5)
    after = ids(index)
    assert len(after) == len(set(after)) and f"visit-{oldest}" not in after and after[0] == "visit-59"


def test_a_reused_inode_with_other_content_is_read_afresh(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    write_audit(audit, [visit(0), visit(1)])
    index = VisitIndex(audit, tmp_path / "index.db")
    assert len(ids(index)) == 2
    with open(audit, "r+") as fh:  # same inode, other first line, same length or longer
        fh.seek(0)
        fh.truncate()
    write_audit(audit, [visit(7, identity="zed"), visit(8), visit(9)])
    assert ids(index) == ["visit-9", "visit-8", "visit-7"]
    os.unlink(audit)
    assert ids(index) == []
