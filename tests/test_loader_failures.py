"""Load failures that are not about the bytes of one file: transient I/O, blocked reads,
loader bugs, bad model names, memory bounds.

Failures are produced for real where the OS allows it (a file renamed away mid-load, a
sparse file, a non-UTF-8 directory name) and otherwise by a loader injected through the
registry's constructor that wraps the real one (EIO and a read blocked in the kernel cannot
be produced on demand without FUSE).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from support.loader_corpus import CASES, Ctx, good_version
from support.servers import ServerThread
from support.versions_util import publish_tiny

from service.errors import FailedPrecondition
from service.metrics import Metrics
from service.model import CHECKSUM_FILE, WEIGHTS_FILE, Model, ModelFormatError, load_model
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc
from service.registry import ModelRegistry, VersionState, VersionStatus
from service.registry.loading import LoadPolicy
from service.storage import repository

REJECTED = "mnist_model_rejected_versions_total"


class CountingLoader:
    """The real loader, with a hook run before it for chosen versions; counts calls."""

    def __init__(self, before: Callable[[Path, int], None] | None = None) -> None:
        self.calls: dict[str, int] = {}
        self._before = before

    def __call__(self, root: Path, directory: Path) -> Model:
        key = f"{directory.parent.name}/{directory.name}"
        self.calls[key] = self.calls.get(key, 0) + 1
        if self._before is not None:
            self._before(directory, self.calls[key])
        return repository.load_inside(root, directory)


class Clock:
    """A monotonic clock the test advances: backoff is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(repo: Path, loader: Callable[[Path, Path], Model], **kw: Any) -> tuple[
    ModelRegistry, CollectorRegistry
]:
    prom = CollectorRegistry()
    return ModelRegistry(repo, Metrics(prom), rescan_interval_s=0, loader=loader, **kw), prom


def row(reg: ModelRegistry, version: int, name: str = "mnist") -> VersionStatus:
    (match,) = [r for r in reg.model_status(name).versions if r.version == version]
    return match


def test_transient_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    """EIO twice, then the volume recovers: FAILED transient_io with a growing attempt
    count meanwhile, no retry before the backoff has passed, then the version loads."""
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)

    def eio(directory: Path, call: int) -> None:
        if directory.name == "2" and call <= 2:
            raise OSError(errno.EIO, "Input/output error")

    loader = CountingLoader(eio)
    clock = Clock()

    async def go() -> None:
        policy = LoadPolicy(retry_initial_s=2.0, retry_max_s=3.0)
        reg, prom = make(tmp_path, loader, load_policy=policy, clock=clock)
        await reg.start()
        assert reg.resolve().version == 1
        first = row(reg, 2)
        assert (first.state, first.reason, first.retries) == (
            VersionState.FAILED, "transient_io", 1
        )
        clock.now += 1.9
        await reg.rescan()  # before the backoff is over: no new attempt
        assert loader.calls["mnist/2"] == 1
        clock.now += 0.2
        await reg.rescan()
        assert loader.calls["mnist/2"] == 2
        assert (row(reg, 2).reason, row(reg, 2).retries) == ("transient_io", 2)
        assert "attempt 2" in row(reg, 2).detail
        clock.now += 2.9  # the second delay (4 s) is capped at retry_max_s (3 s)
        await reg.rescan()
        assert loader.calls["mnist/2"] == 2
        clock.now += 0.2
        await reg.rescan()
        assert reg.resolve().version == 2
        assert row(reg, 2).state is VersionState.AVAILABLE
        labels = {"model": "mnist", "reason": "transient_io"}
        assert prom.get_sample_value(REJECTED, labels) == 2

    asyncio.run(go())


def test_permanent_errors_wait_for_new_files(tmp_path: Path) -> None:
    """The contrast: a damaged file is never retried while its signature stays the same,
    however long one waits, and is retried as soon as it changes."""
    publish_tiny(tmp_path, seed=1)
    v2 = tmp_path / "mnist" / str(publish_tiny(tmp_path, seed=2))
    good = (v2 / WEIGHTS_FILE).read_bytes()
    (v2 / WEIGHTS_FILE).write_bytes(good[:100])
    loader = CountingLoader()

    async def go() -> None:
        clock = Clock()
        policy = LoadPolicy(retry_initial_s=0.01, retry_max_s=0.01)
        reg, _ = make(tmp_path, loader, load_policy=policy, clock=clock)
        await reg.start()
        assert (row(reg, 2).reason, row(reg, 2).retries) == ("checksum", 0)
        for _ in range(3):
            clock.now += 3600
            await reg.rescan()
        assert loader.calls["mnist/2"] == 1
        (v2 / WEIGHTS_FILE).write_bytes(good)
        await reg.rescan()
        assert reg.resolve().version == 2

    asyncio.run(go())


