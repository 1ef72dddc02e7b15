"""Encoded test images: digits drawn on paper, and a corpus of bad images (bombs, truncated,
garbage, unsupported, animated, too large, empty) with the reason each must be refused for."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from mnist_client.images import load_image


def encoded(canvas: np.ndarray, fmt: str = "PNG", mode: str | None = None, **kw: Any) -> bytes:
    img = Image.fromarray(canvas)
    if mode is not None:
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def a_digit(seed: int = 0, size: tuple[int, int] = (90, 70)) -> np.ndarray:
    """Dark strokes on light paper, different for each seed."""
    rng = np.random.default_rng(seed)
    canvas = np.full(size, 235, np.uint8)
    h, w = size
    top, left = int(rng.integers(5, h // 3)), int(rng.integers(5, w // 3))
    canvas[top: h - 10, left: left + 8] = 20
    canvas[top: top + 8, left: w - 8] = 30
    return canvas


def cli_pixels(data: bytes) -> np.ndarray:
    """What `mnist-client classify` would send for this file."""
    return load_image(io.BytesIO(data), name="test")


def bomb_png(side: int = 20000) -> bytes:
    """~400 KB on the wire, side*side pixels decoded."""
    out = io.BytesIO()
    Image.new("L", (side, side), 255).save(out, format="PNG", optimize=False)
    return out.getvalue()


# --- adversarial: every bad image gets INVALID_ARGUMENT naming what is wrong


def _animated_gif() -> bytes:
    frames = [Image.fromarray(a_digit(s)) for s in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return out.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _tiff() -> bytes:
    return encoded(a_digit(9), "TIFF")


# case: (the image, reason label, words the status details must carry, format label)
BAD = {
    "bomb": (lambda: bomb_png(20000), "too_many_pixels", "20000x20000", "PNG"),
    "huge_dimensions": (lambda: bomb_png(4000), "too_many_pixels", "4000x4000", "PNG"),
    "truncated": (lambda: _half(encoded(a_digit(1))), "truncated", "truncated PNG", "PNG"),
    "truncated_jpeg": (lambda: _half(encoded(a_digit(1), "JPEG")), "truncated", "JPEG", "JPEG"),
    "garbage": (lambda: b"\x00garbage" * 50, "not_an_image", "not an image", "unknown"),
    "text": (lambda: "Grüße\n".encode() * 10, "not_an_image", "not an image", "unknown"),
    "tiff": (_tiff, "unsupported_format", "TIFF image", "unknown"),
    "animated": (_animated_gif, "animated", "animated GIF", "GIF"),
    "png_header_only": (lambda: encoded(a_digit(1))[:33], "truncated", "truncated", "PNG"),
    "too_large": (lambda: b"\x89PNG" + b"\x00" * (1 << 20), "too_large", "bytes allowed",
                  "unknown"),
    "empty": (lambda: b"", "empty", "empty", "unknown"),
}
