"""The data plane's accounting: every lane counts each request exactly once, and in-flight
returns to 0 on every path (success, bad input, a bug in a pipeline or an encoder, a
cancelled caller, a refusal at the door).

Deterministic: a real registry and batcher, the fast lane driven as the core front end's
polling thread drives it (gate, handler, then the idle hook), and a recording metrics object
injected through the constructor (`dataplane.RequestMetrics`: the part of Metrics a scope
uses).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.servers import uint8_request

from service.batching import Batcher, Prediction
from service.dataplane import (
    ClassifyPipeline,
    DataPlane,
    InferPipeline,
    InferRequest,
    Job,
    RequestScope,
)
from service.errors import InvalidInput, NotFound, Overloaded
from service.metrics import Metrics
from service.pb.inference import grpc_service_pb2 as ipb
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.registry import ModelRegistry


@dataclass
class Gauge:
    n: float = 0
    peak: float = 0
    incs: int = 0

    def inc(self, amount: float = 1) -> None:
        self.n += amount
        self.incs += 1
        self.peak = max(self.peak, self.n)

    def dec(self, amount: float = 1) -> None:
        self.n -= amount


@dataclass
class RecordingMetrics:
    enabled: bool = True
    inflight: Gauge = field(default_factory=Gauge)
    done: list[tuple[str, str, str, str, int, float]] = field(default_factory=list)

    def request_done(self, method: str, model: str, version: str, code: str, images: int,
                     duration_s: float) -> None:
        self.done.append((method, model, version, code, images, duration_s))

    def codes(self) -> list[str]:
        return [d[3] for d in self.done]


class Call:
    """A dataplane.Responder recording its one answer."""

    def __init__(self) -> None:
        self.answers: list[tuple[grpc.StatusCode, bytes | str]] = []

    def time_remaining(self) -> float | None:
        return None

    def reply(self, message: bytes) -> None:
        self.answers.append((grpc.StatusCode.OK, message))

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self.answers.append((code, details))


class Bug(Exception):
    pass


class _BadEncodeJob(Job):
    __slots__ = ()

    def encode(self, prediction: Prediction) -> bytes:
        raise Bug("encoder bug")


class BuggyPipeline:
    """A pipeline with a bug in `prepare` or in its job's `encode`."""

    method = "Classify"

    def __init__(self, where: str) -> None:
        self.where = where

    def prepare(self, raw: bytes, scope: RequestScope) -> Job:
        if self.where == "prepare":
            raise Bug("prepare bug")
        scope.images = 1
        return _BadEncodeJob(np.zeros((1, 784), np.float32), "", 0, "", len(raw))


def classify_bytes(images: int = 1, model: str = "") -> bytes:
    request = uint8_request(np.zeros((images, 784), np.uint8))
    request.model = model
    return bytes(request.SerializeToString())


@pytest.fixture
def registry(model_repo: Path) -> ModelRegistry:
    registry = ModelRegistry(model_repo, Metrics(CollectorRegistry()), rescan_interval_s=0)
    asyncio.run(registry.start())
    return registry


@pytest.fixture
def metrics() -> RecordingMetrics:
    return RecordingMetrics()


def make_batcher(registry: ModelRegistry, **bounds: int) -> Batcher:
    options = {"max_batch_rows": 256, "max_queue_rows": 10_000, **bounds}
    return Batcher(registry, Metrics.disabled(), max_batch_wait_s=0.0, **options)


def run_fast(plane: DataPlane, pipeline: object, batcher: Batcher, raw: bytes,
             waited_s: float = 0.0) -> Call:
    """One call through the fast lane as the polling thread runs it, computed at once."""
    lane = plane.fast_method(pipeline)  # type: ignore[arg-type]
    call = Call()
    if lane.gate(call, waited_s):
        lane.handler(call, raw)
    for _ in range(100):
        if batcher.run_queued() is None:
            break
    return call


# --- the fast lane


