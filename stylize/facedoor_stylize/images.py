"""Image files for style transfer: read (RGB float32), size, save, colour preservation."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

DEFAULT_SIZE = (300, 400)  # (H, W) of the exercise
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image cannot be read or written; the message names the file."""


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 255]; a missing or undecodable file is an ImageError."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from exc
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise ImageError(f"cannot read image {path}: not a decodable image file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to exactly height x width (area filter when shrinking)."""
    if image.shape[:2] == (height, width):
        return image
    shrink = height * width < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def fit_area(image: np.ndarray, pixels: int) -> np.ndarray:
    """Resize keeping the aspect ratio to about PIXELS pixels (style images)."""
    h, w = image.shape[:2]
    scale = (pixels / float(h * w)) ** 0.5
    return resize(image, max(1, round(h * scale)), max(1, round(w * scale)))


def output_size(shape: tuple[int, ...], size: tuple[int, int] | None, max_side: int | None
                ) -> tuple[int, int]:
    """(H, W) of the result: --size as given, --max-side keeping the aspect, else the
    exercise's 300x400."""
    if size:
        return size
    if max_side:
        h, w = shape[:2]
        scale = max_side / float(max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))
    return DEFAULT_SIZE


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def save_rgb(path: Path, image: np.ndarray) -> None:
    """Write an RGB float image (clipped to [0, 255]) via a temp file + rename."""
    suffix = path.suffix.lower() or ".png"
    ok, encoded = cv2.imencode(suffix, cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageError(f"cannot encode {path}: unsupported image type {suffix!r}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(encoded.tobytes())
        os.replace(tmp, path)
    except OSError as exc:
        raise ImageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def preserve_colors(result: np.ndarray, content: np.ndarray) -> np.ndarray:
    """The result's luminance with the content's chrominance (YCrCb), so only luminance moves."""
    styled = cv2.cvtColor(to_uint8(result), cv2.COLOR_RGB2YCrCb)
    original = cv2.cvtColor(to_uint8(content), cv2.COLOR_RGB2YCrCb)
    styled[..., 1:] = original[..., 1:]
    return cv2.cvtColor(styled, cv2.COLOR_YCrCb2RGB).astype(np.float32)
