"""Helpers for the version tests: small real models, published the way the trainer does it.

Models are tiny (784-8-10) so a load takes milliseconds; each seed gives different weights,
so tests can tell versions apart by their answers as well as by their numbers.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from service.model import CHECKSUM_FILE, WEIGHTS_FILE, Model, build_model
from trainer.publish import publish

METADATA: dict[str, Any] = {
    "cost": "cross_entropy",
    "input": {"shape": [28, 28], "scale": "0..1"},
    "labels": [str(i) for i in range(10)],
    "training": {"epochs": 0},
    "data": {"source": "test"},
    "metrics": {"test_accuracy": 0.1},
    "created_at": "2026-01-01T00:00:00Z",
    "trainer_version": "test",
}


def tiny_model(seed: int = 0, hidden: int = 8) -> Model:
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0, 0.1, (784, hidden)).astype(np.float32)
    w1 = rng.normal(0, 0.5, (hidden, 10)).astype(np.float32)
    probes = rng.random((4, 784), dtype=np.float32)
    return build_model(
        [w0, w1], [np.zeros(hidden), rng.normal(0, 0.1, 10)], ["relu"], "softmax",
        dict(METADATA), probes,
    )


def publish_tiny(model_dir: Path, name: str = "mnist", seed: int = 0, hidden: int = 8) -> int:
    """Publish with the trainer's atomic publish; returns the new version number."""
    version, _ = publish(tiny_model(seed, hidden), model_dir, name)
    return version


def npz_members(path: Path) -> dict[str, bytes]:
    """The raw .npy bytes of each member of a version's model.npz."""
    with zipfile.ZipFile(path / WEIGHTS_FILE) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def npy_bytes(array: np.ndarray[Any, Any], *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def write_npz(path: Path, members: dict[str, bytes], *, fix_checksum: bool = True) -> None:
    """Rewrite model.npz from raw members; by default recompute the checksum so the defect
    under test is the one the loader must catch, not a checksum mismatch."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    write_raw(path, buf.getvalue(), fix_checksum=fix_checksum)


def write_raw(path: Path, data: bytes, *, fix_checksum: bool = True) -> None:
    (path / WEIGHTS_FILE).write_bytes(data)
    if fix_checksum:
        digest = hashlib.sha256(data).hexdigest()
        (path / CHECKSUM_FILE).write_text(f"{digest}  {WEIGHTS_FILE}\n")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
