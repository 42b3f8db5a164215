"""The embedding store: one SQLite file (WAL) of identities and their face embeddings.

Every embedding records the SHA-256 of the encoder that produced it and of the photo it came
from, and its kind: an enrolment photo, or a door template (the fused embedding of a confident
unlock, added by the door when templates are on; bounded per person, the oldest door template
replaced first, enrolment embeddings never). Embeddings of another encoder are never mixed into
a gallery: the store refuses and says to re-enrol. Enrolment is one transaction (all photos or
none). The daemon reads while the CLI writes (WAL, busy timeout). A file that is not a facedoor
store, or is damaged, is reported as a StoreError naming it and is never written to; a symbolic
link is refused, never followed. The cohort (`set_cohort`) is a separate table of templates of
people who are not members, one per person, of the same encoder; it is replaced as a whole
(`add_cohort` adds one: the web console's "this was not X"). A
store of an older schema (1: before door templates, 2: before the cohort) is read as it is and
upgraded the first time it is opened for writing. A new store (and its -wal/-shm, which
SQLite gives the store's mode) is 0600 in a 0700 directory. A running reader sees another
process's commits through `StoreWatcher`. A door of a site (facedoor.fleet) also keeps the
`roster` ledger, created on first use: the version of each roster entry the store holds, written
in the same transaction as the change it records (`apply_roster`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from facedoor.files import open_private, private_dir
from facedoor.match import Gallery, person_templates

log = logging.getLogger(__name__)

APPLICATION_ID = 0x46444F52  # "FDOR" in the SQLite header: marks the file as a facedoor store
SCHEMA_VERSION = 3
ENROLMENT, DOOR = "enrolment", "door"  # embedding kinds
SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 10_000
MAX_NAME_LEN = 64

_SCHEMA = """
CREATE TABLE identities (
    id      INTEGER PRIMARY KEY,
    name    TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL
);
CREATE TABLE embeddings (
    id             INTEGER PRIMARY KEY,
    identity_id    INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    vector         BLOB NOT NULL,
    dim            INTEGER NOT NULL,
    encoder_sha256 TEXT NOT NULL CHECK (length(encoder_sha256) = 64),
    image_sha256   TEXT NOT NULL CHECK (length(image_sha256) = 64),
    created        TEXT NOT NULL,
    kind           TEXT NOT NULL DEFAULT 'enrolment' CHECK (kind IN ('enrolment', 'door')),
    UNIQUE (identity_id, encoder_sha256, image_sha256)
);
CREATE INDEX embeddings_identity ON embeddings(identity_id);
CREATE TABLE cohort (
    id             INTEGER PRIMARY KEY,
    label          TEXT NOT NULL,
    vector         BLOB NOT NULL,
    dim            INTEGER NOT NULL,
    encoder_sha256 TEXT NOT NULL CHECK (length(encoder_sha256) = 64),
    created        TEXT NOT NULL
);
"""
# Schema 1 -> 2: the embedding kind (every existing row is an enrolment embedding); 2 -> 3: the cohort.
_MIGRATIONS = {
    1: "ALTER TABLE embeddings ADD COLUMN kind TEXT NOT NULL DEFAULT 'enrolment' CHECK (kind IN ('enrolment', 'door'))",
    2: _SCHEMA[_SCHEMA.index("CREATE TABLE cohort"):],
}
MAX_COHORT = 100_000  # cohort templates (C x D float32: 51 MB at 128-D)
# The site-roster ledger (facedoor.fleet): which version of each roster entry this store holds. Created
# on first use by any schema, so a store without a fleet never has it.
_ROSTER = """CREATE TABLE IF NOT EXISTS roster (
    key     TEXT PRIMARY KEY,
    name    TEXT NOT NULL,
    version INTEGER NOT NULL,
    origin  TEXT NOT NULL,
    digest  TEXT NOT NULL,
    removed INTEGER NOT NULL
)"""


class StoreError(RuntimeError):
    """The store file is missing, foreign, damaged, or holds embeddings of another encoder."""


@dataclass(frozen=True)
class Identity:
    """One enrolled person as `list` shows it: enrolment embeddings, door templates, and `stale`
    embeddings of another encoder (of either kind)."""

    name: str
    created: str
    embeddings: int
    stale: int
    door_templates: int = 0


@dataclass(frozen=True)
class Template:
    """One stored embedding of a person as `templates` shows it."""

    kind: str            # ENROLMENT or DOOR
    image_sha256: str
    created: str
    current: bool        # made by the loaded encoder


@dataclass(frozen=True)
class RosterRow:
    """One entry of the site-roster ledger: the roster entry KEY (NAME's) at VERSION from ORIGIN, the
    digest of its content, and whether it is a removal (a tombstone)."""

    key: str
    name: str
    version: int
    origin: str
    digest: str
    removed: bool


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def validate_name(name: str) -> str:
    """An identity name: 1..64 printable characters, no leading/trailing space."""
    if not name or name != name.strip():
        raise StoreError(f"identity name {name!r}: must be non-empty without leading/trailing spaces")
    if len(name) > MAX_NAME_LEN:
        raise StoreError(f"identity name {name[:20]!r}...: longer than {MAX_NAME_LEN} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise StoreError(f"identity name {name!r}: contains control characters")
    return name


class EmbeddingStore:
    """A facedoor store file bound to one encoder (its SHA-256 from the model manifest)."""

    def __init__(self, path: str | Path, encoder_sha256: str, *, create: bool = True, readonly: bool = False):
        self.path = Path(path)
        self.encoder_sha256 = encoder_sha256
        self.readonly = readonly
        self._kind = "e.kind"  # SQL for an embedding's kind; a schema-1 store read-only has none
        self._version = SCHEMA_VERSION
        if self.path.is_symlink():
            raise StoreError(
                f"{self.path}: is a symbolic link; refusing to follow it (give the store's real path)"
            )
        exists = self.path.exists()
        if not exists and (readonly or not create):
            raise StoreError(f"{self.path}: no embedding store here (enrol someone with `facedoor enroll`)")
        if exists:
            if not self.path.is_file():
                raise StoreError(f"{self.path}: not a regular file; give the path of an embedding store file")
            if self.path.stat().st_mode & 0o077:
                log.warning("%s can be read by other users (mode %04o) and holds biometric data: chmod 600 it",
                            self.path, self.path.stat().st_mode & 0o777)
            self._check_header()
        else:
            self._create_private()
        mode = "ro" if readonly else ("rw" if exists else "rwc")
        try:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode={mode}", uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the embedding store ({exc})") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA foreign_keys = ON")
            if exists:
                self._check_contents()
            else:
                self._initialise()
            if not readonly:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
        except StoreError:
            self._db.close()
            raise
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{self.path}: damaged embedding store ({exc}); "
                             "restore a backup or move it away") from None

    # -- opening -----------------------------------------------------------------------------

    def _create_private(self) -> None:
        """Create the empty store file 0600 (and missing directories 0700) before SQLite opens it 0644."""
        try:
            private_dir(self.path.parent)
            os.close(open_private(self.path, os.O_WRONLY))
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the embedding store ({exc.strerror})") from None

    def _check_header(self) -> None:
        """Refuse, before SQLite touches it, a file that is not SQLite or is shorter than its header says."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                header = fh.read(100)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read the embedding store ({exc.strerror})") from None
        if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
            raise StoreError(
                f"{self.path}: not a facedoor embedding store (not an SQLite database); "
                "it was left untouched: give another --store path or move the file away"
            )
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], "big")
        if pages and size < pages * page_size:
            raise StoreError(
                f"{self.path}: truncated embedding store ({size} bytes, header says {pages * page_size}); "
                "it was left untouched: restore a backup or move it away"
            )

    def _check_contents(self) -> None:
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            raise StoreError(
                f"{self.path}: an SQLite database, but not a facedoor embedding store "
                f"(application_id {app_id:#x}); it was left untouched: give another --store path"
            )
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in range(1, SCHEMA_VERSION + 1):
            raise StoreError(f"{self.path}: store schema version {version}, this facedoor reads 1..{SCHEMA_VERSION}")
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(
                f"{self.path}: damaged embedding store ({'; '.join(problems[:3])}); restore a backup or move it away"
            )
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        """Upgrade to the current schema when writable; read-only, schema 1 reads as enrolment only
        and a store before schema 3 has no cohort."""
        if self.readonly:
            self._version = version
            if version == 1:
                self._kind = f"'{ENROLMENT}'"
            return
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]  # another process may have upgraded it
            for step in range(version, SCHEMA_VERSION):
                for statement in filter(str.strip, _MIGRATIONS[step].split(";")):
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("upgraded embedding store %s to schema %d", self.path, SCHEMA_VERSION)

    def _initialise(self) -> None:
        with self._transaction():
            if self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                self._check_contents()  # another process created it first
                return
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("created embedding store %s", self.path)

    def _transaction(self, read: bool = False) -> _Transaction:
        return _Transaction(self._db, self.path, read)

    # -- writing -----------------------------------------------------------------------------

    def enroll(
        self, name: str, embeddings: np.ndarray, image_sha256s: Sequence[str], *, replace: bool = False
    ) -> int:
        """Add NAME's embeddings (N, D) from N photos in one transaction; return how many are new.

        Refused, with nothing written, when the store already holds embeddings of another encoder
        for NAME (re-enrol with `replace=True`, which drops NAME's old embeddings first).
        """
        self._writable()
        validate_name(name)
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(image_sha256s) or len(vectors) == 0:
            raise ValueError("enroll needs (N, D) embeddings and N image hashes, N >= 1")
        if not np.all(np.isfinite(vectors)):
            raise StoreError(f"identity {name!r}: refusing non-finite embeddings")
        now = _now()
        with self._transaction():
            row = self._db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                identity_id = self._db.execute(
                    "INSERT INTO identities (name, created) VALUES (?, ?)", (name, now)
                ).lastrowid
            else:
                identity_id = row[0]
                if replace:
                    self._db.execute("DELETE FROM embeddings WHERE identity_id = ?", (identity_id,))
                else:
                    self._refuse_foreign(identity_id, name)
            known = {
                sha for (sha,) in self._db.execute(
                    "SELECT image_sha256 FROM embeddings WHERE identity_id = ? AND encoder_sha256 = ?",
                    (identity_id, self.encoder_sha256),
                )
            }
            rows, seen = [], set(known)
            for vector, sha in zip(vectors, image_sha256s):
                if sha in seen:  # this photo is already enrolled for NAME
                    continue
                seen.add(sha)
                blob = vector.astype("<f4").tobytes()
                rows.append((identity_id, blob, vector.shape[0], self.encoder_sha256, sha, now))
            self._db.executemany(
                "INSERT INTO embeddings (identity_id, vector, dim, encoder_sha256, image_sha256, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            added = len(rows)
        log.info("enrolled %s: %d new embedding(s) in %s", name, added, self.path)
        return added

    def add_door_template(self, name: str, embedding: np.ndarray, max_per_person: int) -> int:
        """Add a door template (a visit's fused embedding) to NAME, dropping NAME's oldest door templates
        beyond MAX_PER_PERSON (enrolment embeddings are never dropped); return how many were dropped."""
        self._writable()
        if max_per_person < 1:
            raise ValueError("max_per_person must be at least 1")
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(vector)):
            raise StoreError(f"identity {name!r}: refusing a non-finite door template")
        blob = vector.astype("<f4").tobytes()
        with self._transaction():
            row = self._db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError(f"no identity named {name!r} in {self.path}")
            self._refuse_foreign(row[0], name)
            self._db.execute(
                "INSERT OR IGNORE INTO embeddings "
                "(identity_id, vector, dim, encoder_sha256, image_sha256, created, kind)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row[0], blob, vector.shape[0], self.encoder_sha256, hashlib.sha256(blob).hexdigest(), _now(), DOOR),
            )
            dropped = self._db.execute(
                "DELETE FROM embeddings WHERE identity_id = ? AND kind = ? AND id NOT IN"
                " (SELECT id FROM embeddings WHERE identity_id = ? AND kind = ? ORDER BY id DESC LIMIT ?)",
                (row[0], DOOR, row[0], DOOR, max_per_person),
            ).rowcount
        log.info("door template added to %s (%d oldest dropped) in %s", name, dropped, self.path)
        return dropped

    def remove(self, name: str) -> int:
        """Delete NAME and its embeddings of both kinds; return how many went. Unknown NAME: StoreError."""
        self._writable()
        with self._transaction():
            row = self._db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError(f"no identity named {name!r} in {self.path}")
            count = self._db.execute("SELECT count(*) FROM embeddings WHERE identity_id = ?", row).fetchone()[0]
            self._db.execute("DELETE FROM embeddings WHERE identity_id = ?", row)
            self._db.execute("DELETE FROM identities WHERE id = ?", row)
        log.info("removed %s (%d embeddings) from %s", name, count, self.path)
        return count

    def set_cohort(self, labels: Sequence[str], embeddings: np.ndarray) -> int:
        """Replace the cohort with one template per label (C, D), in one transaction; return C."""
        self._writable()
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(labels):
            raise ValueError("set_cohort needs (C, D) embeddings and C labels")
        if len(vectors) > MAX_COHORT:
            raise StoreError(f"a cohort of {len(vectors)} people is more than {MAX_COHORT}")
        if not np.all(np.isfinite(vectors)):
            raise StoreError("refusing non-finite cohort embeddings")
        now = _now()
        with self._transaction():
            self._db.execute("DELETE FROM cohort")
            self._db.executemany(
                "INSERT INTO cohort (label, vector, dim, encoder_sha256, created) VALUES (?, ?, ?, ?, ?)",
                [(label, v.astype("<f4").tobytes(), v.shape[0], self.encoder_sha256, now)
                 for label, v in zip(labels, vectors)],
            )
        log.info("cohort of %d people stored in %s", len(vectors), self.path)
        return len(vectors)

    def add_cohort(self, label: str, embedding: np.ndarray) -> int:
        """Add one template to the cohort (the web console's "this was not X"), keeping the rest;
        refused when its size differs from the stored embeddings'. Returns the cohort's size."""
        self._writable()
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if not vector.size or not np.all(np.isfinite(vector)):
            raise StoreError("refusing an empty or non-finite cohort embedding")
        with self._transaction():
            dims = {d for (d,) in self._db.execute("SELECT DISTINCT dim FROM embeddings WHERE encoder_sha256 = ?"
                                                   " UNION SELECT DISTINCT dim FROM cohort", (self.encoder_sha256,))}
            if dims - {vector.shape[0]}:
                raise StoreError(f"a {vector.shape[0]}-D cohort embedding does not fit a store of "
                                 f"{'/'.join(map(str, sorted(dims)))}-D embeddings")
            size = self._db.execute("SELECT count(*) FROM cohort").fetchone()[0]
            if size >= MAX_COHORT:
                raise StoreError(f"the cohort already holds {size} people, the most it may")
            self._db.execute("INSERT INTO cohort (label, vector, dim, encoder_sha256, created) VALUES (?, ?, ?, ?, ?)",
                             (label, vector.astype("<f4").tobytes(), vector.shape[0], self.encoder_sha256, _now()))
        log.info("cohort: %s added in %s (%d people)", label, self.path, size + 1)
        return size + 1

    def apply_roster(self, people: Mapping[str, tuple[np.ndarray, Sequence[str]] | None],
                     cohort: tuple[Sequence[str], np.ndarray] | None, ledger: Sequence[RosterRow]) -> None:
        """Site-roster changes (facedoor.fleet) in one transaction: each person's embeddings replaced
        by the given (N, D) rows and kinds (None: the person removed), the cohort replaced (when given),
        the LEDGER rows recorded. Invalid content raises StoreError and nothing is written."""
        self._writable()
        for name, content in people.items():
            validate_name(name)
            if content is not None and (content[0].ndim != 2 or len(content[0]) != len(content[1])
                                        or not len(content[0]) or not np.all(np.isfinite(content[0]))
                                        or not set(content[1]) <= {ENROLMENT, DOOR}):
                raise StoreError(f"roster entry for {name!r}: invalid embeddings; nothing applied")
        now = _now()
        with self._transaction():
            for name, content in people.items():
                self._db.execute("DELETE FROM identities WHERE name = ?", (name,))  # embeddings cascade
                if content is None:
                    continue
                identity_id = self._db.execute(
                    "INSERT INTO identities (name, created) VALUES (?, ?)", (name, now)).lastrowid
                blobs = [v.astype("<f4").tobytes() for v in content[0]]
                self._db.executemany(
                    "INSERT OR IGNORE INTO embeddings (identity_id, vector, dim, encoder_sha256, image_sha256,"
                    " created, kind) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(identity_id, b, content[0].shape[1], self.encoder_sha256, hashlib.sha256(b).hexdigest(), now,
                      kind) for b, kind in zip(blobs, content[1])])
            if cohort is not None:
                self._db.execute("DELETE FROM cohort")
                self._db.executemany(
                    "INSERT INTO cohort (label, vector, dim, encoder_sha256, created) VALUES (?, ?, ?, ?, ?)",
                    [(label, v.astype("<f4").tobytes(), v.shape[0], self.encoder_sha256, now)
                     for label, v in zip(cohort[0], cohort[1])])
            self._db.execute(_ROSTER)
            self._db.executemany(
                "INSERT OR REPLACE INTO roster (key, name, version, origin, digest, removed) VALUES (?, ?, ?, ?, ?, ?)",
                [(r.key, r.name, r.version, r.origin, r.digest, int(r.removed)) for r in ledger])

    def roster(self) -> dict[str, RosterRow]:
        """The site-roster ledger by entry key (empty for a store that never joined a site)."""
        if not self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'roster'"):
            return {}
        rows = self._query("SELECT key, name, version, origin, digest, removed FROM roster")
        return {r[0]: RosterRow(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows}

    def person(self, name: str) -> tuple[np.ndarray, list[str]] | None:
        """NAME's embeddings (N, D) and their kinds, oldest first; None when NAME is not enrolled.
        Refuses a person with embeddings of another encoder."""
        rows = self._query(
            f"SELECT e.vector, e.dim, {self._kind}, e.encoder_sha256 FROM identities i"
            " LEFT JOIN embeddings e ON e.identity_id = i.id WHERE i.name = ? ORDER BY e.id", (name,))
        if not rows:
            return None
        rows = [r for r in rows if r[0] is not None]
        if any(sha != self.encoder_sha256 for *_, sha in rows):
            raise StoreError(f"identity {name!r} in {self.path} has embeddings from another encoder; "
                             f"re-enrol with `facedoor enroll --replace {name} IMAGE...`")
        if len({dim for _, dim, _, _ in rows}) > 1 or any(len(blob) != 4 * dim for blob, dim, _, _ in rows):
            raise StoreError(f"{self.path}: damaged embedding rows of {name!r}")
        dim = rows[0][1] if rows else 0
        matrix = np.frombuffer(b"".join(r[0] for r in rows), dtype="<f4").reshape(len(rows), dim)
        return matrix.astype(np.float32), [r[2] for r in rows]

    def cohort(self) -> tuple[list[str], np.ndarray]:
        """The cohort's labels and (C, D) templates; refuses another encoder's."""
        if self._version < 3:
            return [], np.zeros((0, 0), np.float32)
        rows = self._query("SELECT label, vector, dim, encoder_sha256 FROM cohort ORDER BY id")
        if any(sha != self.encoder_sha256 for *_, sha in rows):
            raise StoreError(f"{self.path}: the cohort comes from another encoder than the loaded one; "
                             "rebuild it with `facedoor cohort DIR` or drop it with `facedoor cohort --clear`")
        if len({dim for _, _, dim, _ in rows}) > 1 or any(len(blob) != 4 * dim for _, blob, dim, _ in rows):
            raise StoreError(f"{self.path}: damaged cohort rows (inconsistent vector sizes)")
        dim = rows[0][2] if rows else 0
        return [r[0] for r in rows], np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path}: opened read-only")

    def _refuse_foreign(self, identity_id: int, name: str) -> None:
        other = self._db.execute(
            "SELECT count(*) FROM embeddings WHERE identity_id = ? AND encoder_sha256 != ?",
            (identity_id, self.encoder_sha256),
        ).fetchone()[0]
        if other:
            raise StoreError(
                f"identity {name!r} in {self.path} has {other} embedding(s) from another encoder; "
                f"re-enrol with `facedoor enroll --replace {name} IMAGE...` (embeddings are never mixed)"
            )

    # -- reading -----------------------------------------------------------------------------

    def identities(self) -> list[Identity]:
        """Every enrolled identity with its enrolment embedding and door template counts, sorted by name."""
        rows = self._query(
            f"SELECT i.name, i.created, coalesce(sum({self._kind} = ?), 0),"
            f" coalesce(sum(e.encoder_sha256 != ?), 0), coalesce(sum({self._kind} = ?), 0)"
            " FROM identities i LEFT JOIN embeddings e ON e.identity_id = i.id"
            " GROUP BY i.id ORDER BY i.name",
            (ENROLMENT, self.encoder_sha256, DOOR),
        )
        return [Identity(name, created, count, stale, door) for name, created, count, stale, door in rows]

    def templates(self, name: str) -> list[Template]:
        """NAME's stored embeddings, oldest first: kind, the photo's SHA-256 (a door template's: the
        vector's), when, and whether the loaded encoder made it. Unknown NAME: StoreError."""
        if not self._query("SELECT 1 FROM identities WHERE name = ?", (name,)):
            raise StoreError(f"no identity named {name!r} in {self.path}")
        rows = self._query(
            f"SELECT {self._kind}, e.image_sha256, e.created, e.encoder_sha256 = ? FROM embeddings e"
            " JOIN identities i ON i.id = e.identity_id WHERE i.name = ? ORDER BY e.id",
            (self.encoder_sha256, name))
        return [Template(kind, sha, created, bool(current)) for kind, sha, created, current in rows]

    def gallery(self, threshold: float = 0.7) -> Gallery:
        """Each person's enrolment template (the mean of its enrolment embeddings) and door templates,
        with the cohort, as a Gallery; refuses another encoder's embeddings."""
        with self._transaction(read=True):
            stale = self._db.execute(
                "SELECT DISTINCT i.name FROM embeddings e JOIN identities i ON i.id = e.identity_id"
                " WHERE e.encoder_sha256 != ? ORDER BY i.name",
                (self.encoder_sha256,),
            ).fetchall()
            rows = self._db.execute(
                f"SELECT i.name, e.vector, e.dim, {self._kind} FROM embeddings e"
                " JOIN identities i ON i.id = e.identity_id ORDER BY e.id"
            ).fetchall()
            cohort = self.cohort()[1]  # same snapshot as the members
        if stale:
            names = ", ".join(n for (n,) in stale)
            raise StoreError(
                f"{self.path} holds embeddings from another encoder than the loaded one "
                f"(identities: {names}; loaded encoder sha256 {self.encoder_sha256[:12]}...): "
                "embeddings of different models are never mixed. Re-enrol them with `facedoor enroll --replace "
                "NAME IMAGE...` (or remove them), or run the encoder they were enrolled with: set "
                "recognition.encoder (facenet or facenet_int8), or re-export with `facedoor-export --out MODELS "
                "--encoder float` (the models' default is facenet_int8 where the exporting CPU has an 8-bit "
                "dot product)"
            )
        dims = {dim for _, _, dim, _ in rows}
        if len(dims) > 1 or any(len(blob) != 4 * dim for _, blob, dim, _ in rows):
            raise StoreError(f"{self.path}: damaged embedding rows (inconsistent vector sizes)")
        dim = dims.pop() if dims else 0
        matrix = np.frombuffer(b"".join(blob for _, blob, _, _ in rows), dtype="<f4").reshape(len(rows), dim)
        enrolment = np.array([kind == ENROLMENT for _, _, _, kind in rows], dtype=bool)
        people, templates = person_templates([r[0] for r, e in zip(rows, enrolment) if e], matrix[enrolment])
        door = [r[0] for r, e in zip(rows, enrolment) if not e]
        if len(cohort) and len(rows) and cohort.shape[1] != dim:
            raise StoreError(f"{self.path}: the cohort has {cohort.shape[1]} dimensions, the embeddings {dim}")
        return Gallery(people + door, np.concatenate([templates, matrix[~enrolment].astype(np.float32)]), threshold,
                       cohort if len(cohort) and len(rows) else None)

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the embedding store ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreWatcher:
    """Tells a running reader, for the cost of two stats, that another process changed the store.

    A commit appends to the write-ahead log (`-wal`) and a checkpoint rewrites the store file, so
    the pair's (inode, size, mtime) changes with every committed change (an empty log is none). `changed()` is True once
    after each such change, when the file was replaced and, failing closed, when it cannot be
    stat'ed; the caller then reloads the gallery and meets any error there. (SQLite's `PRAGMA
    data_version` on a long-lived connection was tried first: it goes blind once anything in the
    same process closes another descriptor of the file, as the store's header check does, because
    closing any descriptor drops the process's POSIX locks on it.)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._wal = Path(f"{self.path}-wal")
        self._seen: tuple[tuple[int, int, int] | None, ...] | None = None
        self.changed()

    def _signature(self) -> tuple[tuple[int, int, int] | None, ...]:
        sig: list[tuple[int, int, int] | None] = []
        for path in (self.path, self._wal):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if path == self.path:
                    raise
                st = None
            # an empty log is no log: a reader opening the store may create one, and that is no change
            sig.append((st.st_ino, st.st_size, st.st_mtime_ns) if st is not None and st.st_size else None)
        return tuple(sig)

    def changed(self) -> bool:
        """Whether the store changed since the previous call (True on the first call too)."""
        try:
            signature = self._signature()
        except OSError as exc:
            log.warning("store watcher: cannot stat %s (%s); reloading", self.path, exc)
            self._seen = None
            return True
        previous, self._seen = self._seen, signature
        return signature != previous

    def close(self) -> None:
        """Nothing is held open; kept so the door closes what it opened the same way for every part."""

    def __enter__(self) -> StoreWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Transaction:
    """BEGIN IMMEDIATE (write) or DEFERRED (consistent read) ... COMMIT, ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection, path: Path, read: bool = False):
        self.db, self.path, self.read = db, path, read

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN" if self.read else "BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot start a transaction ({exc})") from None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error as err:
                self.db.execute("ROLLBACK")
                raise StoreError(f"{self.path}: write failed, nothing stored ({err})") from None
        self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"{self.path}: store operation failed, nothing changed ({exc})") from None
