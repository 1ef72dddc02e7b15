"""Writes the README's example inputs from the real MNIST test set (run from the repo root):

    python docs/examples/make_examples.py ../shared/data/mnist

digit-7.png, digit-2.png, digit-1.png: test images 0, 1 and 2 as a scan would look (dark ink
on white paper, 4x larger), so `mnist-client classify` shows its preprocessing at work;
first-10-test-images.npy: test images 0..9 as (10, 28, 28) uint8, labels 7 2 1 0 4 1 4 9 5 9.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data import read_images

here = Path(__file__).parent
images = read_images(Path(sys.argv[1]) / "t10k-images-idx3-ubyte.gz")
for index, digit in ((0, 7), (1, 2), (2, 1)):
    paper = Image.fromarray(255 - images[index]).resize((112, 112), Image.Resampling.BILINEAR)
    paper.save(here / f"digit-{digit}.png", optimize=True)
np.save(here / "first-10-test-images.npy", np.ascontiguousarray(images[:10]))
