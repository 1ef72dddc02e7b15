"""Encoded image bytes -> a grayscale array -> MNIST-style pixels, safely, with named failures.

`to_mnist(data, limits)` is what both the CLI and the server's decoder processes run. Every
refusal is an `ImageError` whose `reason` comes from the fixed set REASONS (a metric label,
never caller-chosen text) and whose message says what was expected and what was received.

Safety, in the order the checks run:
- bytes: at most `limits.max_bytes`, at least one;
- format: only the allow-list FORMATS is ever handed to a Pillow plugin (`Image.open(...,
  formats=...)`), so the rarely used parsers with long CVE histories (TIFF, PSD, EPS, ICO,
  ...) are never reached; a known format outside the list is named as such;
- pixels: width x height from the header, checked against `limits.max_pixels` BEFORE the
  pixel data is decoded (a 20000x20000 PNG is 0.4 MB on the wire and 400 MB decoded). It
  replaces Pillow's own check (Image.MAX_IMAGE_PIXELS, which warns or raises at open time
  without saying the size); a DecompressionBombError is still mapped to the same reason;
- frames: animated images (GIF, APNG, WebP) are refused, not silently cut to one frame; a
  phone's multi-picture JPEG (MPO) is a JPEG whose first picture is the photo;
- modes: palette, alpha (flattened onto white, as a viewer shows it), CMYK, 16-bit and 1-bit
  images are turned into 8-bit gray explicitly; anything else is refused by name.
Time is bounded by the caller: the server decodes in processes it can kill (mnist_imaging.pool).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from mnist_imaging.preprocess import BOX, PreprocessError, Uint8Array, preprocess

# Pillow format ids that may be decoded (PPM covers the PBM/PGM/PPM family; MPO is how Pillow
# names a JPEG that carries extra pictures, as phone cameras write them).
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "PPM")
_OPEN_FORMATS = FORMATS  # a JPEG with extra pictures opens as "MPO" through JPEG
ALLOWED_TEXT = "PNG, JPEG, GIF, BMP, WebP or PNM (PBM/PGM/PPM)"
# Why an image was refused: the bounded label set of mnist_image_decode_failures_total.
REASONS = (
    "empty", "too_large", "not_an_image", "unsupported_format", "too_many_pixels", "animated",
    "truncated", "corrupt", "unsupported_mode", "timeout", "crashed",
)
# Signatures of formats we recognise but do not decode, so the message can name them.
_REFUSED_SIGNATURES = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%!PS", "PostScript"), (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"icns", "ICNS"),
    (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "Radiance HDR"),
)
# Defaults shared by the CLI and the server (service/config.py takes them as its defaults).
DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_MAX_PIXELS = 1 << 22  # 2048 x 2048
# All of one request's images together (a decoder's work per request is bounded by pixels, not
# by image count: 4096 MNIST-size images are 3.2 Mpx, four 2048 x 2048 photos 16.8 Mpx).
DEFAULT_MAX_REQUEST_PIXELS = 1 << 24


class ImageError(ValueError):
    """An image that cannot become MNIST pixels; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str, image_format: str = "unknown") -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.format = image_format if image_format in FORMATS else "unknown"


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost: encoded bytes and decoded pixels (checked from the header);
    `max_request_pixels` bounds all images of one server request (mnist_imaging.worker)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS


def available() -> bool:
    """Whether Pillow (the `image` extra) is installed; found without importing it."""
    return importlib.util.find_spec("PIL") is not None


def to_mnist(data: bytes, limits: ImageLimits) -> Uint8Array:
    """MNIST-style (28, 28) uint8 pixels for one encoded image, or ImageError saying why not."""
    return to_mnist_counted(data, limits)[0]


def to_mnist_counted(data: bytes, limits: ImageLimits,
                     pixels_left: int | None = None) -> tuple[Uint8Array, int]:
    """to_mnist, and how many pixels were decoded (what the image cost). `pixels_left`: what
    the request's pixel budget still allows this image (a server request of many images);
    the per-image limit applies whatever it says."""
    if pixels_left is not None and pixels_left < limits.max_pixels:
        limits = dataclasses.replace(limits, max_pixels=max(pixels_left, 0))
    gray = decode_gray(data, limits)
    try:
        return preprocess(gray), int(gray.size)
    except PreprocessError as e:
        raise ImageError("unsupported_mode", str(e)) from None