def test_file_vanishing_mid_load_is_transient(tmp_path: Path) -> None:
    """A shared volume loses model.npz while the loader reads the version, then has it
    again (as a new copy): a real ENOENT from the real loader, but since the files changed
    during the load it is transient, and the next scan loads the version."""
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)
    calls: list[Path] = []

    def loader(root: Path, directory: Path) -> Model:
        calls.append(directory)
        if directory.name != "2" or len([c for c in calls if c.name == "2"]) > 1:
            return repository.load_inside(root, directory)
        aside = directory.parent / "aside.npz"
        (directory / WEIGHTS_FILE).rename(aside)
        try:
            return repository.load_inside(root, directory)
        finally:
            shutil.copy(aside, directory / WEIGHTS_FILE)

    async def go() -> None:
        reg, prom = make(tmp_path, loader)
        await reg.start()
        assert reg.resolve().version == 1
        assert (row(reg, 2).state, row(reg, 2).reason) == (VersionState.FAILED, "transient_io")
        assert "changed while being read" in row(reg, 2).detail
        assert prom.get_sample_value(REJECTED, {"model": "mnist", "reason": "missing_file"}) is None
        await reg.rescan()  # the files' signature changed: tried again at once
        assert reg.resolve().version == 2

    asyncio.run(go())


def test_file_gone_for_good_becomes_permanent(tmp_path: Path) -> None:
    """Vanishing is transient only while the files are changing: once they stay gone it is
    `missing_file`, not retried."""
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)

    def vanish(directory: Path, call: int) -> None:
        if directory.name == "2" and call == 1:
            (directory / WEIGHTS_FILE).unlink()

    loader = CountingLoader(vanish)

    async def go() -> None:
        reg, _ = make(tmp_path, loader)
        await reg.start()
        assert row(reg, 2).reason == "transient_io"
        await reg.rescan()
        assert row(reg, 2).reason == "missing_file"
        await reg.rescan()
        assert loader.calls["mnist/2"] == 2
        assert reg.resolve().version == 1

    asyncio.run(go())


def test_blocked_read_does_not_freeze_other_models(tmp_path: Path) -> None:
    """A read stuck in the kernel (a hung network mount) for model a: the scan stops
    waiting after load_timeout_s, reports it, and hot swap of model b goes on; later scans
    neither wait for it again nor start a second read; when the read finally completes,
    its result is used."""
    publish_tiny(tmp_path, "a", seed=1)
    publish_tiny(tmp_path, "a", seed=2)
    publish_tiny(tmp_path, "b", seed=1)
    release = threading.Event()

    def block(directory: Path, call: int) -> None:
        if directory.parent.name == "a" and directory.name == "2":
            assert release.wait(60), "never released"

    loader = CountingLoader(block)

    async def go() -> None:
        reg, prom = make(tmp_path, loader,
                         load_policy=LoadPolicy(timeout_s=0.2, retry_initial_s=0.0))
        await asyncio.wait_for(reg.start(), 30)
        assert reg.resolve("a").version == 1
        assert (row(reg, 2, "a").state, row(reg, 2, "a").reason) == (
            VersionState.FAILED, "load_timeout"
        )
        publish_tiny(tmp_path, "b", seed=2)
        await asyncio.wait_for(reg.rescan(), 30)
        assert reg.resolve("b").version == 2
        assert loader.calls["a/2"] == 1, "a second read of the blocked files was started"
        labels = {"model": "a", "reason": "load_timeout"}
        assert prom.get_sample_value(REJECTED, labels) == 1
        with pytest.raises(FailedPrecondition, match="load_timeout"):  # an admin retry
            await asyncio.wait_for(reg.load_version("a", 2), 30)
        assert loader.calls["a/2"] == 1
        release.set()
        for _ in range(100):  # the stuck thread settles its future on the loop
            await asyncio.sleep(0.01)
            await reg.rescan()
            if reg.resolve("a").version == 2:
                break
        assert reg.resolve("a").version == 2
        assert loader.calls["a/2"] == 1

    try:
        asyncio.run(go())
    finally:
        release.set()


