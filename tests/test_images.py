"""Still images: header sizes of every accepted format, and oversized images refused before decoding."""
from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from facedoor.images import ImageError, image_size, read_image

W, H = 37, 23


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of WIDTHxHEIGHT (all black): tiny on disk, huge once decoded to BGR."""
    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("ext, params", [
    (".png", []), (".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".bmp", []),
    (".webp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), (".tiff", []), (".ppm", []), (".pgm", []), (".gif", []),
])
def test_header_size_of_every_accepted_format_matches_opencv(tmp_path: Path, ext: str, params: list) -> None:
    image = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(ext, image if ext != ".pgm" else image[:, :, 0], params)
    assert ok
    assert image_size(encoded.tobytes()) == (W, H)
    path = tmp_path / f"photo{ext}"
    path.write_bytes(encoded.tobytes())
    decoded, sha = read_image(path)
    assert decoded.shape == (H, W, 3) and len(sha) == 64


def test_a_20000_by_20000_png_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bilevel_png(20000, 20000))
    assert bomb.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as err:
            read_image(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(bomb) in str(err.value) and "20000x20000" in str(err.value) and "limit" in str(err.value)
    assert peak < 5_000_000  # the file's bytes, never a decoded 1.2 GB array


def test_the_pixel_limit_is_a_parameter(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    path.write_bytes(_bilevel_png(300, 200))
    assert read_image(path)[0].shape == (200, 300, 3)
    with pytest.raises(ImageError, match="300x200"):
        read_image(path, max_pixels=50_000)


def test_unknown_damaged_and_missing_files_are_clear_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        read_image(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_bilevel_png(10, 10)[:20])
    with pytest.raises(ImageError, match=r"cut\.png: not a readable image: damaged image header"):
        read_image(truncated)
    zero = tmp_path / "zero.png"
    zero.write_bytes(_bilevel_png(10, 10).replace(struct.pack(">II", 10, 10), struct.pack(">II", 0, 10), 1))
    with pytest.raises(ImageError, match="0x10"):
        read_image(zero)
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "missing.jpg")
