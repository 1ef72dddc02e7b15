"""The affine warp (rotation, scaling, shift) against a per-pixel reference."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from trainer.augment import random_affine


def reference_warp(image: npt.NDArray[np.uint8], degrees: float, scale: float, dy: int,
                   dx: int) -> npt.NDArray[np.uint8]:
    """The textbook loop: inverse-map each output pixel, bilinear over the four neighbours."""
    h, w = image.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    c, s = math.cos(math.radians(degrees)) / scale, math.sin(math.radians(degrees)) / scale
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            oy, ox = y - cy - dy, x - cx - dx
            sy, sx = c * oy - s * ox + cy, s * oy + c * ox + cx
            y0, x0 = math.floor(sy), math.floor(sx)
            value = 0.0
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < h and 0 <= xx < w:
                        value += wy * wx * float(image[yy, xx])
            out[y, x] = value
    return np.rint(out).astype(np.uint8)


def digits(n: int) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(0)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 4:24, 6:22] = rng.integers(1, 255, (n, 20, 16))
    return images


def test_matches_the_per_pixel_reference() -> None:
    images = digits(6)
    warped = random_affine(images, 2, 20.0, 0.2, np.random.default_rng(3))
    replay = np.random.default_rng(3)
    degrees = np.rad2deg(np.deg2rad(replay.uniform(-20.0, 20.0, size=6)))
    scale = 1.0 + replay.uniform(-0.2, 0.2, size=6)
    dy = replay.integers(-2, 3, size=6)
    dx = replay.integers(-2, 3, size=6)
    for i in range(6):
        expected = reference_warp(images[i], degrees[i], scale[i], dy[i], dx[i])
        # float32 against float64 coordinates: a rounding boundary may differ by one level
        assert np.abs(warped[i].astype(int) - expected.astype(int)).max() <= 1


def test_no_rotation_or_scaling_is_an_exact_integer_shift() -> None:
    images = digits(20)
    warped = random_affine(images, 3, 0.0, 0.0, np.random.default_rng(9))
    replay = np.random.default_rng(9)
    replay.uniform(0.0, 0.0, size=20)
    replay.uniform(0.0, 0.0, size=20)
    dy = replay.integers(-3, 4, size=20)
    dx = replay.integers(-3, 4, size=20)
    for i in range(20):  # np.roll is a valid reference because the borders are empty
        np.testing.assert_array_equal(warped[i], np.roll(images[i], (dy[i], dx[i]), (0, 1)))


def test_outside_reads_background_and_the_centre_stays() -> None:
    images = np.full((8, 28, 28), 200, np.uint8)
    warped = random_affine(images, 0, 45.0, 0.0, np.random.default_rng(1))
    assert warped.dtype == np.uint8
    assert warped.shape == images.shape
    assert (warped[:, 10:18, 10:18] == 200).all()  # the centre is inside whatever the angle
    assert (warped <= 200).all()
    assert (warped[:, 0, 0] == 0).sum() >= 6  # corners rotated in from outside are background


def test_same_generator_state_gives_the_same_warp() -> None:
    images = digits(10)
    a = random_affine(images, 2, 10.0, 0.1, np.random.default_rng(4))
    b = random_affine(images, 2, 10.0, 0.1, np.random.default_rng(4))
    c = random_affine(images, 2, 10.0, 0.1, np.random.default_rng(5))
    assert a.tobytes() == b.tobytes() != c.tobytes()