def decode_gray(data: bytes, limits: ImageLimits) -> Uint8Array:
    """The image as 2-D uint8 gray (0 black .. 255 white), every limit checked first."""
    if not data:
        raise ImageError("empty", "empty image: expected the bytes of an encoded image, got 0")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"image of {len(data)} bytes: at most "
                                      f"{limits.max_bytes} bytes allowed")
    Image, UnidentifiedImageError = _pillow()
    # Our header check below (right after open, before any pixel is decoded) is the limit, and
    # names the size; Pillow's own, in open, would pre-empt it with a vaguer message.
    Image.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
        except Image.DecompressionBombError:
            raise ImageError("too_many_pixels", f"more than {2 * limits.max_pixels} pixels: "
                                                f"at most {limits.max_pixels} allowed "
                                                "(refused before decoding)") from None
        except UnidentifiedImageError:
            raise _unidentified(data) from None
        except Exception as e:  # a plugin's complaint about a damaged header
            name = _sniff(data) or "image"
            if "runcated" in str(e) or isinstance(e, EOFError):
                raise ImageError("truncated", f"truncated {name} ({_short(e)})", name) \
                    from None
            raise ImageError("corrupt", f"damaged {name} header ({_short(e)})", name) from None
        with img:
            return _gray(img, limits)


def _pillow() -> tuple[Any, Any]:
    """Pillow with only the allow-listed plugins imported (Image.open's `formats` needs them
    registered; importing them by name keeps the other ~40 parsers out of the process)."""
    from PIL import (  # noqa: F401  (imported to register their formats)
        BmpImagePlugin,
        GifImagePlugin,
        Image,
        JpegImagePlugin,
        PngImagePlugin,
        PpmImagePlugin,
        UnidentifiedImageError,
        WebPImagePlugin,
    )

    return Image, UnidentifiedImageError


def _gray(img: Any, limits: ImageLimits) -> Uint8Array:
    fmt = "JPEG" if img.format == "MPO" else str(img.format)
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError("empty", f"{fmt} image of {width}x{height} pixels: expected at "
                                  "least 1x1", fmt)
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"{fmt} image of {width}x{height} = {width * height} pixels: at most "
            f"{limits.max_pixels} allowed (refused before decoding)", fmt,
        )
    if img.format != "MPO" and getattr(img, "is_animated", False):
        raise ImageError("animated", f"animated {fmt} ({getattr(img, 'n_frames', '?')} "
                                     "frames): expected a single still image", fmt)
    if fmt == "JPEG":
        # Decode at the smallest DCT scale that keeps several times the 20x20 box: a photo
        # of a digit costs a fraction of full-size decoding, identically on both sides.
        img.draft("L", (BOX * 8, BOX * 8))
    try:
        img.load()
        return _to_gray(img, fmt)
    except ImageError:
        raise
    except OSError as e:
        text = str(e)
        if "truncated" in text or "broken data stream" in text or "EOF" in text:
            raise ImageError("truncated", f"truncated {fmt} image ({_short(e)})", fmt) from None
        raise ImageError("corrupt", f"corrupt {fmt} image ({_short(e)})", fmt) from None
    except Exception as e:  # SyntaxError, ValueError, struct.error, EOFError from a plugin
        raise ImageError("corrupt", f"corrupt {fmt} image ({_short(e)})", fmt) from None


def _to_gray(img: Any, fmt: str) -> Uint8Array:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit gray: scale to 8 bits (Pillow's convert("L") would clip everything >255).
        wide = np.asarray(img.convert("I"), dtype=np.float32) / 257.0
        scaled: Uint8Array = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
        return scaled
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32)
        flat = gray * alpha + 255.0 * (1.0 - alpha)  # transparent = white paper
        flattened: Uint8Array = np.clip(np.rint(flat), 0, 255).astype(np.uint8)
        return flattened
    if mode in ("L", "1", "P", "RGB", "CMYK", "YCbCr", "RGBX"):
        out: npt.NDArray[np.uint8] = np.asarray(img.convert("L"), dtype=np.uint8)
        return out
    raise ImageError("unsupported_mode", f"{fmt} image in pixel mode {mode!r}: expected "
                                         "gray, RGB, palette, CMYK or 16-bit gray", fmt)


# Signatures of the formats we decode: bytes that start like one but could not be opened
# were cut short (or damaged) rather than something else altogether.
_ALLOWED_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"BM", "BMP"),
)


def _sniff(data: bytes) -> str | None:
    """Which allowed format the bytes start like, if any."""
    for signature, name in _ALLOWED_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _unidentified(data: bytes) -> ImageError:
    name = _sniff(data)
    if name is not None:
        return ImageError("truncated", f"truncated or damaged {name} image: its header "
                                       f"cannot be read ({len(data)} bytes)", name)
    for signature, name in _REFUSED_SIGNATURES:
        if data.startswith(signature):
            return ImageError("unsupported_format",
                              f"a {name} image: expected {ALLOWED_TEXT}")
    if data[4:8] == b"ftyp":
        return ImageError("unsupported_format",
                          f"a HEIF/AVIF image: expected {ALLOWED_TEXT}")
    if data.lstrip()[:1] == b"<":
        return ImageError("unsupported_format", f"SVG/XML: expected {ALLOWED_TEXT}")
    return ImageError("not_an_image", f"not an image ({len(data)} bytes starting "
                                      f"{data[:8].hex()}): expected {ALLOWED_TEXT}")


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."
