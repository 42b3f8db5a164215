"""Matching: L2 distances from one embedding to every enrolled template, vectorised.

A match is a distance STRICTLY below the threshold. (The exercise this project grew from opened
the door on `dist > 0.7` and named the nearest person even above the threshold; both fail open.)

A person's enrolment photos are matched as one template, the L2-normalised mean of their
embeddings (`person_templates`), as the door's visits are fused: on LFW DevTrain this halved both
the stranger visits accepted and the member visits rejected at 0.7 compared with the nearest
single enrolment photo (`benchmarks/visits.py`; the README's threshold section).

A cohort is a set of templates of people who are not members (e.g. a public face set, stored by
`facedoor cohort DIR`). The door's policy unlocks only when the visit is nearer its member than
any cohort face by a margin: a stranger who looks like a member usually looks as much like
someone in a large cohort (look-alikes come in groups), a member rarely does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Match:
    """The nearest enrolled identity and its distance; `identity` is None when nothing is enrolled
    (or, for `identify`, when the nearest is not below the threshold)."""

    identity: str | None
    distance: float
    threshold: float

    @property
    def matched(self) -> bool:
        """True only for a finite distance strictly below the threshold."""
        return self.identity is not None and bool(np.isfinite(self.distance)) and self.distance < self.threshold


def person_templates(names: list[str], embeddings: np.ndarray) -> tuple[list[str], np.ndarray]:
    """One template per name, in first-appearance order: the L2-normalised mean of its rows."""
    order = list(dict.fromkeys(names))
    if not order:
        return [], np.zeros((0, np.shape(embeddings)[1] if np.ndim(embeddings) == 2 else 0), np.float32)
    rows = np.asarray(embeddings, dtype=np.float64)
    index = {name: i for i, name in enumerate(order)}
    sums = np.zeros((len(order), rows.shape[1]))
    np.add.at(sums, [index[n] for n in names], rows)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("a person's enrolment embeddings cancel out (no template)")
    return order, (sums / norms).astype(np.float32)


class Gallery:
    """Enrolled templates: an (M, D) float32 matrix and the identity name of each row (a person may
    have several: the enrolment template and door templates); optionally a cohort, (C, D) templates
    of people who are not members (`cohort_distance`)."""

    def __init__(self, names: list[str], embeddings: np.ndarray, threshold: float, cohort: np.ndarray | None = None):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(names):
            raise ValueError(f"gallery needs ({len(names)}, D) embeddings, got shape {embeddings.shape}")
        cohort = np.ascontiguousarray(cohort if cohort is not None else np.zeros((0, embeddings.shape[1])), np.float32)
        if cohort.ndim != 2 or (len(cohort) and cohort.shape[1] != embeddings.shape[1]):
            raise ValueError(f"cohort needs (C, {embeddings.shape[1]}) embeddings, got shape {cohort.shape}")
        self.names = list(names)
        self.embeddings = embeddings
        self.cohort = cohort
        self.threshold = float(threshold)
        self._index = {name: i for i, name in enumerate(sorted(set(names)))}
        self.identities = sorted(self._index)
        self._row_identity = np.fromiter((self._index[n] for n in names), dtype=np.int64, count=len(names))
        self._sq_norms = np.einsum("ij,ij->i", embeddings, embeddings)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, M) L2 distances from each of N query embeddings to every stored row."""
        q = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if len(self) == 0:
            return np.zeros((q.shape[0], 0), dtype=np.float32)
        if q.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embedding has {q.shape[1]} dimensions, the gallery {self.embeddings.shape[1]}")
        sq = np.einsum("ij,ij->i", q, q)[:, None] + self._sq_norms[None, :] - 2.0 * (q @ self.embeddings.T)
        return np.sqrt(np.maximum(sq, 0.0))

    def identify(self, embedding: np.ndarray) -> Match:
        """1:K: the nearest identity if its distance is strictly below the threshold, else None."""
        nearest = self.nearest(embedding)
        return nearest if nearest.matched else Match(None, nearest.distance, self.threshold)

    def nearest(self, embedding: np.ndarray) -> Match:
        """The nearest identity whatever its distance (a track's per-frame vote); None when empty."""
        if len(self) == 0:
            return Match(None, float("inf"), self.threshold)
        q = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"embedding has {q.shape[0]} dimensions, the gallery {self.dim}")
        # argmin of |e|^2 - 2 q.e is the nearest row (|q|^2 is constant); then the exact distance.
        i = int(np.argmin(self._sq_norms - 2.0 * (self.embeddings @ q)))
        diff = self.embeddings[i] - q
        return Match(self.names[i], float(np.sqrt(diff @ diff)), self.threshold)

    def cohort_distance(self, embedding: np.ndarray) -> float:
        """The L2 distance from EMBEDDING to the nearest cohort template (inf without a cohort)."""
        if len(self.cohort) == 0:
            return float("inf")
        q = np.asarray(embedding, dtype=np.float32).reshape(-1)
        diff = self.cohort - q
        return float(np.sqrt(np.min(np.einsum("ij,ij->i", diff, diff))))

    def verify(self, name: str, embedding: np.ndarray) -> Match:
        """1:1: the smallest distance to NAME's templates; `.matched` says whether it is below."""
        if name not in self._index:
            raise KeyError(name)
        rows = self._row_identity == self._index[name]
        q = np.atleast_2d(np.asarray(embedding, dtype=np.float32))
        diff = self.embeddings[rows] - q
        distance = float(np.sqrt(np.min(np.einsum("ij,ij->i", diff, diff))))
        return Match(name, distance, self.threshold)
