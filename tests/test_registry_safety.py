"""Every kind of broken version is rejected with its own reason while the old one serves.

Each case publishes a good version 1, then puts a damaged version 2 in place the way it
would really arrive (a rename, a symlink, a copy in progress). The registry must report 2 as
FAILED with the expected reason, count it in the metric, keep answering with 1, and not
retry 2 until its files change.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.versions_util import (
    npy_bytes,
    npz_members,
    publish_tiny,
    rss_bytes,
    tiny_model,
    write_npz,
    write_raw,
)

from service.metrics import Metrics
from service.model import CHECKSUM_FILE, WEIGHTS_FILE, save_model
from service.registry import ModelRegistry, VersionState

X = np.random.default_rng(3).random((2, 784), dtype=np.float32)


def _edit_member(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:  # type: ignore[type-arg]
    def damage(v: Path) -> None:
        members = npz_members(v)
        array = np.load(io.BytesIO(members[name]))
        members[name] = npy_bytes(fn(array))
        write_npz(v, members)

    return damage


def _truncate(v: Path) -> None:
    data = (v / WEIGHTS_FILE).read_bytes()
    write_raw(v, data[: len(data) // 2])


def _not_zip(v: Path) -> None:
    write_raw(v, b"this is not a zip archive\n" * 100)


def _pickle(v: Path) -> None:
    members = npz_members(v)
    members["b0.npy"] = npy_bytes(np.array([{"boom": 1}] * 8, dtype=object), allow_pickle=True)
    write_npz(v, members)


def _shapes_do_not_chain(v: Path) -> None:
    members = npz_members(v)
    members["W1.npy"] = npy_bytes(np.zeros((9, 10), np.float32))
    write_npz(v, members)


def _783_inputs(v: Path) -> None:
    members = npz_members(v)
    members["W0.npy"] = npy_bytes(np.zeros((783, 8), np.float32))
    write_npz(v, members)


def _nan(v: Path) -> None:
    def poison(a: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
        a = a.copy()
        a[0, 0] = np.nan
        return a

    _edit_member("W0.npy", poison)(v)


def _missing_metadata(v: Path) -> None:
    members = npz_members(v)
    del members["metadata.npy"]
    write_npz(v, members)


def _checksum(v: Path) -> None:
    (v / CHECKSUM_FILE).write_text("0" * 64 + f"  {WEIGHTS_FILE}\n")


def _huge_header(v: Path) -> None:
    """A member whose header declares ~40 TB; the few bytes after it are all there is."""
    members = npz_members(v)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10_000_000, 1_000_000)}
    )
    members["W0.npy"] = header.getvalue() + b"\0" * 64
    write_npz(v, members)


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated npz": (_truncate, "truncated"),
    "not a zip": (_not_zip, "not_npz"),
    "object array needing pickle": (_pickle, "pickle"),
    "wrong dtype": (_edit_member("W1.npy", lambda a: a.astype(np.float64)), "dtype"),
    "shapes that do not chain": (_shapes_do_not_chain, "shape"),
    "783 inputs": (_783_inputs, "input_size"),
    "NaN weights": (_nan, "not_finite"),
    "missing metadata": (_missing_metadata, "missing_key"),
    "checksum mismatch": (_checksum, "checksum"),
    "weights silently altered": (_edit_member("W1.npy", lambda a: a * 1.5), "probe_mismatch"),
    "absurdly large declared array": (_huge_header, "too_large"),
}


def _stage(tmp_path: Path, seed: int = 2) -> Path:
    """A complete, valid version directory outside the repository, ready to damage."""
    staging = tmp_path / "staging"
    staging.mkdir()
    save_model(tiny_model(seed), staging)
    return staging


async def _start(repo: Path) -> tuple[ModelRegistry, CollectorRegistry]:
    prom = CollectorRegistry()
    reg = ModelRegistry(repo, Metrics(prom), rescan_interval_s=0)
    await reg.start()
    return reg, prom


def _state(reg: ModelRegistry, version: int) -> tuple[VersionState, str]:
    (st,) = reg.status()
    (row,) = [r for r in st.versions if r.version == version]
    return row.state, row.reason


@pytest.mark.parametrize("case", list(CASES))
def test_broken_version_rejected_old_keeps_serving(tmp_path: Path, case: str) -> None:
    damage, reason = CASES[case]
    repo = tmp_path / "repo"
    publish_tiny(repo, seed=1)
    staging = _stage(tmp_path)
    damage(staging)

    async def go() -> None:
        reg, prom = await _start(repo)
        staging.rename(repo / "mnist" / "2")  # arrives atomically, as publish would
        await reg.rescan()
        state, why = _state(reg, 2)
        assert (state, why) == (VersionState.FAILED, reason)
        sv = reg.resolve()
        assert sv.version == 1
        np.testing.assert_allclose(sv.model.predict(X), tiny_model(1).predict(X))
        labels = {"model": "mnist", "reason": reason}
        assert prom.get_sample_value("mnist_model_rejected_versions_total", labels) == 1
        # Not retried while the files stay the same...
        await reg.rescan()
        await reg.rescan()
        assert prom.get_sample_value("mnist_model_rejected_versions_total", labels) == 1
        # ...and picked up once they are replaced by good ones.
        shutil.rmtree(repo / "mnist" / "2")
        good = tmp_path / "good"
        good.mkdir()
        save_model(tiny_model(2), good)
        good.rename(repo / "mnist" / "2")
        await reg.rescan()
        assert reg.resolve().version == 2
        assert _state(reg, 2) == (VersionState.AVAILABLE, "")

    asyncio.run(go())


def test_huge_header_does_not_allocate(tmp_path: Path) -> None:
    """The declared 40 TB must be refused from the header, before any allocation."""
    repo = tmp_path / "repo"
    publish_tiny(repo, seed=1)
    staging = _stage(tmp_path)
    _huge_header(staging)
    staging.rename(repo / "mnist" / "2")

    async def go() -> None:
        tracemalloc.start()
        try:
            reg, _ = await _start(repo)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert _state(reg, 2) == (VersionState.FAILED, "too_large")
        assert peak < 20 * 1024 * 1024, f"peak Python allocation {peak} bytes"

    rss_before = rss_bytes()
    asyncio.run(go())
    assert rss_bytes() - rss_before < 100 * 1024 * 1024


def test_symlink_outside_repository_is_unsafe(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, seed=1)
    outside = _stage(tmp_path)  # a perfectly valid model, but not in the repository
    (repo / "mnist" / "2").symlink_to(outside, target_is_directory=True)
    (repo / "mnist" / "3").mkdir()
    for name in (WEIGHTS_FILE, CHECKSUM_FILE):  # file-level links count too
        (repo / "mnist" / "3" / name).symlink_to(outside / name)

    async def go() -> None:
        reg, _ = await _start(repo)
        assert _state(reg, 2) == (VersionState.FAILED, "unsafe_path")
        assert _state(reg, 3) == (VersionState.FAILED, "unsafe_path")
        assert reg.resolve().version == 1

    asyncio.run(go())


def test_symlink_inside_repository_is_fine(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, seed=1)
    (repo / "mnist" / "2").symlink_to(repo / "mnist" / "1", target_is_directory=True)

    async def go() -> None:
        reg, _ = await _start(repo)
        assert reg.resolve().version == 2

    asyncio.run(go())


def test_version_still_being_written(tmp_path: Path) -> None:
    """A non-atomic copy (cp -r) seen half-way: FAILED now, loaded once complete."""
    repo = tmp_path / "repo"
    publish_tiny(repo, seed=1)
    staging = _stage(tmp_path)

    async def go() -> None:
        reg, _ = await _start(repo)
        target = repo / "mnist" / "2"
        target.mkdir()
        data = (staging / WEIGHTS_FILE).read_bytes()
        (target / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
        await reg.rescan()
        assert _state(reg, 2) == (VersionState.FAILED, "missing_file")
        (target / WEIGHTS_FILE).write_bytes(data)  # copy continues: checksum still missing
        await reg.rescan()
        assert _state(reg, 2) == (VersionState.FAILED, "missing_file")
        shutil.copy(staging / CHECKSUM_FILE, target / CHECKSUM_FILE)
        await reg.rescan()
        assert reg.resolve().version == 2
        np.testing.assert_allclose(reg.resolve().model.predict(X), tiny_model(2).predict(X))

    asyncio.run(go())


def test_checksum_written_before_weights_finish(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_tiny(repo, seed=1)
    staging = _stage(tmp_path)

    async def go() -> None:
        reg, _ = await _start(repo)
        target = repo / "mnist" / "2"
        target.mkdir()
        shutil.copy(staging / CHECKSUM_FILE, target / CHECKSUM_FILE)
        data = (staging / WEIGHTS_FILE).read_bytes()
        (target / WEIGHTS_FILE).write_bytes(data[:1000])
        await reg.rescan()
        assert _state(reg, 2) == (VersionState.FAILED, "checksum")
        assert reg.resolve().version == 1
        (target / WEIGHTS_FILE).write_bytes(data)
        await reg.rescan()
        assert reg.resolve().version == 2

    asyncio.run(go())
