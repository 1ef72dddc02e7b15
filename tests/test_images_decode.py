"""mnist_imaging on its own and through the CLI: modes, limits, the decoder processes.

The server's end-to-end behaviour is tests/test_images.py; here the decoding itself is pinned
down: every pixel mode a PNG/JPEG/GIF can carry gives the digit a viewer shows, the limits
hold before any pixel is decoded, a decoder process past its time limit is killed, and the
CLI reports a decompression bomb in one line.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_imaging.decode import FORMATS, REASONS, ImageError, ImageLimits, decode_gray, to_mnist
from mnist_imaging.pool import DecodeFailed, DecoderPool

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ImageLimits()


def save(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def paper_digit() -> np.ndarray:
    canvas = np.full((64, 48), 240, np.uint8)
    canvas[8:56, 20:28] = 15
    canvas[8:16, 12:36] = 15
    return canvas


def test_every_pixel_mode_gives_the_digit_a_viewer_shows() -> None:
    gray = paper_digit()
    reference = to_mnist(save(Image.fromarray(gray)), LIMITS)
    assert reference.max() == 255  # the digit is there, ink white
    rgb = Image.fromarray(gray).convert("RGB")
    # 16-bit gray: Pillow's plain convert("L") would clip it to white and lose the digit.
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    # Ink on a transparent background: black pixels, alpha 0 outside the strokes.
    rgba = np.zeros((*gray.shape, 4), np.uint8)
    rgba[..., 3] = np.where(gray < 128, 255, 0)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    for name, data in {
        "RGB": save(rgb), "16-bit": save(wide), "palette": save(palette),
        "RGBA on transparent": save(Image.fromarray(rgba, "RGBA")),
        "CMYK JPEG": save(rgb.convert("CMYK"), "JPEG", quality=95),
        "1-bit BMP": save(Image.fromarray(gray).convert("1", dither=Image.Dither.NONE), "BMP"),
        "PGM": save(Image.fromarray(gray), "PPM"),
    }.items():
        got = to_mnist(data, LIMITS).astype(np.float64)
        # Lossy or thresholded encodings move edge pixels a little; the digit stays.
        assert np.corrcoef(got.ravel(), reference.ravel())[0, 1] > 0.9, name
        assert got.max() >= 200, name


def test_pixels_are_counted_from_the_header_before_decoding() -> None:
    bomb = save(Image.new("L", (20000, 20000), 255))  # 0.4 MB here, 400 MB decoded
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_gray(bomb, LIMITS)
    assert info.value.reason == "too_many_pixels"
    assert "20000x20000 = 400000000 pixels: at most 4194304" in str(info.value)
    assert info.value.format == "PNG"
    # Refused from its header: far below the ~1 s decoding it would take (no speed claim,
    # just proof that the pixels were not decoded).
    assert time.perf_counter() - started < 5
    limits = ImageLimits(max_pixels=100)
    with pytest.raises(ImageError, match="11x10 = 110 pixels"):
        decode_gray(save(Image.new("L", (11, 10))), limits)
    decode_gray(save(Image.new("L", (10, 10))), limits)


def test_reasons_and_formats_are_the_fixed_label_sets() -> None:
    with pytest.raises(AssertionError):
        ImageError("caller chosen", "x")
    assert ImageError("corrupt", "x", "EVIL").format == "unknown"
    assert set(FORMATS) == {"PNG", "JPEG", "GIF", "BMP", "WEBP", "PPM"}
    assert "timeout" in REASONS


def test_formats_outside_the_allow_list_never_reach_a_parser() -> None:
    for fmt, words in (("TIFF", "TIFF"), ("ICO", "ICO"), ("PDF", "PDF")):
        try:
            data = save(Image.fromarray(paper_digit()).convert("RGB"), fmt)
        except (KeyError, OSError):
            continue
        with pytest.raises(ImageError, match=words) as info:
            decode_gray(data, LIMITS)
        assert info.value.reason == "unsupported_format"


def test_a_decoder_over_its_time_limit_is_killed_and_replaced() -> None:
    pool = DecoderPool(1, ImageLimits(max_bytes=16 << 20, max_pixels=1 << 24))
    try:
        noise = np.random.default_rng(0).integers(0, 256, (3000, 3000), dtype=np.uint8)
        slow = save(Image.fromarray(noise))
        with pytest.raises(DecodeFailed) as info:
            pool.decode([slow], 0.001)
        assert info.value.reason == "timeout"
        assert pool.restarts == 1
        good = save(Image.fromarray(paper_digit()))
        np.testing.assert_array_equal(pool.decode([good], 30.0)[0], to_mnist(good, LIMITS))
        with pytest.raises(DecodeFailed) as info:
            pool.decode([good, b"junk", good], 30.0)
        assert (info.value.index, info.value.reason) == (1, "not_an_image")
    finally:
        pool.close()


def test_a_decoder_that_dies_is_replaced() -> None:
    pool = DecoderPool(1, LIMITS)
    try:
        good = save(Image.fromarray(paper_digit()))
        pool.decode([good], 30.0)
        worker = pool._all[0]
        assert worker._proc is not None
        worker._proc.kill()
        worker._proc.wait()
        # The dead process is noticed before the request is sent, and replaced.
        assert pool.decode([good], 30.0).shape == (1, 28, 28)
    finally:
        pool.close()


def cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_client.cli", "--target", "127.0.0.1:1", *argv],
        capture_output=True, cwd=ROOT, timeout=120, env=dict(os.environ),
    )


def test_cli_refuses_a_decompression_bomb_in_one_line(tmp_path: Path) -> None:
    """It used to end in an uncaught DecompressionBombError traceback."""
    name = os.fsdecode(b"bomb-\xff\xfe.png")  # not UTF-8: the error must still print
    bomb = tmp_path / name
    bomb.write_bytes(save(Image.new("L", (20000, 20000), 255)))
    done = cli("classify", str(bomb))
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert "20000x20000" in stderr, stderr
    assert "bomb-" in stderr


def test_cli_refuses_an_image_over_the_pixel_limit_that_pillow_would_decode(
    tmp_path: Path,
) -> None:
    """9 Mpx is under Pillow's own bomb limit (89 Mpx warns, 179 Mpx raises), so the CLI used
    to decode it whole (a 12000x12000 one took 2 GB and 14 s); the header check refuses it."""
    big = tmp_path / "big.png"
    big.write_bytes(save(Image.new("L", (3000, 3000), 255)))
    done = cli("classify", str(big))
    stderr = done.stderr.decode()
    assert done.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert "3000x3000 = 9000000 pixels: at most 4194304 allowed" in stderr, stderr
