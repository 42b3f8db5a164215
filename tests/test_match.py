"""Matching: L2 distances, strictly-below-threshold semantics (regressions of the exercise's bugs)."""
from __future__ import annotations

import numpy as np
import pytest

from facedoor.match import Gallery, Match, person_templates


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _at_distance(base: np.ndarray, d: float) -> np.ndarray:
    """A unit vector at exactly L2 distance D from the unit vector BASE (d <= 2)."""
    other = np.zeros_like(base)
    other[1] = 1.0
    other -= base * (other @ base)
    other /= np.linalg.norm(other)
    cos = 1.0 - d * d / 2.0
    return (cos * base + np.sqrt(1.0 - cos * cos) * other).astype(np.float32)


@pytest.fixture
def gallery() -> Gallery:
    rng = np.random.default_rng(0)
    names = ["ana", "ana", "bo", "cy"]
    return Gallery(names, _unit(rng.normal(size=(4, 128))), threshold=0.7)


def test_distances_match_numpy_reference(gallery: Gallery) -> None:
    rng = np.random.default_rng(1)
    q = _unit(rng.normal(size=(3, 128)))
    expected = np.linalg.norm(q[:, None, :] - gallery.embeddings[None], axis=-1)
    np.testing.assert_allclose(gallery.distances(q), expected, atol=1e-5)


def test_identify_returns_nearest_below_threshold(gallery: Gallery) -> None:
    q = _at_distance(gallery.embeddings[2], 0.3)
    m = gallery.identify(q)
    assert m.identity == "bo" and m.matched
    assert m.distance == pytest.approx(0.3, abs=1e-5)


def test_identify_returns_no_one_above_threshold(gallery: Gallery) -> None:
    """Regression: the exercise's who_is_it named the nearest person even above the threshold."""
    q = _at_distance(gallery.embeddings[2], 0.9)
    # make sure nobody else is nearer than 0.7 either
    assert gallery.distances(q).min() >= 0.7
    m = gallery.identify(q)
    assert m.identity is None and not m.matched
    assert m.distance >= 0.7


def test_distance_equal_to_threshold_is_not_a_match() -> None:
    """A distance exactly at the threshold is NOT a match (strictly below only)."""
    base = _unit(np.eye(128, dtype=np.float32)[0])
    q = _at_distance(base, 0.5)
    probe = Gallery(["ana"], base[None], threshold=1.0)
    d_verify, d_identify = probe.verify("ana", q).distance, probe.identify(q).distance
    assert probe.verify("ana", q).matched  # well below 1.0

    at_verify = Gallery(["ana"], base[None], threshold=d_verify).verify("ana", q)
    assert at_verify.distance == d_verify == at_verify.threshold
    assert not at_verify.matched
    at_identify = Gallery(["ana"], base[None], threshold=d_identify).identify(q)
    assert at_identify.distance == d_identify == at_identify.threshold
    assert at_identify.identity is None and not at_identify.matched
    assert not Match("ana", 0.7, 0.7).matched
    assert Match("ana", np.nextafter(0.7, 0), 0.7).matched


def test_verify_opens_only_below_threshold(gallery: Gallery) -> None:
    """Regression: the exercise opened the door when dist > 0.7."""
    near = _at_distance(gallery.embeddings[0], 0.2)
    far = _at_distance(gallery.embeddings[3], 1.2)
    assert gallery.verify("ana", near).matched
    m = gallery.verify("cy", far)
    assert m.identity == "cy" and m.distance > 0.7 and not m.matched


def test_verify_uses_the_closest_of_several_photos(gallery: Gallery) -> None:
    q = _at_distance(gallery.embeddings[1], 0.1)
    assert gallery.verify("ana", q).distance == pytest.approx(0.1, abs=1e-5)


def test_verify_unknown_name_raises(gallery: Gallery) -> None:
    with pytest.raises(KeyError):
        gallery.verify("nobody", gallery.embeddings[0])


def test_empty_gallery_never_matches() -> None:
    g = Gallery([], np.zeros((0, 128), np.float32), 0.7)
    m = g.identify(np.ones(128, np.float32))
    assert m.identity is None and not m.matched


def test_nan_distance_never_matches() -> None:
    assert not Match("ana", float("nan"), 0.7).matched


def test_dimension_mismatch_is_an_error(gallery: Gallery) -> None:
    with pytest.raises(ValueError, match="dimensions"):
        gallery.identify(np.ones(64, np.float32))


def test_identify_against_100k_embeddings_is_exact() -> None:
    rng = np.random.default_rng(2)
    emb = _unit(rng.normal(size=(100_000, 128)))
    names = [f"p{i % 1000}" for i in range(len(emb))]
    g = Gallery(names, emb, 0.7)
    q = _at_distance(emb[54321], 0.25)
    m = g.identify(q)
    assert m.identity == names[54321]
    assert m.distance == pytest.approx(float(np.linalg.norm(emb - q, axis=1).min()), abs=1e-5)


def test_person_templates_are_normalised_means_in_first_appearance_order() -> None:
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(5, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    names, templates = person_templates(["bo", "ana", "bo", "ana", "bo"], rows)
    assert names == ["bo", "ana"]
    for name, idx, template in ((names[0], [0, 2, 4], templates[0]), (names[1], [1, 3], templates[1])):
        mean = rows[idx].mean(axis=0)
        np.testing.assert_allclose(template, mean / np.linalg.norm(mean), atol=1e-6, err_msg=name)
    assert person_templates([], np.zeros((0, 16), np.float32))[1].shape == (0, 16)


def test_a_template_is_nearer_to_a_fresh_photo_of_the_person_than_its_rows_on_average() -> None:
    """Why the door matches templates: the mean of noisy photos of one face sits nearer its next photo."""
    rng = np.random.default_rng(4)
    face = rng.normal(size=128)
    photos = face + 0.9 * rng.normal(size=(3, 128)) * np.linalg.norm(face) / np.sqrt(128)
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    _, (template,) = person_templates(["ana"] * 3, photos.astype(np.float32))
    probes = face + 0.9 * rng.normal(size=(200, 128)) * np.linalg.norm(face) / np.sqrt(128)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    to_template = np.linalg.norm(probes - template, axis=1)
    to_nearest_photo = np.linalg.norm(probes[:, None] - photos[None], axis=2).min(axis=1)
    assert np.median(to_template) < np.median(to_nearest_photo)


def test_rows_that_cancel_out_have_no_template() -> None:
    v = np.eye(4, dtype=np.float32)[:1]
    with pytest.raises(ValueError, match="cancel out"):
        person_templates(["ana", "ana"], np.concatenate([v, -v]))


def test_cohort_distance_is_to_the_nearest_cohort_template_and_infinite_without_one() -> None:
    a, b = np.eye(3, dtype=np.float32)[:2]
    assert Gallery(["a"], a[None], 0.7).cohort_distance(a) == float("inf")
    g = Gallery(["a"], a[None], 0.7, cohort=np.stack([b, (a + b) / np.linalg.norm(a + b)]))
    assert g.cohort_distance(a) == pytest.approx(np.linalg.norm(a - (a + b) / np.linalg.norm(a + b)))
    with pytest.raises(ValueError, match="cohort needs"):
        Gallery(["a"], a[None], 0.7, cohort=np.zeros((2, 5), np.float32))
