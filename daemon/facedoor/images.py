"""Reading still images safely: the size is checked from the file header before anything is decoded.

A 390 KB PNG can declare 20000x20000 pixels and cost gigabytes and seconds to decode. `read_image`
reads the file once, takes the dimensions from the header of every format it accepts (PNG, JPEG,
BMP, GIF, WebP, TIFF, PNM), refuses images above a pixel limit with the file and its size in the
message, and only then hands the bytes to OpenCV. Formats without a parsed header are refused.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

MAX_PIXELS = 40_000_000        # 40 MP: any camera photo; a 120 MB BGR array at most
MAX_FILE_BYTES = 128 * 1024 * 1024
FORMATS = "JPEG, PNG, BMP, GIF, WebP, TIFF, PNM"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class ImageError(ValueError):
    """An image file that cannot or must not be decoded; the message names the file and why."""


def _png(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise ValueError("PNG without IHDR")
    return struct.unpack(">II", data[16:24])


def _jpeg(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("JPEG marker expected")
        marker = data[pos + 1]
        if marker == 0xFF:            # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break                     # end of image or start of scan before any frame header
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return width, height
        pos += 2 + length
    raise ValueError("JPEG without a frame header")


def _bmp(data: bytes) -> tuple[int, int]:
    if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack("<HH", data[18:22])
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)     # negative height = top-down rows


def _gif(data: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", data[6:10])


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    raise ValueError("unknown WebP chunk")


def _tiff(data: bytes) -> tuple[int, int]:
    endian = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(endian + "I", data[4:8])[0]
    count = struct.unpack(endian + "H", data[ifd:ifd + 2])[0]
    size: dict[int, int] = {}
    for i in range(count):
        tag, kind, _, value = struct.unpack(endian + "HHI4s", data[ifd + 2 + 12 * i:ifd + 14 + 12 * i])
        if tag in (256, 257):          # ImageWidth, ImageLength: SHORT or LONG
            size[tag] = struct.unpack(endian + ("H" if kind == 3 else "I"), value[:2 if kind == 3 else 4])[0]
    return size[256], size[257]


def _pnm(data: bytes) -> tuple[int, int]:
    fields: list[int] = []
    for line in data[2:4096].split(b"\n"):
        fields += [int(tok) for tok in line.split(b"#", 1)[0].split()]
        if len(fields) >= 2:
            return fields[0], fields[1]
    raise ValueError("PNM without a size")


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8", _jpeg),
    (b"BM", _bmp),
    (b"GIF87a", _gif),
    (b"GIF89a", _gif),
    (b"II*\x00", _tiff),
    (b"MM\x00*", _tiff),
)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of DATA, or None when the format is not one `read_image` accepts."""
    reader: Callable[[bytes], tuple[int, int]] | None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        reader = _webp
    elif len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        reader = _pnm
    else:
        reader = next((fn for magic, fn in _SIGNATURES if data.startswith(magic)), None)
    if reader is None:
        return None
    try:
        return reader(data)
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise ImageError(f"damaged image header ({exc})") from None


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, str]:
    """PATH decoded as BGR with its SHA-256; refused before decoding when its header is too large."""
    data = _checked_bytes(path, max_pixels)
    return _decode(path, data), hashlib.sha256(data).hexdigest()


def decode_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PATH decoded as BGR, checked as `read_image` checks it, without hashing it (`identify`)."""
    return _decode(path, _checked_bytes(path, max_pixels))


def _checked_bytes(path: str | Path, max_pixels: int) -> bytes:
    """PATH's bytes, once its size and header show an image of at most MAX_PIXELS in a known format."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_FILE_BYTES:
                raise ImageError(f"{path}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MB, refused")
            data = fh.read()
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, expected an image file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        size = image_size(data)
    except ImageError as exc:
        raise ImageError(f"{path}: not a readable image: {exc}") from None
    if size is None:
        raise ImageError(f"{path}: not a readable image (expected {FORMATS})")
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{path}: not a readable image (header says {width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(
            f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is above the limit of "
            f"{max_pixels / 1e6:.0f} MP; refused without decoding (scale the photo down)"
        )
    return data


def _decode(path: str | Path, data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"{path}: not a readable image (expected {FORMATS})")
    return image
