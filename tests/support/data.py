"""Data for tests: where the real MNIST files are (skipped when absent, failing in CI),
a static file server and a dead URL for the downloader, and synthetic digits to train on."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from trainer.data import FILE_NAMES

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def real_mnist_dir() -> Path:
    """The real 5k/10k MNIST files; skipped when absent, except in CI where it must fail."""
    return _real_dir(Path(os.environ.get("MNIST_DATA_DIR", SHARED_DATA / "mnist")),
                     "MNIST_DATA_DIR")


def _real_dir(path: Path, variable: str) -> Path:
    if not all((path / f"{n}.gz").is_file() or (path / n).is_file() for n in FILE_NAMES):
        message = f"real data files not found in {path} (set {variable})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[str]:
    """A static file server on 127.0.0.1 for `directory`; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def dead_url() -> str:
    """A 127.0.0.1 URL that refuses connections: what an unreachable mirror looks like."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def synthetic_digits(n: int, seed: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Ten easy classes: a bright 6x6 block whose position is the class, over faint noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for c in range(10):
        r, col = 4 + 8 * (c // 4), 2 + 6 * (c % 4)
        images[labels == c, r : r + 6, col : col + 6] = 230
    return images, labels
