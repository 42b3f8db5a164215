"""Still images from files: one way to read a photo, decode it with OpenCV and hash its bytes."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


class ImageError(ValueError):
    """A file that is not a readable image; the message names the file and why."""


def read_image(path: Path) -> tuple[np.ndarray, str]:
    """Decode PATH into a BGR image; return it with the SHA-256 of the file's bytes."""
    import cv2

    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, expected an image file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ImageError(f"{path}: not a readable image (expected JPEG, PNG, BMP, WebP, TIFF...)")
    return image, hashlib.sha256(data).hexdigest()
