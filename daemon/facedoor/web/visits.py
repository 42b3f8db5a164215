"""The Visits page's data: the audit log (JSONL and its rotations) indexed into a SQLite file.

A JSONL file cannot be paged or filtered fast at 100,000 entries, so the console keeps an index
beside it (`<state_dir>/web-index.db`, its own file: the door never reads it). The index is
brought up to date incrementally before each query, for the cost of a stat per audit file when
nothing changed: each file is known by its inode (a rotation renames it, keeping the inode) and
how far it has been read; new complete lines are parsed and inserted; a file that is gone, or was
rewritten by age pruning (a new inode), takes its rows with it. The audit log stays the truth: the
index can be deleted at any time and is rebuilt from it.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from facedoor.audit import CROPS_DIR, log_files
from facedoor.files import open_private, private_dir

log = logging.getLogger(__name__)

INDEX_FILE = "web-index.db"
INDEX_VERSION = 2      # another version's index file is emptied and rebuilt from the audit log
PAGE = 50
HEAD_BYTES = 64        # a file's first bytes: tell a reused inode from the file it had before
BATCH_LINES = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (inode INTEGER PRIMARY KEY, offset INTEGER NOT NULL, head BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS visits (
    seq        INTEGER PRIMARY KEY,
    inode      INTEGER NOT NULL,
    id         TEXT,
    ts_ms      INTEGER NOT NULL,
    decision   TEXT,
    reason     TEXT,
    identity   TEXT,
    event      TEXT,
    entry      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS visits_ts ON visits(ts_ms, seq);
CREATE INDEX IF NOT EXISTS visits_identity ON visits(identity, ts_ms, seq, decision);
CREATE INDEX IF NOT EXISTS visits_decision ON visits(decision, reason, ts_ms, seq);
CREATE INDEX IF NOT EXISTS visits_decision_ts ON visits(decision, ts_ms, seq);
CREATE INDEX IF NOT EXISTS visits_id ON visits(id);
CREATE INDEX IF NOT EXISTS visits_inode ON visits(inode);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Filters:
    """What the Visits page asks for: a person, a decision (`unlock`, `deny`, `deny:REASON`, or
    `console` for the console's own entries), a day range (local dates, inclusive)."""

    identity: str | None = None
    decision: str | None = None
    day_from: str | None = None
    day_to: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.identity:
            clauses.append("identity = ?")
            params.append(self.identity)
        if self.decision == "console":
            clauses.append("event IS NOT NULL")
        elif self.decision:
            decision, _, reason = self.decision.partition(":")
            clauses.append("decision = ?")
            params.append(decision)
            if reason:
                clauses.append("reason = ?")
                params.append(reason)
        else:
            clauses.append("decision IS NOT NULL")
        for day, op, shift in ((self.day_from, ">=", 0), (self.day_to, "<", 1)):
            if day:
                start = datetime.strptime(day, "%Y-%m-%d").astimezone()  # ValueError: a bad date
                clauses.append(f"ts_ms {op} ?")
                params.append(int(start.timestamp() * 1000) + shift * 86_400_000)
        return " AND ".join(clauses) or "1", params


@dataclass(frozen=True)
class Visit:
    """One indexed audit entry."""

    seq: int
    entry: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.entry.get(key)

    @property
    def when(self) -> str:
        return datetime.fromtimestamp(self.entry.get("ts_ms", 0) / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")

    @property
    def crops(self) -> list[str]:
        """The entry's face crop paths as the door wrote them (the deciding face first)."""
        paths = [self.entry.get("crop"), *(self.entry.get("stranger_crops") or [])]
        return [p for p in paths if isinstance(p, str)]


class VisitIndex:
    """The audit index: `refresh()` reads what the door appended; `page()` pages newest first."""

    def __init__(self, audit_file: Path, index_file: Path):
        self.audit_file = audit_file
        self.crops_dir = audit_file.parent / CROPS_DIR
        self.path = index_file
        private_dir(index_file.parent)
        if not index_file.exists():
            os.close(open_private(index_file, os.O_WRONLY))
        self._db = sqlite3.connect(str(index_file), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = OFF")  # a lost index is rebuilt from the audit log
        if self._db.execute("PRAGMA user_version").fetchone()[0] != INDEX_VERSION:
            self._db.executescript("DROP TABLE IF EXISTS visits; DROP TABLE IF EXISTS files;")
            self._db.execute(f"PRAGMA user_version = {INDEX_VERSION}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._generation = 0  # bumped whenever rows come or go: the cached counts and lists are stale
        self._cache: dict[Any, tuple[int, Any]] = {}

    def close(self) -> None:
        self._db.close()

    # -- indexing --------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Index the complete lines appended since the last call; drop the rows of vanished files."""
        with self._lock:
            known = dict(self._db.execute("SELECT inode, offset FROM files").fetchall())
            heads = dict(self._db.execute("SELECT inode, head FROM files").fetchall())
            present: set[int] = set()
            added = 0
            for file in log_files(self.audit_file):
                try:
                    with open(file, "rb") as fh:
                        st = os.fstat(fh.fileno())
                        head = fh.read(HEAD_BYTES)
                        inode = st.st_ino
                        if inode in known and (bytes(heads[inode]) != head or st.st_size < known[inode]):
                            self._forget(inode)  # the inode now holds another file
                            known.pop(inode)
                            self._generation += 1
                        present.add(inode)
                        offset = known.get(inode, 0)
                        if inode not in known:
                            self._db.execute("INSERT INTO files (inode, offset, head) VALUES (?, 0, ?)", (inode, head))
                        if st.st_size > offset:
                            added += self._read(fh, inode, offset)
                except FileNotFoundError:
                    continue  # rotated away between listing and opening: the next refresh sees it
            gone = set(known) - present
            for inode in gone:
                self._forget(inode)
            if added or gone:
                self._generation += 1
            return added

    def _cached(self, key: Any, compute: Any) -> Any:
        """COMPUTE()'s result, reused until the index changes (counts and lists walk many rows)."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == self._generation:
            return hit[1]
        if len(self._cache) > 256:
            self._cache.clear()
        value = compute()
        self._cache[key] = (self._generation, value)
        return value

    def _forget(self, inode: int) -> None:
        self._db.execute("BEGIN")
        self._db.execute("DELETE FROM visits WHERE inode = ?", (inode,))
        self._db.execute("DELETE FROM files WHERE inode = ?", (inode,))
        self._db.execute("COMMIT")

    def _read(self, fh: Any, inode: int, offset: int) -> int:
        fh.seek(offset)
        added = 0
        while True:
            lines = fh.readlines(1 << 20)
            if not lines:
                return added
            if not lines[-1].endswith(b"\n"):  # the door is writing it: next time
                lines.pop()
                if not lines:
                    return added
            rows = list(_parse(lines, inode))
            offset += sum(len(line) for line in lines)
            self._db.execute("BEGIN")
            self._db.executemany("INSERT INTO visits (inode, id, ts_ms, decision, reason, identity, event, entry)"
                                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("UPDATE files SET offset = ? WHERE inode = ?", (offset, inode))
            self._db.execute("COMMIT")
            added += len(rows)
            fh.seek(offset)

    # -- queries ---------------------------------------------------------------------------------
    def _rows(self, sql: str, params: Any = ()) -> list[Any]:
        """All rows of SQL, one statement at a time on the one connection (pages are served from threads)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def page(self, filters: Filters, before: tuple[int, int] | None = None,
             size: int = PAGE) -> tuple[list[Visit], tuple[int, int] | None]:
        """Up to SIZE visits matching FILTERS, newest first, older than BEFORE (ts_ms, seq); and the
        cursor of the next page (None on the last)."""
        where, params = filters.where()
        if before is not None:
            where += " AND (ts_ms < ? OR (ts_ms = ? AND seq < ?))"
            params += [before[0], before[0], before[1]]
        rows = self._rows(f"SELECT seq, ts_ms, entry FROM visits WHERE {where}"
                                " ORDER BY ts_ms DESC, seq DESC LIMIT ?", [*params, size + 1])
        visits = [Visit(seq, json.loads(entry)) for seq, _, entry in rows[:size]]
        more = (rows[size - 1][1], rows[size - 1][0]) if len(rows) > size else None
        return visits, more

    def count(self, filters: Filters) -> int:
        where, params = filters.where()
        return int(self._cached(("count", where, *params), lambda: self._rows(
            f"SELECT count(*) FROM visits WHERE {where}", params)[0][0]))

    def get(self, seq: int) -> Visit | None:
        row = next(iter(self._rows("SELECT seq, entry FROM visits WHERE seq = ?", (seq,))), None)
        return Visit(row[0], json.loads(row[1])) if row else None

    def identities(self) -> list[str]:
        """Everyone named in the log (the person filter's choices)."""
        return list(self._cached("identities", lambda: [r[0] for r in self._rows(
            "SELECT DISTINCT identity FROM visits WHERE identity IS NOT NULL ORDER BY identity")]))

    def reasons(self) -> list[str]:
        """`decision:reason` pairs in the log (the decision filter's choices)."""
        return list(self._cached("reasons", lambda: [f"{d}:{r}" for d, r in self._rows(
            "SELECT DISTINCT decision, reason FROM visits WHERE decision IS NOT NULL AND reason IS NOT NULL"
            " ORDER BY decision, reason")]))

    def last_decision(self) -> Visit | None:
        visits, _ = self.page(Filters(), size=1)
        return visits[0] if visits else None

    def setting(self, key: str) -> str | None:
        row = next(iter(self._rows("SELECT value FROM settings WHERE key = ?", (key,))), None)
        return row[0] if row else None

    def set_setting(self, key: str, value: str | None) -> None:
        if value is None:
            self._rows("DELETE FROM settings WHERE key = ?", (key,))
        else:
            self._rows("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def crop_file(self, visit: Visit, index: int) -> Path | None:
        """The INDEX-th crop of VISIT when it is a regular file inside the audit crops directory
        (a path in an entry never leads anywhere else), else None."""
        crops = visit.crops
        if not 0 <= index < len(crops):
            return None
        root = self.crops_dir.resolve()
        path = Path(crops[index])
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if root not in resolved.parents or path.is_symlink() or not resolved.is_file():
            return None
        return resolved


def _parse(lines: list[bytes], inode: int) -> Iterator[tuple[Any, ...]]:
    for raw in lines:
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            log.warning("audit index: skipping a corrupt line")
            continue
        if not isinstance(entry, dict):
            continue
        ts = entry.get("ts_ms")
        if not isinstance(ts, (int, float)):
            continue

        text = [v if isinstance(v := entry.get(k), str) else None
                for k in ("id", "decision", "reason", "identity", "event")]
        yield (inode, text[0], int(ts), *text[1:], raw.decode("utf-8", "replace"))
