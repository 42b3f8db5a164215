"""`facedoor` recognition commands end to end with the real FaceNet + MTCNN (ONNX Runtime).

The Happy House table of the exercise the project grew from, real faces of the 5-celebrity set,
and every kind of bad input: one line on stderr, exit code 2, nothing stored.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.cli import main

pytestmark = pytest.mark.slow

RESIDENTS = ["danielle.png", "younes.jpg", "tian.jpg", "andrew.jpg", "kian.jpg", "dan.jpg", "sebastiano.jpg",
             "bertrand.jpg", "kevin.jpg", "felix.jpg", "benoit.jpg", "arnaud.jpg"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    """main(argv) in-process with --json: (exit code, JSON lines on stdout, stderr)."""
    capsys.readouterr()  # drop what earlier calls printed
    code = main(["--json", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err
    assert all(f in err for f in fragments), err


@pytest.fixture(scope="module")
def happy_house(real_models: Path, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The twelve residents enrolled (each from its single 96x96 face crop) into a fresh store."""
    store = tmp_path_factory.mktemp("hh") / "store.db"
    base = ["--models", str(real_models), "--store", str(store)]
    for photo in RESIDENTS:
        name = photo.split(".")[0]
        assert main([*base, "enroll", name, str(shared_dir / "data/happyhouse" / photo)]) == 0, photo
    return base


