"""A grayscale picture of a digit -> MNIST-style 28x28 uint8: ink white, fit in 20x20, centred.

MNIST digits are white ink on black, size-normalised into a 20x20 box and centred by centre of
mass in a 28x28 field; a model trained on them answers badly on anything else, so every image
gets the same treatment: invert a light background, crop to the ink, fit into 20x20 keeping
the aspect ratio, then shift so the centre of mass is the image centre.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Uint8Array = npt.NDArray[np.uint8]
FIELD = 28
BOX = 20


class PreprocessError(ValueError):
    """The array is not a 2-D grayscale picture."""


def preprocess(gray: Uint8Array) -> Uint8Array:
    """Grayscale 2-D uint8 -> MNIST-style 28x28: ink white, fit in 20x20, centred by mass.
    Needs Pillow (its Lanczos resampling)."""
    from PIL import Image

    if gray.ndim != 2 or gray.size == 0:
        raise PreprocessError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    img = gray.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    if border.mean() > 127:  # dark ink on a light background
        img, border = 255.0 - img, 255.0 - border
    img = np.clip(img - float(np.median(border)), 0, 255)  # background to 0
    if img.max() <= 0:
        return np.zeros((FIELD, FIELD), dtype=np.uint8)
    img *= 255.0 / img.max()
    ys, xs = np.nonzero(img > 255 * 0.1)
    crop = img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(
        Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS),
        dtype=np.float32,
    )
    out = np.zeros((FIELD, FIELD), dtype=np.float32)
    top, left = (FIELD - nh) // 2, (FIELD - nw) // 2
    out[top: top + nh, left: left + nw] = resized
    return _centre_by_mass(out)


def _centre_by_mass(img: npt.NDArray[np.float32]) -> Uint8Array:
    total = img.sum()
    if total <= 0:
        return img.astype(np.uint8)
    ys, xs = np.indices(img.shape)
    cy, cx = (ys * img).sum() / total, (xs * img).sum() / total
    dy, dx = round((FIELD - 1) / 2 - cy), round((FIELD - 1) / 2 - cx)
    shifted = np.zeros_like(img)
    src_y = slice(max(0, -dy), FIELD - max(0, dy))
    dst_y = slice(max(0, dy), FIELD - max(0, -dy))
    src_x = slice(max(0, -dx), FIELD - max(0, dx))
    dst_x = slice(max(0, dx), FIELD - max(0, -dx))
    shifted[dst_y, dst_x] = img[src_y, src_x]
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)
