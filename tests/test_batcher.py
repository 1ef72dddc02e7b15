"""The batcher on its own: coalescing, version grouping, bounds, deadlines, failures.

Uses a real ModelRegistry over a temp repository where the answers matter, and a small fake
registry (the constructor's injection point) where a forward must block or fail on purpose.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.numerics import assert_probabilities
from support.servers import make_model, write_version

from service.batching import Batcher
from service.errors import DeadlineExceeded, NotFound, Overloaded, ServiceError
from service.metrics import Metrics
from service.registry import ModelRegistry, ServableVersion


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 784), dtype=np.float32)


async def with_batcher(repo: Path, body: Any, policy: str = "latest", **kw: Any) -> Any:
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(repo, metrics, rescan_interval_s=0, version_policy=policy)
    await registry.start()
    options = {"max_batch_rows": 256, "max_batch_wait_s": 0.01, "max_queue_rows": 10_000}
    options.update(kw)
    batcher = Batcher(registry, metrics, **options)
    await batcher.start()
    try:
        return await body(batcher, registry, metrics)
    finally:
        await batcher.close()
        await registry.close()


def batches(metrics: Metrics, model: str = "mnist") -> tuple[float, float]:
    count = metrics.registry.get_sample_value("mnist_batch_rows_count", {"model": model}) or 0.0
    total = metrics.registry.get_sample_value("mnist_batch_rows_sum", {"model": model}) or 0.0
    return count, total


def test_concurrent_requests_coalesce_and_get_their_own_rows(model_repo: Path) -> None:
    model = make_model(seed=1)

    async def body(batcher: Batcher, _r: ModelRegistry, metrics: Metrics) -> None:
        # A first request teaches the batcher that many callers are active.
        inputs = [rows(1 + i % 3, seed=i) for i in range(64)]
        for _ in range(3):
            results = await asyncio.gather(*(batcher.submit(x) for x in inputs))
            for x, r in zip(inputs, results, strict=True):
                assert_probabilities(r.probabilities, model, x)
                assert (r.version.name, r.version.version) == ("mnist", 1)
        count, total = batches(metrics)
        assert total == 3 * sum(x.shape[0] for x in inputs)
        assert count < 3 * 64 / 4, f"{count} forwards for 192 requests: not coalescing"

    asyncio.run(with_batcher(model_repo, body))


def test_lone_request_does_not_wait(model_repo: Path) -> None:
    async def body(batcher: Batcher, _r: ModelRegistry, metrics: Metrics) -> None:
        for i in range(5):
            await batcher.submit(rows(1, i))
        waits = metrics.registry.get_sample_value(
            "mnist_batch_queue_wait_seconds_sum", {"model": "mnist"})
        # max_batch_wait_s is 1 s here: had any of the five waited for company, the sum of
        # queue waits would be at least 1 s.
        assert waits is not None
        assert waits < 0.5

    asyncio.run(with_batcher(model_repo, body, max_batch_wait_s=1.0))


def test_a_batch_never_mixes_versions(model_repo: Path) -> None:
    write_version(model_repo, "mnist", 2, make_model(seed=2))
    v1, v2 = make_model(seed=1), make_model(seed=2)

    async def body(batcher: Batcher, registry: ModelRegistry, metrics: Metrics) -> None:
        inputs = [rows(1, seed=i) for i in range(40)]
        wanted = [1 + i % 2 for i in range(40)]
        results = await asyncio.gather(
            *(batcher.submit(x, version=v) for x, v in zip(inputs, wanted, strict=True)))
        for x, v, r in zip(inputs, wanted, results, strict=True):
            assert r.version.version == v
            assert_probabilities(r.probabilities, v1 if v == 1 else v2, x)
        count, _ = batches(metrics)
        assert 2 <= count < 40, "both versions in few forwards, one per version per batch"

    asyncio.run(with_batcher(model_repo, body, policy="latest:2"))


class _FakeModel:
    """Blocks until released, or raises: the batcher must cope with both."""

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail = fail
        self.calls = 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.started.set()
        if self.fail:
            raise FloatingPointError("boom")
        self.release.wait(10)
        return np.full((x.shape[0], 10), 0.1, dtype=np.float32)


class _FakeRegistry:
    def __init__(self, model: _FakeModel) -> None:
        self.sv = ServableVersion("fake", 1, model, Path("."), 0.0)  # type: ignore[arg-type]

    def default_model(self) -> str:
        return "fake"

    def resolve(self, model: str = "", version: int = 0, label: str = "") -> ServableVersion:
        if version not in (0, 1):
            raise NotFound(f"no version {version}")
        return self.sv


async def fake_batcher(model: _FakeModel, **kw: Any) -> Batcher:
    options = {"max_batch_rows": 4, "max_batch_wait_s": 0.0, "max_queue_rows": 8}
    options.update(kw)
    batcher = Batcher(_FakeRegistry(model), Metrics(CollectorRegistry()),  # type: ignore[arg-type]
                      **options)
    await batcher.start()
    return batcher


def test_full_queue_rejects_at_once() -> None:
    async def body() -> None:
        model = _FakeModel()
        batcher = await fake_batcher(model)
        first = asyncio.ensure_future(batcher.submit(rows(4, 0)))  # occupies the forward
        assert await asyncio.to_thread(model.started.wait, 10)
        queued = [asyncio.ensure_future(batcher.submit(rows(4, i))) for i in range(2)]
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="queue full: 8 images waiting"):
            await batcher.submit(rows(1, 9))
        assert time.perf_counter() - started < 0.5
        model.release.set()
        assert all(r.probabilities.shape == (4, 10) for r in await asyncio.gather(first, *queued))
        await batcher.close()

    asyncio.run(body())


def test_expired_and_cancelled_requests_are_dropped_before_compute() -> None:
    async def body() -> None:
        model = _FakeModel()
        batcher = await fake_batcher(model, max_queue_rows=100)
        first = asyncio.ensure_future(batcher.submit(rows(4, 0)))
        assert await asyncio.to_thread(model.started.wait, 10)
        late = asyncio.ensure_future(batcher.submit(rows(1, 1), deadline_s=0.01))
        gone = asyncio.ensure_future(batcher.submit(rows(1, 2)))
        await asyncio.sleep(0.05)
        gone.cancel()
        model.release.set()
        await first
        with pytest.raises(DeadlineExceeded, match="deadline passed"):
            await late
        assert model.calls == 1, "the expired and the cancelled request must not be computed"
        await batcher.close()

    asyncio.run(body())


def test_failed_forward_fails_every_waiter_and_batcher_keeps_going() -> None:
    async def body() -> None:
        model = _FakeModel(fail=True)
        batcher = await fake_batcher(model, max_batch_rows=64, max_queue_rows=100)
        results = await asyncio.gather(*(batcher.submit(rows(1, i)) for i in range(10)),
                                       return_exceptions=True)
        assert all(isinstance(r, ServiceError) for r in results), results
        assert all("FloatingPointError" in str(r) for r in results)
        model.fail = False
        model.release.set()
        assert (await batcher.submit(rows(2, 0))).probabilities.shape == (2, 10)
        await batcher.close()

    asyncio.run(body())


def test_unknown_version_fails_only_that_request() -> None:
    async def body() -> None:
        model = _FakeModel()
        model.release.set()
        batcher = await fake_batcher(model, max_batch_rows=64, max_queue_rows=100)
        good, bad = await asyncio.gather(batcher.submit(rows(1, 0)),
                                         batcher.submit(rows(1, 1), version=7),
                                         return_exceptions=True)
        assert not isinstance(good, BaseException)
        assert isinstance(bad, NotFound)
        await batcher.close()

    asyncio.run(body())


def test_batching_off_computes_each_request_alone(model_repo: Path) -> None:
    async def body(batcher: Batcher, _r: ModelRegistry, metrics: Metrics) -> None:
        await asyncio.gather(*(batcher.submit(rows(1, i)) for i in range(20)))
        assert batches(metrics) == (20.0, 20.0)

    asyncio.run(with_batcher(model_repo, body, enabled=False))


def test_close_drains_queued_requests() -> None:
    async def body() -> None:
        model = _FakeModel()
        batcher = await fake_batcher(model, max_queue_rows=100)
        pending = [asyncio.ensure_future(batcher.submit(rows(2, i))) for i in range(6)]
        await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        model.release.set()
        await closing
        assert all(p.result().probabilities.shape == (2, 10) for p in pending)

    asyncio.run(body())
