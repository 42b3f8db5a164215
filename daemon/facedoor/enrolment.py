"""Enrolment from photos: every photo through the same quality gates, then one store transaction.

The command line (`facedoor enroll`) and the demo enrol through `embed_photos`, so a photo that
one of them would reject the other rejects too.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facedoor.images import ImageError, read_image
from facedoor.pipeline import FacePipeline, PhotoRejected


@dataclass
class EnrolmentPhotos:
    """The outcome of checking photos: embeddings of the usable ones, reasons for the others."""

    paths: list[Path] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """(N, D) embeddings of the usable photos, for `EmbeddingStore.enroll`."""
        return np.stack(self.embeddings)


def embed_photos(pipeline: FacePipeline, paths: Sequence[Path], *, limit: int | None = None,
                 on_reject: Callable[[Path, str], None] | None = None) -> EnrolmentPhotos:
    """Check and embed PATHS in order (at most LIMIT usable ones); ON_REJECT hears each rejection."""
    result = EnrolmentPhotos()
    for path in paths:
        if limit is not None and len(result.paths) >= limit:
            break
        try:
            image, sha = read_image(path)
            face = pipeline.enrolment_face(image)
        except (ImageError, PhotoRejected) as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            result.rejected.append((path, reason))
            if on_reject is not None:
                on_reject(path, reason)
            continue
        assert face.embedding is not None
        result.paths.append(path)
        result.embeddings.append(face.embedding)
        result.hashes.append(sha)
    return result