def test_happy_house_list(happy_house: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = run(capsys, *happy_house, "list")
    assert code == 0
    assert sorted(r["identity"] for r in rows) == sorted(p.split(".")[0] for p in RESIDENTS)
    assert all(r["embeddings"] == 1 and r["stale"] == 0 for r in rows)


def test_verify_younes_camera_0_matches(happy_house: list[str], shared_dir: Path, capsys) -> None:
    image = str(shared_dir / "data/happyhouse/camera_0.jpg")
    code, rows, _ = run(capsys, *happy_house, "verify", "younes", image)
    assert rows == [{"image": image, "identity": "younes", "distance": rows[0]["distance"], "threshold": 0.7,
                     "match": True}]
    assert rows[0]["distance"] < 0.7 and code == 0


def test_verify_kian_camera_2_does_not_match(happy_house: list[str], shared_dir: Path, capsys) -> None:
    """camera_2 is benoit with kian's badge: the exercise's `dist > 0.7` check let him in."""
    code, rows, _ = run(capsys, *happy_house, "verify", "kian", str(shared_dir / "data/happyhouse/camera_2.jpg"))
    assert code == 1
    assert rows[0]["match"] is False and rows[0]["distance"] >= 0.7 and rows[0]["identity"] == "kian"


def test_identify_camera_0_and_1(happy_house: list[str], shared_dir: Path, capsys) -> None:
    images = [str(shared_dir / f"data/happyhouse/camera_{i}.jpg") for i in (0, 1)]
    code, rows, _ = run(capsys, *happy_house, "identify", *images)
    assert code == 0
    assert [(r["image"], r["faces"], r["identity"]) for r in rows] == [
        (images[0], 1, "younes"), (images[1], 1, "bertrand")]
    assert all(r["distance"] < r["threshold"] == 0.7 for r in rows)


def test_identify_reports_no_one_above_threshold(happy_house: list[str], shared_dir: Path, capsys) -> None:
    """A face far from everyone is `identity: null`, never the nearest name (the exercise's who_is_it bug)."""
    lfw = sorted((shared_dir / "data/faces/lfw10/Colin_Powell").glob("*.jpg"))[0]
    code, rows, _ = run(capsys, *happy_house, "identify", str(lfw))
    assert code == 0
    assert rows[0]["identity"] is None and rows[0]["distance"] >= 0.7


def test_verify_in_a_real_subprocess(happy_house: list[str], shared_dir: Path) -> None:
    exe = Path(sys.executable).with_name("facedoor")
    image = str(shared_dir / "data/happyhouse/camera_0.jpg")
    proc = subprocess.run([str(exe), *happy_house, "verify", "younes", image, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["match"] is True
    proc = subprocess.run([str(exe), *happy_house, "verify", "younes", "/nonexistent.jpg"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "/nonexistent.jpg" in proc.stderr and "Traceback" not in proc.stderr


# -- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def photos(tmp_path: Path, shared_dir: Path) -> dict[str, Path]:
    """Good and bad enrolment photos written with OpenCV."""
    lfw = shared_dir / "data/faces/lfw10"
    blair = sorted((lfw / "Tony_Blair").glob("*.jpg"))  # _0001 has a second person beside him
    a = cv2.imread(str(blair[1]))
    b = cv2.imread(str(sorted((lfw / "Hugo_Chavez").glob("*.jpg"))[0]))
    out = {
        "good": tmp_path / "good.jpg", "good2": tmp_path / "good2.jpg",
        "blurred": tmp_path / "blurred.jpg", "two": tmp_path / "two.jpg", "blank": tmp_path / "blank.png",
        "text": tmp_path / "notes.jpg", "missing": tmp_path / "missing.jpg", "tiny": tmp_path / "tiny.jpg",
    }
    cv2.imwrite(str(out["good"]), a)
    cv2.imwrite(str(out["good2"]), cv2.imread(str(blair[2])))
    cv2.imwrite(str(out["blurred"]), cv2.GaussianBlur(a, (0, 0), 4))
    cv2.imwrite(str(out["two"]), np.hstack([a, b]))
    cv2.imwrite(str(out["blank"]), np.full((300, 300, 3), 128, np.uint8))
    cv2.imwrite(str(out["tiny"]), cv2.resize(a, (60, 60), interpolation=cv2.INTER_AREA))
    out["text"].write_text("not an image\n")
    return out


@pytest.mark.parametrize("bad, reason", [
    ("blurred", "too blurred"), ("two", "2 faces found, need exactly one"), ("blank", "no face found"),
    ("text", "not a readable image"), ("missing", "cannot read"), ("tiny", "too small"),
])
def test_enrol_rejects_bad_photo_and_stores_nothing(real_models: Path, tmp_path: Path, photos, capsys,
                                                    bad: str, reason: str) -> None:
    store = tmp_path / "store.db"
    base = ["--models", str(real_models), "--store", str(store)]
    code, _, err = run(capsys, *base, "enroll", "tony", str(photos["good"]), str(photos[bad]))
    assert_clean_error(code, err, str(photos[bad]), reason, "nothing enrolled")
    assert not store.exists()

    # with an existing store: still unchanged, byte for byte in its rows
    assert main([*base, "enroll", "tony", str(photos["good"])]) == 0
    with sqlite3.connect(store) as db:
        before = db.execute("SELECT * FROM embeddings").fetchall()
    code, _, err = run(capsys, *base, "enroll", "tony", str(photos["good2"]), str(photos[bad]))
    assert_clean_error(code, err, reason)
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT * FROM embeddings").fetchall() == before


def test_enrol_skip_bad_keeps_the_good_photos(real_models: Path, tmp_path: Path, photos, capsys) -> None:
    base = ["--models", str(real_models), "--store", str(tmp_path / "s.db")]
    code, rows, err = run(capsys, *base, "enroll", "tony", str(photos["good"]), str(photos["blurred"]),
                          str(photos["good2"]), "--skip-bad")
    assert code == 0 and "too blurred" in err
    assert rows[-1] == {"identity": "tony", "enrolled": 2, "new": 2, "rejected": 1, "store": str(tmp_path / "s.db")}
    assert {r["image"]: r["status"] for r in rows[:-1]} == {
        str(photos["blurred"]): "rejected", str(photos["good"]): "enrolled", str(photos["good2"]): "enrolled"}


def test_bad_input_is_one_line_exit_2(real_models: Path, tmp_path: Path, photos, capsys) -> None:
    store = tmp_path / "s.db"
    base = ["--models", str(real_models), "--store", str(store)]
    # empty store (no file yet)
    code, _, err = run(capsys, *base, "identify", str(photos["good"]))
    assert_clean_error(code, err, str(store))
    assert main([*base, "enroll", "tony", str(photos["good"])]) == 0
    capsys.readouterr()
    cases = [
        (["verify", "nobody", str(photos["good"])], ["no identity named 'nobody'"]),
        (["verify", "tony", str(photos["blank"])], [str(photos["blank"]), "no face found"]),
        (["verify", "tony", str(photos["text"])], [str(photos["text"]), "not a readable image"]),
        (["verify", "tony", str(tmp_path)], ["is a directory"]),
        (["remove", "nobody"], ["no identity named 'nobody'"]),
        (["--models", str(tmp_path / "nomodels"), "verify", "tony", str(photos["good"])], ["no model manifest"]),
        (["enroll", " bad name", str(photos["good"])], ["identity name"]),
    ]
    for argv, fragments in cases:
        code, rows, err = run(capsys, *base, *argv)
        assert_clean_error(code, err, *fragments)
        assert err.count("\n") == 1, err
    # identify: good images still reported, the bad one named, exit 2
    code, rows, err = run(capsys, *base, "identify", str(photos["good"]), str(photos["blank"]))
    assert code == 2 and [r["identity"] for r in rows] == ["tony"]
    assert str(photos["blank"]) in err and "no face found" in err
    # remove, then the store is empty
    assert main([*base, "remove", "tony"]) == 0
    code, _, err = run(capsys, *base, "verify", "tony", str(photos["good"]))
    assert_clean_error(code, err, "no one enrolled")


@pytest.mark.parametrize("threads", [1, 2])
def test_identify_reads_ahead_and_reports_in_order(real_models: Path, tmp_path: Path, photos, capsys,
                                                   threads: int) -> None:
    """Photos are decoded ahead by a small thread pool and, with 2 threads to spend, detected ahead by a
    worker while one is encoded: results and errors still come one per photo, in the order given, the
    same either way, and a bad photo costs nothing but its own line."""
    config = tmp_path / "facedoor.yaml"
    config.write_text(f"recognition:\n  threads: {threads}\n")
    base = ["--config", str(config), "--models", str(real_models), "--store", str(tmp_path / "s.db")]
    assert main([*base, "enroll", "tony", str(photos["good"])]) == 0
    order = [photos["good"], photos["text"], photos["good2"], tmp_path, photos["missing"], photos["blank"],
             photos["good2"], photos["good"]]
    code, rows, err = run(capsys, *base, "identify", *map(str, order))
    assert code == 2
    assert [r["image"] for r in rows] == [str(p) for p in order if p in (photos["good"], photos["good2"])]
    assert all(r["identity"] == "tony" for r in rows if r["image"] == str(photos["good"]))  # the enrolled photo
    errors = [line for line in err.splitlines() if line.strip()]
    assert len(errors) == 4 and "Traceback" not in err
    for line, bad, reason in zip(errors, [photos["text"], tmp_path, photos["missing"], photos["blank"]],
                                 ["not a readable image", "is a directory", "cannot read", "no face found"]):
        assert str(bad) in line and reason in line, line
    good = [r["distance"] for r in rows if r["image"] == str(photos["good"])]
    assert len(good) == 2 and good[0] == good[1]  # the same photo, the same distance each time


def test_corrupt_store_is_reported_not_overwritten(real_models: Path, tmp_path: Path, photos, capsys) -> None:
    store = tmp_path / "s.db"
    store.write_bytes(b"\x00garbage" * 100)
    code, _, err = run(capsys, "--models", str(real_models), "--store", str(store), "enroll", "tony",
                       str(photos["good"]))
    assert_clean_error(code, err, str(store), "not a facedoor embedding store")
    assert store.read_bytes() == b"\x00garbage" * 100


def test_model_hash_mismatch_is_refused(real_models: Path, tmp_path: Path, photos, capsys) -> None:
    models = tmp_path / "models"
    shutil.copytree(real_models, models)
    onnx = models / json.loads((models / "manifest.json").read_text())["models"]["mtcnn_onet"]["file"]
    onnx.write_bytes(onnx.read_bytes()[:-10])
    code, _, err = run(capsys, "--models", str(models), "--store", str(tmp_path / "s.db"), "enroll", "tony",
                       str(photos["good"]))
    assert_clean_error(code, err, "mtcnn_onet", "SHA-256")
    assert not (tmp_path / "s.db").exists()


# -- real faces: the 5-celebrity set -----------------------------------------------------------

def test_celebrities_identified_and_stranger_never_matched(real_models: Path, celebrity_dir: Path,
                                                           tmp_path: Path, capsys) -> None:
    """Enrol four people from train/, identify val/: most are found, none as someone else, and the
    fifth person (never enrolled) is never matched."""
    base = ["--models", str(real_models), "--store", str(tmp_path / "s.db")]
    people = sorted(p.name for p in (celebrity_dir / "train").iterdir() if p.is_dir())
    stranger, enrolled = people[-1], people[:-1]
    for name in enrolled:
        photos = sorted(str(p) for p in (celebrity_dir / "train" / name).glob("*.jpg"))
        code, rows, _ = run(capsys, *base, "enroll", name, *photos, "--skip-bad")
        assert code == 0 and rows[-1]["enrolled"] >= 5, rows[-1]

    val = sorted((celebrity_dir / "val").glob("*/*.jpg"))
    code, rows, _ = run(capsys, *base, "identify", *map(str, val))
    truth = {str(p): p.parent.name for p in val}
    known = [r for r in rows if truth[r["image"]] != stranger]
    strangers = [r for r in rows if truth[r["image"]] == stranger]
    assert len(known) >= 15 and len(strangers) >= 4
    wrong = [r for r in rows if r["identity"] is not None and r["identity"] != truth[r["image"]]]
    assert wrong == [], wrong
    assert all(r["identity"] is None for r in strangers)
    rate = sum(r["identity"] == truth[r["image"]] for r in known) / len(known)
    print(f"5-celebrity val: {rate:.0%} of {len(known)} enrolled-person photos identified at 0.7, "
          f"0 of {len(strangers)} stranger photos matched")
    assert rate >= 0.6


def test_cohort_is_built_from_a_folder_of_people_warns_of_a_member_and_clears(
        real_models: Path, celebrity_dir: Path, tmp_path: Path, capsys) -> None:
    """`facedoor cohort DIR`: one template per person folder (or loose photo), bad photos counted,
    a member found in the cohort named; status and --clear; bad input changes nothing."""
    base = ["--models", str(real_models), "--store", str(tmp_path / "s.db")]
    train, val = celebrity_dir / "train", celebrity_dir / "val"
    code, _, _ = run(capsys, *base, "enroll", "elton_john", *map(str, sorted((train / "elton_john").glob("*.jpg"))[:5]))
    assert code == 0
    cohort = tmp_path / "cohort"
    for person in ("jerry_seinfeld", "madonna"):
        (cohort / person).mkdir(parents=True)
        for photo in sorted((train / person).glob("*.jpg"))[:3]:
            shutil.copy(photo, cohort / person)
    shutil.copy(sorted((train / "mindy_kaling").glob("*.jpg"))[0], cohort / "mindy.jpg")  # a loose photo: one person
    (cohort / "elton_again").mkdir()
    for photo in sorted((val / "elton_john").glob("*.jpg"))[:3]:
        shutil.copy(photo, cohort / "elton_again")
    (cohort / "madonna" / "broken.jpg").write_bytes(b"not a jpeg")

    code, rows, err = run(capsys, *base, "cohort", str(cohort))
    assert code == 0, err
    assert rows[-1]["cohort"] == 4 and rows[-1]["rejected"] >= 1 and rows[-1]["photos"] + rows[-1]["rejected"] == 11
    assert "'elton_again'" in err and "'elton_john'" in err and "jerry" not in err  # only the member's double
    code, rows, _ = run(capsys, *base, "cohort")
    assert (code, rows[-1]["cohort"]) == (0, 4)

    for bad in (tmp_path / "missing", tmp_path / "s.db"):
        code, _, err = run(capsys, *base, "cohort", str(bad))
        assert_clean_error(code, err, "not a directory")
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, *base, "cohort", str(tmp_path / "empty"))
    assert_clean_error(code, err, "no face photos")
    code, rows, _ = run(capsys, *base, "cohort")
    assert rows[-1]["cohort"] == 4  # unchanged by the failures

    code, rows, _ = run(capsys, *base, "cohort", "--clear")
    assert (code, rows[-1]["dropped"]) == (0, 4)
    code, rows, _ = run(capsys, *base, "cohort")
    assert rows[-1]["cohort"] == 0
