"""Data augmentation: random small translations, one gather for the whole batch.

A digit moved by a pixel or two is still the same digit, and the MLP has no built-in
translation invariance, so showing it shifted copies is the cheapest way to make 5,000
training images behave like many more.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def random_shift(
    images: npt.NDArray[np.uint8], max_shift: int, rng: np.random.Generator
) -> npt.NDArray[np.uint8]:
    """Each image (n, h, w) moved by its own random dx, dy in [-max_shift, max_shift].

    Vacated pixels become background (0). Implemented as a single fancy-index gather into a
    zero-padded copy, so the cost is one pass over the batch, not a Python loop per image.
    """
    if max_shift <= 0:
        return images
    n, h, w = images.shape
    s = max_shift
    padded = np.zeros((n, h + 2 * s, w + 2 * s), dtype=images.dtype)
    padded[:, s : s + h, s : s + w] = images
    dy = np.asarray(rng.integers(-s, s + 1, size=(n,)))
    dx = np.asarray(rng.integers(-s, s + 1, size=(n,)))
    rows = (np.arange(h)[None, :] + (s - dy)[:, None])[:, :, None]  # (n, h, 1)
    cols = (np.arange(w)[None, :] + (s - dx)[:, None])[:, None, :]  # (n, 1, w)
    shifted: npt.NDArray[np.uint8] = padded[np.arange(n)[:, None, None], rows, cols]
    return shifted


def random_affine(
    images: npt.NDArray[np.uint8],
    max_shift: int,
    max_degrees: float,
    max_scale: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.uint8]:
    """Each image (n, h, w) rotated by up to +-max_degrees, scaled by 1 +- max_scale and
    shifted by an integer dx, dy in [-max_shift, max_shift], all about the image centre.

    Handwriting varies in slant and size as much as in position, which shifts alone do not
    show the network. Every output pixel is sampled bilinearly from the inverse-mapped source
    position: four fancy-index gathers over the whole batch, no loop per image. Source
    positions outside the image read background (0).
    """
    n, h, w = images.shape
    theta = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=n))
    scale = 1.0 + rng.uniform(-max_scale, max_scale, size=n)
    dy = np.asarray(rng.integers(-max_shift, max_shift + 1, size=n), dtype=np.float32)
    dx = np.asarray(rng.integers(-max_shift, max_shift + 1, size=n), dtype=np.float32)
    f32 = np.float32
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rows: npt.NDArray[np.float32] = np.arange(h, dtype=f32) - f32(cy)
    cols: npt.NDArray[np.float32] = np.arange(w, dtype=f32) - f32(cx)
    # Output pixel p = scale * R(theta) (q - c) + c + d  =>  q = R(-theta) (p - c - d) / scale + c
    oy = rows[None, :, None] - dy[:, None, None]
    ox = cols[None, None, :] - dx[:, None, None]
    cos: npt.NDArray[np.float32] = (np.cos(theta) / scale).astype(f32).reshape(n, 1, 1)
    sin: npt.NDArray[np.float32] = (np.sin(theta) / scale).astype(f32).reshape(n, 1, 1)
    sy = cos * oy - sin * ox + f32(cy)  # (n, h, w)
    sx = sin * oy + cos * ox + f32(cx)
    y0 = np.floor(sy)
    x0 = np.floor(sx)
    fy = sy - y0
    fx = sx - x0
    # A 1-pixel zero border lets every corner of a position just outside read background;
    # positions further out are clipped onto the border and zeroed afterwards.
    pw = w + 2
    padded = np.zeros((n, (h + 2) * pw), dtype=f32)
    padded.reshape(n, h + 2, pw)[:, 1 : h + 1, 1 : w + 1] = images
    outside = (y0 < -1) | (y0 > h - 1) | (x0 < -1) | (x0 > w - 1)
    r0 = np.clip(y0, -1, h - 1).astype(np.intp) + 1
    c0 = np.clip(x0, -1, w - 1).astype(np.intp) + 1
    flat = (r0 * pw + c0).reshape(n, -1)  # top-left corner; the others are +1, +pw, +pw+1

    def g(offset: int) -> npt.NDArray[np.float32]:
        return np.take_along_axis(padded, flat + offset, axis=1).reshape(n, h, w)

    top = g(0)
    top += fx * (g(1) - top)
    bottom = g(pw)
    bottom += fx * (g(pw + 1) - bottom)
    top += fy * (bottom - top)
    top[outside] = 0.0
    result: npt.NDArray[np.uint8] = np.rint(top).astype(np.uint8)
    return result
