"""Small learnable MNIST-format files for tests that train (compose, Docker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.data import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS, write_idx


def synthetic_mnist(directory: Path, seed: int = 0) -> None:
    """Small learnable IDX files: each digit lights its own 4x4 block, plus noise."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for images_name, labels_name, n in ((TRAIN_IMAGES, TRAIN_LABELS, 1200),
                                        (TEST_IMAGES, TEST_LABELS, 200)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, digit in enumerate(labels):
            row, col = divmod(int(digit), 5)
            images[i, 4 + 8 * row: 8 + 8 * row, 2 + 5 * col: 6 + 5 * col] = 255
        write_idx(directory / images_name, images)
        write_idx(directory / labels_name, labels)