def test_fast_lane_counts_a_good_request_once_under_the_version_that_answered(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    batcher = make_batcher(registry)
    plane = DataPlane(batcher, metrics)
    call = run_fast(plane, ClassifyPipeline(registry, max_images=8), batcher, classify_bytes(3))
    assert [a[0] for a in call.answers] == [grpc.StatusCode.OK]
    reply = pb.ClassifyResponse.FromString(call.answers[0][1])  # type: ignore[arg-type]
    assert len(reply.predictions) == 3
    assert [d[:5] for d in metrics.done] == [("Classify", "mnist", "1", "OK", 3)]
    assert metrics.inflight.n == 0
    assert metrics.inflight.peak == 1


def test_fast_lane_counts_bad_input_once_and_answers_invalid_argument(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    batcher = make_batcher(registry)
    plane = DataPlane(batcher, metrics)
    call = run_fast(plane, ClassifyPipeline(registry, max_images=8), batcher, b"\xff\xff")
    assert [a[0] for a in call.answers] == [grpc.StatusCode.INVALID_ARGUMENT]
    assert [d[:5] for d in metrics.done] == [("Classify", "", "", "INVALID_ARGUMENT", 0)]
    assert metrics.inflight.n == 0


@pytest.mark.parametrize("where", ["prepare", "encode"])
def test_fast_lane_counts_a_bug_once_as_internal_and_never_raises(
    registry: ModelRegistry, metrics: RecordingMetrics, where: str
) -> None:
    batcher = make_batcher(registry)
    plane = DataPlane(batcher, metrics)
    call = run_fast(plane, BuggyPipeline(where), batcher, classify_bytes())
    assert [a[0] for a in call.answers] == [grpc.StatusCode.INTERNAL]
    assert metrics.codes() == ["INTERNAL"]
    assert metrics.inflight.n == 0


def test_a_refusal_at_the_door_is_counted_once_with_its_wait_and_never_in_flight(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    big = classify_bytes(4)
    batcher = make_batcher(registry, max_queue_rows=4)
    plane = DataPlane(batcher, metrics)
    lane = plane.fast_method(ClassifyPipeline(registry, max_images=8))
    held = Call()
    assert lane.gate(held, 0.0) is True
    lane.handler(held, big)  # queued, not computed: the queue is full
    over = Call()
    lane.handler(over, classify_bytes(1))  # over the rows bound: refused, now shedding
    assert [a[0] for a in over.answers] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert not batcher.accepting()
    refused = Call()
    assert lane.gate(refused, 0.25) is False  # at the door: never read, never in flight
    assert [a[0] for a in refused.answers] == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert metrics.inflight.incs == 2  # the held call and the one over the bound
    assert metrics.codes() == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    method, model, version, _, images, seconds = metrics.done[-1]
    assert (method, model, version, images) == ("Classify", "", "", 0)
    assert seconds >= 0.25  # the time it waited at the door counts
    while batcher.run_queued() is not None:
        pass
    assert [a[0] for a in held.answers] == [grpc.StatusCode.OK]
    assert metrics.codes() == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "OK"]
    assert metrics.inflight.n == 0


# --- the asyncio lane


def test_async_lane_counts_success_and_bad_input_once_each(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    async def body() -> None:
        batcher = make_batcher(registry)
        await batcher.start()
        plane = DataPlane(batcher, metrics)
        pipeline = ClassifyPipeline(registry, max_images=8)
        try:
            raw = await plane.call(pipeline, classify_bytes(2), None)
            assert len(pb.ClassifyResponse.FromString(raw).predictions) == 2
            with pytest.raises(InvalidInput):
                await plane.call(pipeline, classify_bytes(9), None)  # over max_images
            with pytest.raises(NotFound):
                await plane.call(pipeline, classify_bytes(1, model="nope"), None, method="X")
        finally:
            await batcher.close()

    asyncio.run(body())
    assert [d[:5] for d in metrics.done] == [
        ("Classify", "mnist", "1", "OK", 2),
        ("Classify", "", "", "INVALID_ARGUMENT", 0),
        ("X", "", "", "NOT_FOUND", 0),
    ]
    assert metrics.inflight.n == 0
    assert metrics.inflight.peak == 1


def test_async_lane_counts_a_cancelled_caller_once_as_cancelled(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    async def body() -> None:
        batcher = make_batcher(registry)  # not started: nothing computes, the call waits
        plane = DataPlane(batcher, metrics)
        task = asyncio.ensure_future(
            plane.call(ClassifyPipeline(registry, max_images=8), classify_bytes(), None))
        for _ in range(10):
            await asyncio.sleep(0)
        assert metrics.inflight.n == 1
        assert not metrics.done
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(body())
    assert metrics.codes() == ["CANCELLED"]
    assert metrics.inflight.n == 0


@pytest.mark.parametrize("where", ["prepare", "encode"])
def test_async_lane_counts_a_bug_once_as_internal_and_raises_it(
    registry: ModelRegistry, metrics: RecordingMetrics, where: str
) -> None:
    async def body() -> None:
        batcher = make_batcher(registry)
        await batcher.start()
        try:
            with pytest.raises(Bug):
                await DataPlane(batcher, metrics).call(BuggyPipeline(where), b"", None)
        finally:
            await batcher.close()

    asyncio.run(body())
    assert metrics.codes() == ["INTERNAL"]
    assert metrics.inflight.n == 0


def test_a_refusal_before_parsing_is_counted_once_on_both_lanes(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    """admit_wire refuses a message whose charge cannot fit before anything decodes it."""
    big = classify_bytes(64)
    batcher = make_batcher(registry, max_queue_bytes=4 * len(big) + 4096)
    plane = DataPlane(batcher, metrics)
    pipeline = ClassifyPipeline(registry, max_images=64)
    lane = plane.fast_method(pipeline)
    first = Call()
    lane.handler(first, big)  # held (queued, not computed)
    second = Call()
    lane.handler(second, big)  # its charge does not fit beside the first
    assert [a[0] for a in second.answers] == [grpc.StatusCode.RESOURCE_EXHAUSTED]

    async def body() -> None:
        with pytest.raises(Overloaded):
            await plane.call(pipeline, big, None)

    asyncio.run(body())
    assert metrics.codes() == ["RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert metrics.inflight.n == 1  # the held one only
    while batcher.run_queued() is not None:
        pass
    assert metrics.inflight.n == 0


# --- the scope itself and the v2 pipeline's reusable step


def test_a_scope_counts_once_however_often_it_is_finished(metrics: RecordingMetrics) -> None:
    scope = RequestScope(metrics, "ModelInfer")
    scope.finish(grpc.StatusCode.OK)
    scope.fail(Bug())
    scope.finish(grpc.StatusCode.INTERNAL)
    assert metrics.codes() == ["OK"]
    assert metrics.inflight.n == 0


def test_a_disabled_metrics_object_moves_no_in_flight_gauge() -> None:
    metrics = RecordingMetrics(enabled=False)
    RequestScope(metrics, "Classify").finish(grpc.StatusCode.OK)
    assert metrics.inflight.peak == 0
    assert metrics.codes() == ["OK"]


def test_v2_resolve_takes_any_wire_s_request_and_encoder(
    registry: ModelRegistry, metrics: RecordingMetrics
) -> None:
    """What an HTTP front end does: its own parsing into InferRequest, its own encoder,
    the shared resolve, batcher and accounting."""
    batcher = make_batcher(registry)
    plane = DataPlane(batcher, metrics)
    v2 = InferPipeline(registry, max_images=8)

    def encoder(job: object, prediction: Prediction) -> bytes:
        return f"{prediction.version.version}:{prediction.probabilities.shape}".encode()

    class Json:
        method = "ModelInfer"

        def prepare(self, raw: bytes, scope: RequestScope) -> Job:
            request = InferRequest(id="a", model="mnist", version=1, label="",
                                   x=np.zeros((int(raw), 784), np.float32))
            return v2.resolve(request, scope, len(raw), encoder)

    call = run_fast(plane, Json(), batcher, b"2")
    assert call.answers == [(grpc.StatusCode.OK, b"1:(2, 10)")]
    assert [d[:5] for d in metrics.done] == [("ModelInfer", "mnist", "1", "OK", 2)]

    grpc_call = run_fast(plane, v2, batcher, ipb.ModelInferRequest(
        model_name="mnist", model_version="7").SerializeToString())
    assert [a[0] for a in grpc_call.answers] == [grpc.StatusCode.NOT_FOUND]
    assert metrics.inflight.n == 0
