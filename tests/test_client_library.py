"""ClassifierClient / AsyncClassifierClient: retry by default, asyncio, classify_many.

A scripted mnist.v1.Classifier (a real grpc server on 127.0.0.1 port 0) fails its first calls
or answers late on purpose, so what the client does about it is observable; the real service
(conftest's `server`) checks that both clients agree with the model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from support.servers import ServerThread, make_model

from mnist_client.client import (
    AsyncClassifierClient,
    ClassifierClient,
    ClientError,
    RetryPolicy,
)
from service.model import pixels_to_input
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc


class Scripted(pb_grpc.ClassifierServicer):
    """Fails the first `fail_first` Classify calls with `code`; then answers every image with
    class `tag % 10` and version `tag`, where `tag` is the request's first pixel, after
    `delay_s(tag)` seconds. Counts calls and the most calls in flight at once."""

    def __init__(
        self,
        fail_first: int = 0,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        delay_s: Callable[[int], float] = lambda tag: 0.0,
    ) -> None:
        self.fail_first = fail_first
        self.code = code
        self.delay_s = delay_s
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()

    def Classify(
        self, request: pb.ClassifyRequest, context: grpc.ServicerContext
    ) -> pb.ClassifyResponse:
        with self.lock:
            self.calls += 1
            call = self.calls
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if call <= self.fail_first:
                context.abort(self.code, f"scripted failure {call}")
            tag = request.pixels[0]
            time.sleep(self.delay_s(tag))
            n = len(request.pixels) // 784
            probs = np.zeros((n, 10), "<f4")
            probs[:, tag % 10] = 1.0
            return pb.ClassifyResponse(model="scripted", version=tag, labels=[tag % 10] * n,
                                       probabilities_f32le=probs.tobytes())
        finally:
            with self.lock:
                self.inflight -= 1


class ScriptedServer:
    def __init__(self, servicer: Scripted) -> None:
        self.servicer = servicer
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16))
        pb_grpc.add_ClassifierServicer_to_server(servicer, self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def factory(**kwargs: object) -> ScriptedServer:
        servers.append(ScriptedServer(Scripted(**kwargs)))  # type: ignore[arg-type]
        return servers[-1]

    yield factory
    for s in servers:
        s.server.stop(None)


def tagged(tag: int, n: int = 1) -> np.ndarray:
    """n images whose first pixel carries `tag` (Scripted answers version=tag)."""
    images = np.zeros((n, 28, 28), np.uint8)
    images[0, 0, 0] = tag
    return images


# --- retry by default


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
def test_default_client_retries_what_a_stopping_replica_answers(
    scripted: Callable[..., ScriptedServer], code: grpc.StatusCode
) -> None:
    server = scripted(fail_first=1, code=code)
    with ClassifierClient(server.target) as client:
        result = client.classify(tagged(7))
    assert (result.version, result.labels.tolist()) == (7, [7])
    assert server.servicer.calls == 2


def test_retry_covers_large_requests(scripted: Callable[..., ScriptedServer]) -> None:
    # 2048 uint8 images = 1.6 MB: past gRPC's default 256 KiB replay buffer, beyond which
    # it would silently stop retrying.
    server = scripted(fail_first=1)
    with ClassifierClient(server.target) as client:
        assert client.classify(tagged(3, n=2048)).labels.tolist() == [3] * 2048


def test_retry_can_be_configured_or_turned_off(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(fail_first=1)
    with ClassifierClient(server.target, retry=None) as client, \
            pytest.raises(ClientError, match="UNAVAILABLE: scripted failure 1") as failed:
        client.classify(tagged(1))
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    server = scripted(fail_first=2)
    with ClassifierClient(server.target, retry=RetryPolicy(max_attempts=2)) as client, \
            pytest.raises(ClientError, match="scripted failure 2"):
        client.classify(tagged(1))
    server = scripted(fail_first=2)
    with ClassifierClient(server.target, retry=RetryPolicy(max_attempts=3)) as client:
        assert client.classify(tagged(2)).version == 2
    # Only the listed codes are retried: a bad request is the caller's to fix.
    server = scripted(fail_first=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    with ClassifierClient(server.target) as client, pytest.raises(ClientError):
        client.classify(tagged(1))
    assert server.servicer.calls == 1


def test_async_client_retries_by_default(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(fail_first=1)

    async def go() -> int:
        async with AsyncClassifierClient(server.target) as client:
            return (await client.classify(tagged(5))).version

    assert asyncio.run(go()) == 5
    assert server.servicer.calls == 2


# --- the asyncio client against the real service


def test_async_client_matches_the_blocking_one(server: ServerThread) -> None:
    images = np.random.default_rng(4).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    expected = make_model(seed=1).predict(pixels_to_input(images)).argmax(axis=1).tolist()

    async def go() -> tuple[list[int], list[int], list[str], int]:
        async with AsyncClassifierClient(server.target) as client:
            r = await client.classify(images)
            f = await client.classify(images.astype(np.float32) / 255)
            names = [m.name for m in await client.models()]
            info = await client.model_info("mnist")
            with pytest.raises(ClientError, match="NOT_FOUND: unknown model 'x'"):
                await client.classify(images, model="x")
            return r.labels.tolist(), f.labels.tolist(), names, info.current_version

    labels, float_labels, names, current = asyncio.run(go())
    assert labels == float_labels == expected
    assert (names, current) == (["mnist"], 1)
    with ClassifierClient(server.target) as client:
        assert client.classify(images).labels.tolist() == expected


# --- classify_many: order, bounded concurrency, bounded read-ahead


def slow_first(tag: int) -> float:
    return 0.3 if tag == 0 else 0.0


def test_classify_many_yields_in_input_order(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted(delay_s=slow_first)  # batch 0 is answered last
    with ClassifierClient(server.target) as client:
        versions = [r.version for r in client.classify_many(
            (tagged(t, n=2) for t in range(10)), concurrency=4)]
    assert versions == list(range(10))


def test_classify_many_bounds_what_is_in_flight_and_read_ahead(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(delay_s=lambda tag: 0.2)  # long enough that all 3 overlap
    pulled = 0

    def batches() -> Iterator[np.ndarray]:
        nonlocal pulled
        for t in range(12):
            pulled += 1
            yield tagged(t)

    seen = []
    with ClassifierClient(server.target) as client:
        for k, result in enumerate(client.classify_many(batches(), concurrency=3), start=1):
            assert pulled <= k - 1 + 3, f"read {pulled} batches before yielding result {k}"
            seen.append(result.version)
    assert seen == list(range(12))
    assert server.servicer.max_inflight == 3


def test_classify_many_stops_on_the_first_failure(server: ServerThread) -> None:
    good = np.zeros((1, 28, 28), np.uint8)
    with ClassifierClient(server.target) as client:
        results = client.classify_many([good, good, np.zeros(5, np.uint8), good], concurrency=2)
        assert next(results).version == 1
        assert next(results).version == 1
        with pytest.raises(ClientError, match="multiple of 784 pixels"):
            next(results)
        with pytest.raises(ValueError, match="concurrency must be at least 1"):
            next(client.classify_many([good], concurrency=0))


def test_async_classify_many_order_and_bound(scripted: Callable[..., ScriptedServer]) -> None:
    async def batches() -> AsyncIterator[np.ndarray]:
        for t in range(8):
            yield tagged(t)

    async def go(target: str) -> list[int]:
        async with AsyncClassifierClient(target) as client:
            return [r.version async for r in client.classify_many(batches(), concurrency=3)]

    slow = scripted(delay_s=slow_first)  # batch 0 is answered last
    assert asyncio.run(go(slow.target)) == list(range(8))
    steady = scripted(delay_s=lambda tag: 0.2)
    assert asyncio.run(go(steady.target)) == list(range(8))
    assert steady.servicer.max_inflight == 3
