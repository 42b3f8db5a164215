"""Embedding store: real SQLite files, transactions, encoder binding, concurrency, foreign files."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import sqlite3
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from facedoor.store import SCHEMA_VERSION, EmbeddingStore, StoreError, StoreWatcher

ENC_A = "a" * 64
ENC_B = "b" * 64


def _emb(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 128)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _template(rows: np.ndarray) -> np.ndarray:
    mean = rows.astype(np.float64).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


def _shas(n: int, tag: str = "") -> list[str]:
    return [hashlib.sha256(f"{tag}{i}".encode()).hexdigest() for i in range(n)]


def _rows(path: Path) -> tuple[list, list]:
    with sqlite3.connect(path) as db:
        return (db.execute("SELECT * FROM identities ORDER BY id").fetchall(),
                db.execute("SELECT * FROM embeddings ORDER BY id").fetchall())


def test_enrol_several_photos_and_read_gallery(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    emb = _emb(5)
    with EmbeddingStore(path, ENC_A) as store:
        assert store.enroll("ana", emb[:3], _shas(3, "ana")) == 3
        assert store.enroll("bo", emb[3:], _shas(2, "bo")) == 2
        assert store.enroll("ana", emb[:1], _shas(1, "ana")) == 0  # same photo again: nothing new
        idents = {i.name: i for i in store.identities()}
    assert {n: i.embeddings for n, i in idents.items()} == {"ana": 3, "bo": 2}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with EmbeddingStore(path, ENC_A, readonly=True) as store:
        gallery = store.gallery(0.7)
    assert gallery.names == ["ana", "bo"]  # one template per person: the mean of its enrolment embeddings
    np.testing.assert_allclose(gallery.embeddings, np.stack([_template(emb[:3]), _template(emb[3:])]), atol=1e-6)
    assert gallery.nearest(emb[4]).identity == "bo"


def test_remove_deletes_identity_and_embeddings(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", _emb(2), _shas(2))
        store.enroll("bo", _emb(1, 1), _shas(1, "b"))
        assert store.remove("ana") == 2
        with pytest.raises(StoreError, match="no identity named 'ana'"):
            store.remove("ana")
        assert [i.name for i in store.identities()] == ["bo"]
    idents, embs = _rows(path)
    assert len(idents) == 1 and len(embs) == 1


def test_other_encoder_is_refused_with_reenrol_message(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", _emb(2), _shas(2))
    before = _rows(path)
    with EmbeddingStore(path, ENC_B) as store:
        with pytest.raises(StoreError, match="(?i)re-enrol"):
            store.gallery()
        with pytest.raises(StoreError, match="(?i)re-enrol"):
            store.enroll("ana", _emb(1, 5), _shas(1, "new"))
        assert _rows(path) == before
        assert store.identities()[0].stale == 2
        # re-enrolment replaces the old model's embeddings in one transaction
        store.enroll("ana", _emb(1, 5), _shas(1, "new"), replace=True)
        gallery = store.gallery()
    assert gallery.names == ["ana"]


def test_failed_enrolment_leaves_store_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", _emb(2), _shas(2))
        before = _rows(path)
        # second photo's row violates NOT NULL: the first must not stay, nor the new identity
        with pytest.raises(StoreError, match="nothing changed"):
            store.enroll("bo", _emb(2, 1), [_shas(1, "b")[0], None])  # type: ignore[list-item]
        with pytest.raises(StoreError, match="non-finite"):
            store.enroll("cy", np.full((1, 128), np.nan, np.float32), _shas(1, "c"))
        assert _rows(path) == before
        assert [i.name for i in store.identities()] == ["ana"]


@pytest.mark.parametrize("bad", ["", " ana", "a" * 65, "tab\there"])
def test_bad_names_are_refused(tmp_path: Path, bad: str) -> None:
    with EmbeddingStore(tmp_path / "s.db", ENC_A) as store:
        with pytest.raises(StoreError, match="identity name"):
            store.enroll(bad, _emb(1), _shas(1))


def _assert_refused_untouched(path: Path, match: str) -> None:
    data = path.read_bytes()
    for kwargs in ({}, {"readonly": True}):
        with pytest.raises(StoreError, match=match) as err:
            EmbeddingStore(path, ENC_A, **kwargs)
        assert str(path) in str(err.value)
    assert path.read_bytes() == data


def test_foreign_files_are_refused_and_left_untouched(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("shopping list\n" * 20)
    _assert_refused_untouched(text, "not a facedoor embedding store")

    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    _assert_refused_untouched(empty, "not a facedoor embedding store")

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE contacts (name TEXT)")
        db.execute("INSERT INTO contacts VALUES ('x')")
    _assert_refused_untouched(other, "not a facedoor embedding store")


def test_truncated_store_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_A) as store:
        for i in range(40):
            store.enroll(f"p{i}", _emb(3, i), _shas(3, f"p{i}"))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    _assert_refused_untouched(path, "truncated")


def test_missing_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no embedding store"):
        EmbeddingStore(tmp_path / "none.db", ENC_A, create=False)
    assert not (tmp_path / "none.db").exists()


def _writer(path: str, count: int) -> None:
    with EmbeddingStore(path, ENC_A) as store:
        for i in range(count):
            store.enroll(f"person{i:03d}", _emb(3, i), _shas(3, f"w{i}"))


def test_reader_and_writer_work_concurrently(tmp_path: Path) -> None:
    """A writer process enrols while a reader thread reloads galleries: no errors, never a partial enrolment."""
    path = tmp_path / "s.db"
    EmbeddingStore(path, ENC_A).close()
    count = 60
    writer = multiprocessing.get_context("spawn").Process(target=_writer, args=(str(path), count))
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            with EmbeddingStore(path, ENC_A, readonly=True) as reader:
                while not done.is_set():
                    g = reader.gallery()
                    for name, template in zip(g.names, g.embeddings):  # a template of all 3 rows, never fewer
                        expected = _template(_emb(3, int(name.removeprefix("person"))))
                        assert np.allclose(template, expected, atol=1e-6), "a partial enrolment was visible"
                    seen.append(len(g))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    writer.start()
    writer.join(120)
    done.set()
    thread.join(30)
    assert writer.exitcode == 0
    assert not errors, errors
    assert seen == sorted(seen)  # the reader only ever sees the store grow
    assert len(set(seen)) > 1  # and it did read while the writer wrote
    with EmbeddingStore(path, ENC_A, readonly=True) as store:
        assert len(store.gallery()) == count


@pytest.mark.parametrize("dangling", [True, False])
def test_a_symlink_as_store_is_refused_and_nothing_is_created(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "elsewhere" / "target.db"
    if not dangling:
        with EmbeddingStore(target, ENC_A) as store:
            store.enroll("ana", _emb(1), _shas(1))
    before = None if dangling else target.read_bytes()
    link = tmp_path / "store.db"
    link.symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        EmbeddingStore(link, ENC_A)
    if dangling:
        assert not target.parent.exists()  # nothing created at the link's target
    else:
        assert target.read_bytes() == before


def test_a_directory_as_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a regular file"):
        EmbeddingStore(tmp_path, ENC_A)


def test_store_wal_and_shm_are_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "sub" / "store.db"
    old = os.umask(0)
    try:
        with EmbeddingStore(path, ENC_A) as store, EmbeddingStore(path, ENC_A, readonly=True) as reader:
            store.enroll("ana", _emb(2), _shas(2))
            assert reader.gallery().names == ["ana"]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"store.db": 0o600, "store.db-wal": 0o600, "store.db-shm": 0o600}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700


def test_an_existing_store_readable_by_others_is_warned_about(tmp_path: Path, caplog) -> None:
    path = tmp_path / "store.db"
    EmbeddingStore(path, ENC_A).close()
    path.chmod(0o644)  # made by an older facedoor
    with caplog.at_level("WARNING", logger="facedoor.store"):
        EmbeddingStore(path, ENC_A, readonly=True).close()
    assert any("mode 0644" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)


def _remove(path: str, name: str) -> None:
    with EmbeddingStore(path, ENC_A) as store:
        store.remove(name)


def _enroll(path: str, name: str) -> None:
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll(name, _emb(1, seed=7), _shas(1, name))


def test_watcher_sees_commits_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", _emb(2), _shas(2, "ana"))
    spawn = multiprocessing.get_context("spawn")
    with StoreWatcher(path) as watcher:
        assert not watcher.changed()
        for target, name in ((_remove, "ana"), (_enroll, "bo")):
            proc = spawn.Process(target=target, args=(str(path), name))
            proc.start()
            proc.join(30)
            assert proc.exitcode == 0
            assert watcher.changed(), f"{target.__name__} {name} not seen"
            assert not watcher.changed()  # once per change
            with EmbeddingStore(path, ENC_A, readonly=True) as reload:  # the door reloads in this process
                reload.identities()
            assert not watcher.changed()  # its own reads are no change, and it is not blinded by them
        with EmbeddingStore(path, ENC_A, readonly=True) as reader:
            assert [i.name for i in reader.identities()] == ["bo"]


def test_watcher_sees_a_replaced_or_vanished_store(tmp_path: Path) -> None:
    path, other = tmp_path / "store.db", tmp_path / "restored.db"
    for p in (path, other):
        with EmbeddingStore(p, ENC_A) as store:
            store.enroll("ana", _emb(1), _shas(1))
    with StoreWatcher(path) as watcher:
        assert not watcher.changed()
        os.replace(other, path)
        assert watcher.changed() and not watcher.changed()
        path.unlink()
        assert watcher.changed() and watcher.changed()  # unreadable: always "reload" (fails closed there)


def test_door_templates_are_bounded_and_never_replace_enrolment(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    emb = _emb(8)
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", emb[:3], _shas(3, "ana"))
        assert [store.add_door_template("ana", e, max_per_person=2) for e in emb[3:7]] == [0, 0, 1, 1]
        (ana,) = store.identities()
        assert (ana.embeddings, ana.door_templates, ana.stale) == (3, 2, 0)
        gallery = store.gallery()
    assert gallery.names == ["ana"] * 3  # the enrolment template and the 2 newest door templates
    np.testing.assert_allclose(gallery.embeddings, np.stack([_template(emb[:3]), emb[5], emb[6]]), atol=1e-6)
    kinds = [row[-1] for row in _rows(path)[1]]
    assert kinds == ["enrolment"] * 3 + ["door"] * 2


def test_door_template_needs_a_known_identity_and_removal_clears_both(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_A) as store:
        with pytest.raises(StoreError, match="no identity named 'ana'"):
            store.add_door_template("ana", _emb(1)[0], 3)
        store.enroll("ana", _emb(2), _shas(2))
        store.add_door_template("ana", _emb(1, 5)[0], 3)
        with pytest.raises(ValueError, match="max_per_person"):
            store.add_door_template("ana", _emb(1, 6)[0], 0)
        assert store.remove("ana") == 3
        assert store.identities() == []
    assert _rows(path) == ([], [])
    with EmbeddingStore(path, ENC_A, readonly=True) as store, pytest.raises(StoreError, match="read-only"):
        store.add_door_template("ana", _emb(1)[0], 3)


_SCHEMA_1 = """
CREATE TABLE identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created TEXT NOT NULL);
CREATE TABLE embeddings (
    id INTEGER PRIMARY KEY, identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    vector BLOB NOT NULL, dim INTEGER NOT NULL,
    encoder_sha256 TEXT NOT NULL CHECK (length(encoder_sha256) = 64),
    image_sha256 TEXT NOT NULL CHECK (length(image_sha256) = 64),
    created TEXT NOT NULL, UNIQUE (identity_id, encoder_sha256, image_sha256));
CREATE INDEX embeddings_identity ON embeddings(identity_id);
PRAGMA application_id = 1178881874;
PRAGMA user_version = 1;
"""


def test_a_schema_1_store_is_read_as_is_and_upgraded_when_written(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    emb = _emb(2)
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA_1)
        db.execute("INSERT INTO identities VALUES (1, 'ana', '2026-01-01T00:00:00+00:00')")
        db.executemany("INSERT INTO embeddings VALUES (?, 1, ?, 128, ?, ?, '2026-01-01T00:00:00+00:00')",
                       [(i + 1, e.astype("<f4").tobytes(), ENC_A, sha)
                        for i, (e, sha) in enumerate(zip(emb, _shas(2)))])
    with EmbeddingStore(path, ENC_A, readonly=True) as store:  # the daemon: reads, never writes
        assert [(i.name, i.embeddings, i.door_templates) for i in store.identities()] == [("ana", 2, 0)]
        np.testing.assert_allclose(store.gallery().embeddings, [_template(emb)], atol=1e-6)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    with EmbeddingStore(path, ENC_A, readonly=True) as store:
        assert store.cohort()[0] == [] and len(store.gallery().cohort) == 0  # no cohort table yet
    with EmbeddingStore(path, ENC_A) as store:
        store.add_door_template("ana", _emb(1, 3)[0], 2)
        assert [(i.embeddings, i.door_templates) for i in store.identities()] == [(2, 1)]
        assert store.set_cohort(["x"], _emb(1, 4)) == 1
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


def test_the_cohort_is_replaced_whole_joins_the_gallery_and_is_bound_to_the_encoder(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", _emb(2), _shas(2))
        assert store.set_cohort(["x", "y", "z"], _emb(3, 7)) == 3
        assert store.set_cohort(["p", "q"], _emb(2, 9)) == 2  # replaces, never adds
        labels, cohort = store.cohort()
        assert labels == ["p", "q"]
        np.testing.assert_array_equal(cohort, _emb(2, 9))
        np.testing.assert_array_equal(store.gallery().cohort, _emb(2, 9))
        assert store.gallery().names == ["ana"]  # cohort people are never members
        bad = _emb(2, 11)
        bad[1, 0] = np.nan
        with pytest.raises(StoreError, match="non-finite"):
            store.set_cohort(["a", "b"], bad)
        assert store.cohort()[0] == ["p", "q"]  # nothing written
    with EmbeddingStore(path, ENC_B, readonly=True) as store, pytest.raises(StoreError, match="another encoder"):
        store.cohort()
    with EmbeddingStore(path, ENC_A, readonly=True) as store, pytest.raises(StoreError, match="read-only"):
        store.set_cohort(["a"], _emb(1))
    with EmbeddingStore(path, ENC_A) as store:
        assert store.set_cohort([], np.zeros((0, 128), np.float32)) == 0
        assert len(store.gallery().cohort) == 0


def test_a_cohort_of_another_encoder_makes_the_gallery_refuse(tmp_path: Path) -> None:
    """The daemon builds its gallery from the store at start and on reload: a cohort another encoder
    made is never mixed in; the gallery refuses with the fix named (the door stays locked)."""
    path = tmp_path / "s.db"
    with EmbeddingStore(path, ENC_B) as store:
        store.set_cohort(["x"], _emb(1, 3))
    with EmbeddingStore(path, ENC_A) as store:
        store.enroll("ana", _emb(2), _shas(2))
    with EmbeddingStore(path, ENC_A, readonly=True) as store, pytest.raises(StoreError, match="facedoor cohort"):
        store.gallery()


def test_add_cohort_keeps_the_cohort_and_refuses_a_vector_that_does_not_fit(tmp_path: Path) -> None:
    """The web console's "this was not X": one face joins the cohort, the rest stays."""
    with EmbeddingStore(tmp_path / "s.db", ENC_A) as store:
        store.enroll("alice", _emb(2), _shas(2))
        store.set_cohort(["lfw-1"], _emb(1, seed=5))
        assert store.add_cohort("not alice (visit v1)", _emb(1, seed=6)[0]) == 2
        labels, vectors = store.cohort()
        assert labels == ["lfw-1", "not alice (visit v1)"] and np.allclose(vectors[1], _emb(1, seed=6)[0])
        for bad in (np.zeros(64, np.float32), np.full(128, np.nan, np.float32), np.zeros(0, np.float32)):
            with pytest.raises(StoreError):
                store.add_cohort("bad", bad)
        assert len(store.cohort()[0]) == 2
        assert len(store.gallery(0.7).cohort) == 2


def test_templates_lists_a_persons_embeddings_by_kind(tmp_path: Path) -> None:
    with EmbeddingStore(tmp_path / "s.db", ENC_A) as store:
        store.enroll("alice", _emb(2), _shas(2))
        store.add_door_template("alice", _emb(1, seed=9)[0], 3)
        templates = store.templates("alice")
        assert [t.kind for t in templates] == ["enrolment", "enrolment", "door"] and all(t.current for t in templates)
        assert templates[0].image_sha256 == _shas(2)[0]
        with pytest.raises(StoreError, match="no identity"):
            store.templates("bob")