def test_loader_bug_fails_only_its_version(tmp_path: Path) -> None:
    """Any exception type out of the loader (here a KeyError, as a bug would raise) fails
    that version as `internal`; the scan goes on with the other versions and models."""
    publish_tiny(tmp_path, "a", seed=1)
    publish_tiny(tmp_path, "a", seed=2)
    publish_tiny(tmp_path, "b", seed=1)

    def bug(directory: Path, call: int) -> None:
        if directory.parent.name == "a" and directory.name == "2":
            raise KeyError("a bug")

    async def go() -> None:
        reg, prom = make(tmp_path, CountingLoader(bug))
        await reg.start()
        assert reg.resolve("a").version == 1
        assert reg.resolve("b").version == 1
        assert (row(reg, 2, "a").state, row(reg, 2, "a").reason) == (
            VersionState.FAILED, "internal"
        )
        assert prom.get_sample_value(REJECTED, {"model": "a", "reason": "internal"}) == 1

    asyncio.run(go())


def test_model_directory_with_invalid_name(
    tmp_path: Path, start: Callable[..., ServerThread]
) -> None:
    """A model directory whose name is not valid UTF-8 (or has a space) used to be listed as
    a model, and its name (with a lone surrogate) broke ListModels for every caller. It is
    ignored with a log line and counted under model="unknown"."""
    publish_tiny(tmp_path, "mnist", seed=1)
    good_version(tmp_path / "has space" / "1", seed=1)
    good_version(tmp_path / os.fsdecode(b"caf\xe9") / "1", seed=1)
    server = start(tmp_path)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.name for m in listed.models] == ["mnist"]
    assert server.sample(REJECTED, {"model": "unknown", "reason": "model_name"}) == 2


def test_sparse_checksum_file_costs_no_memory(tmp_path: Path) -> None:
    """A 200 MiB sparse model.npz.sha256 used to be read whole (400 MiB as text)."""
    v = tmp_path / "mnist" / str(publish_tiny(tmp_path, seed=1))
    with open(v / CHECKSUM_FILE, "wb") as f:
        f.truncate(200 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFormatError) as caught:
            load_model(v)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "checksum"
    assert peak < 8 << 20, f"peak Python allocation {peak} bytes"


def test_fifo_does_not_block_the_loader(tmp_path: Path) -> None:
    """Opening a FIFO for reading blocks until a writer appears: the loader must refuse it
    without opening it that way. Run on a thread with a bound, so a regression fails
    instead of hanging the suite."""
    v = tmp_path / "mnist" / str(publish_tiny(tmp_path, seed=1))
    (v / WEIGHTS_FILE).unlink()
    os.mkfifo(v / WEIGHTS_FILE)
    outcome: list[BaseException | Model] = []

    def run() -> None:
        try:
            outcome.append(load_model(v))
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # unblock it: a writer lets the blocked open return
        fd = os.open(v / WEIGHTS_FILE, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("load_model blocked on a FIFO")
    (error,) = outcome
    assert isinstance(error, ModelFormatError)
    assert error.reason == "not_regular_file"


def test_nothing_loadable_still_starts(tmp_path: Path, start: Callable[..., ServerThread]) -> None:
    """Only broken versions (a FIFO, an encrypted member): the server starts NOT_SERVING
    with the reasons visible, and serves once a good version is published."""
    ctx = Ctx(tmp_path, tmp_path / "outside")
    by_id = {c.id: c for c in CASES}
    by_id["weights_fifo"].build(ctx, tmp_path / "mnist", 1)
    by_id["encrypted_flag"].build(ctx, tmp_path / "mnist", 2)
    server = start(tmp_path, rescan_interval_s=0)
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = pb_grpc.ClassifierStub(channel)
        (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert [(v.version, v.reason) for v in info.versions] == [
            (1, "not_regular_file"), (2, "encrypted")
        ]
        publish_tiny(tmp_path, seed=3)
        server.call(server.running.registry.rescan())
        for _ in range(100):  # health follows the registry on the server's loop
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            threading.Event().wait(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING
