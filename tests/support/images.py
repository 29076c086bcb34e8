"""Real images made in the tests: known pixels, every input kind the service accepts (or not)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 255)


def quadrants(width: int = 40, height: int = 20, mode: str = "RGB") -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: every flip, turn and
    crop is visible in the corners."""
    image = Image.new("RGB", (width, height), WHITE)
    half_w, half_h = width // 2, height // 2
    image.paste(RED, (0, 0, half_w, half_h))
    image.paste(GREEN, (half_w, 0, width, half_h))
    image.paste(BLUE, (0, half_h, half_w, height))
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def with_orientation(image: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    """``image`` stored so that a viewer applying EXIF ``orientation`` shows ``image``."""
    stored = image.transpose(_STORE[orientation]) if orientation in _STORE else image
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = "a test image"  # ImageDescription: shows whether metadata survives
    return encode(stored, fmt, exif=exif.tobytes())


# how a camera stores an upright picture for each orientation (the inverse of what viewers do)
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def animated_gif(frames: int = 4, size: tuple[int, int] = (30, 20)) -> bytes:
    images = [Image.new("RGB", size, (60 * i % 256, 0, 255 - 60 * i % 256)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "GIF", save_all=True, append_images=images[1:], duration=80, loop=0)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def open_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def close(color: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected, strict=False))
