"""Photos and scans of digits -> MNIST-style 28x28 uint8 images (needs the `image` extra).

The decoding and preprocessing are mnist_imaging's (`to_mnist`), the code the server runs on
images clients send encoded, so a file gives the same pixels whether the CLI preprocesses it
or the server does. The CLI applies the server's default limits too: a 20000x20000 PNG is
refused from its header with a one-line error instead of a decompression-bomb traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from mnist_imaging.decode import ImageError as DecodeError
from mnist_imaging.decode import ImageLimits, available, to_mnist
from mnist_imaging.preprocess import BOX, FIELD, PreprocessError, Uint8Array
from mnist_imaging.preprocess import preprocess as _preprocess

__all__ = ["BOX", "FIELD", "ImageError", "Uint8Array", "load_image", "preprocess"]


class ImageError(Exception):
    """The file is not a readable image (the message names the file)."""


def load_image(source: Path | BinaryIO, name: str | None = None,
               limits: ImageLimits | None = None) -> Uint8Array:
    """The MNIST-style (28, 28) uint8 image for an image file (or open binary stream);
    errors name `name`, by default the path."""
    name = name or str(source)
    if not available():
        raise ImageError(
            f"{name}: reading images needs Pillow: pip install 'mnist-serving[image]'"
        )
    limits = limits or ImageLimits()
    try:
        if isinstance(source, Path):
            # Read no more than one byte past the limit: the size is refused, not buffered.
            with source.open("rb") as f:
                data = f.read(limits.max_bytes + 1)
        else:
            data = source.read(limits.max_bytes + 1)
    except OSError as e:
        raise ImageError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        return to_mnist(data, limits)
    except DecodeError as e:
        if e.reason == "too_large":
            raise ImageError(f"{name}: larger than {limits.max_bytes} bytes: at most "
                             f"{limits.max_bytes} allowed") from None
        raise ImageError(f"{name}: {e}") from None


def preprocess(gray: Uint8Array) -> Uint8Array:
    """Grayscale 2-D uint8 -> MNIST-style 28x28: ink white, fit in 20x20, centred by mass."""
    try:
        return _preprocess(gray)
    except PreprocessError as e:
        raise ImageError(str(e)) from None
