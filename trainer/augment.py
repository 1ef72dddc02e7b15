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
