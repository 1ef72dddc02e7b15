"""Load shedding: admission before decode, a byte cap whatever the callers, compute not starved.

The fast lanes (the servicers' `fast_methods()`, as gRPC core's polling thread calls them)
is driven directly with a recording call, and its batches computed with `run_queued` only when
the test says so: what is queued and held is then exact, without timing. The asyncio path
runs on a real grpc.aio server whose forward blocks until released. CoreServer's turns and
gate are tested over real channels.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.core_harness import BOUND_S, Harness
from support.servers import ServerThread, uint8_request

from service.api import oip
from service.api import servicer as classifier
from service.batching import CHARGE_PER_WIRE_BYTE, REQUEST_OVERHEAD_BYTES, Batcher
from service.config import Settings
from service.frontends.core import CoreServer, FastCall
from service.metrics import Metrics
from service.pb.inference import grpc_service_pb2 as ipb
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.registry import ModelRegistry, ServableVersion

IMAGE_BYTES = 784


class RecordingCall:
    """A dataplane.Responder (what the fast lane needs of the core front end's FastCall),
    recording how the call was answered."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.message: bytes | None = None

    def time_remaining(self) -> float | None:
        return None

    def reply(self, message: bytes) -> None:
        self.code, self.message = grpc.StatusCode.OK, message

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


def request_bytes(images: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (images, 784), dtype=np.uint8)
    return bytes(uint8_request(pixels).SerializeToString())


def charge(raw: bytes) -> int:
    return CHARGE_PER_WIRE_BYTE * len(raw) + REQUEST_OVERHEAD_BYTES


class FastPath:
    """A real registry, batcher and both servicers, driven the way the polling thread does."""

    def __init__(self, repo: Path, **batcher: Any) -> None:
        self.metrics = Metrics(CollectorRegistry())
        self.registry = ModelRegistry(repo, self.metrics, rescan_interval_s=0)
        asyncio.run(self.registry.start())
        options: dict[str, Any] = {"max_batch_rows": 256, "max_batch_wait_s": 0.0,
                                   "max_queue_rows": 10_000}
        options.update(batcher)
        self.batcher = Batcher(self.registry, self.metrics, **options)
        self.classifier = classifier.ClassifierServicer(
            self.registry, self.batcher, self.metrics, max_images=4096)
        self.v2 = oip.InferenceServicer(registry=self.registry, batcher=self.batcher,
                                        metrics=self.metrics,
                                        settings=oip.V2Settings.from_settings(Settings()))
        # The fast lanes as server.py plugs them into the core front end.
        self.lanes = {**self.classifier.fast_methods(), **self.v2.fast_methods()}
        self.classify_lane = self.lanes[classifier.CLASSIFY_PATH]
        self.infer_lane = self.lanes[oip.MODEL_INFER_PATH]

    def classify(self, raw: bytes) -> RecordingCall:
        """Classify arriving on the polling thread: the gate, then (if it lets it in) the
        handler; nothing is computed until `compute`."""
        call = RecordingCall()
        if self.classify_lane.gate(call, 0.0):
            self.classify_lane.handler(call, raw)
        return call

    def infer(self, raw: bytes) -> RecordingCall:
        call = RecordingCall()
        if self.infer_lane.gate(call, 0.0):
            self.infer_lane.handler(call, raw)
        return call

    def compute(self) -> None:
        """The polling thread's idle hook, until nothing due is left."""
        for _ in range(10_000):
            if self.batcher.run_queued() is None:
                return
        raise AssertionError("run_queued never ran dry")

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        self.metrics.flush()
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def refused(self, method: str = "Classify") -> float:
        return self.sample("mnist_requests_total", {"method": method, "model": "",
                                                    "version": "", "code": "RESOURCE_EXHAUSTED"})

    def close(self) -> None:
        asyncio.run(self.batcher.close())
        asyncio.run(self.registry.close())


@pytest.fixture
def fast(model_repo: Path) -> Iterator[Callable[..., FastPath]]:
    made: list[FastPath] = []

    def factory(**batcher: Any) -> FastPath:
        made.append(FastPath(model_repo, **batcher))
        return made[-1]

    yield factory
    for f in made:
        f.close()


# --- admission before decode, and the byte cap


def test_message_over_the_byte_budget_is_refused_before_it_is_parsed(
    fast: Callable[..., FastPath],
) -> None:
    good = request_bytes(4)
    garbage = b"\xff" * (100 * IMAGE_BYTES)  # INVALID_ARGUMENT if anyone parsed it
    path = fast(max_queue_bytes=charge(good) + charge(garbage) - 1)
    assert path.classify(good).code is None  # queued, holding its bytes
    refused = path.classify(garbage)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details
    assert "bytes" in refused.details
    assert path.refused() == 1.0
    path.compute()
    # Once the queue is empty the same bytes are parsed, and found wanting.
    assert path.classify(garbage).code == grpc.StatusCode.INVALID_ARGUMENT


def test_v2_message_over_the_byte_budget_is_refused_before_it_is_parsed(
    fast: Callable[..., FastPath],
) -> None:
    good = ipb.ModelInferRequest(
        model_name="mnist", inputs=[ipb.ModelInferRequest.InferInputTensor(
            name="images", datatype="UINT8", shape=[2, 784])],
        raw_input_contents=[bytes(2 * 784)]).SerializeToString()
    garbage = b"\xff" * (100 * IMAGE_BYTES)
    path = fast(max_queue_bytes=charge(good) + charge(garbage) - 1)
    assert path.infer(good).code is None
    refused = path.infer(garbage)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details
    assert path.refused("ModelInfer") == 1.0
    path.compute()
    assert path.infer(garbage).code == grpc.StatusCode.INVALID_ARGUMENT


def test_bytes_held_never_pass_the_cap_whatever_the_number_of_callers(
    fast: Callable[..., FastPath],
) -> None:
    raw = request_bytes(256)
    cap = 10 * charge(raw) + charge(raw) // 2  # room for 10 and a half requests
    path = fast(max_queue_bytes=cap)
    calls = [path.classify(raw) for _ in range(500)]
    queued = [c for c in calls if c.code is None]
    refused = [c for c in calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(queued) == 10
    assert len(refused) == 490
    held = path.sample("mnist_batch_queue_bytes")
    assert held == 10 * charge(raw) <= cap
    assert path.refused() == 490.0
    path.compute()
    assert all(c.code == grpc.StatusCode.OK for c in queued)
    assert path.sample("mnist_batch_queue_bytes") == 0.0


def test_after_a_refusal_new_calls_are_refused_at_the_door_until_the_queue_drains(
    fast: Callable[..., FastPath],
) -> None:
    big, small = request_bytes(256), request_bytes(1)
    path = fast(max_queue_bytes=4 * charge(big))
    for _ in range(4):
        assert path.classify(big).code is None
    assert path.classify(big).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # A one-image request would fit the bytes left, but the batcher sheds until it drains.
    door = path.classify(small)
    assert door.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "refused until" in door.details
    assert not path.batcher.accepting()
    path.compute()
    assert path.batcher.accepting()
    assert path.classify(small).code is None
    path.compute()
    assert path.refused() == 2.0


def test_while_shedding_a_call_waits_unread_at_the_door_for_a_bounded_time(
    fast: Callable[..., FastPath],
) -> None:
    big = request_bytes(256)
    path = fast(max_queue_bytes=4 * charge(big), max_door_wait_s=0.010)
    gate = path.classify_lane.gate
    for _ in range(4):
        assert path.classify(big).code is None
    assert path.classify(big).code == grpc.StatusCode.RESOURCE_EXHAUSTED  # now shedding
    waiting = RecordingCall()
    call = waiting
    assert gate(call, 0.0) is None  # parked: not read, not answered
    assert gate(call, 0.009) is None
    assert waiting.code is None
    assert gate(call, 0.010) is False  # waited its bound: refused, counted
    assert waiting.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "refused until" in waiting.details
    assert path.refused() == 2.0
    path.compute()  # room again: a waiting call is let in...
    assert gate(RecordingCall(), 0.005) is True
    # ...but not one that already waited past the bound (it gave room to the ones behind)
    late = RecordingCall()
    assert gate(late, 0.011) is False
    assert late.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert path.refused() == 3.0


def test_with_no_door_wait_a_shedding_batcher_refuses_at_once(
    fast: Callable[..., FastPath],
) -> None:
    big = request_bytes(256)
    path = fast(max_queue_bytes=charge(big))
    assert path.classify(big).code is None
    assert path.classify(big).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    refused = RecordingCall()
    assert path.infer_lane.gate(refused, 0.0) is False
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_rows_bound_still_holds_beside_the_byte_bound(fast: Callable[..., FastPath]) -> None:
    path = fast(max_queue_rows=300)
    assert path.classify(request_bytes(256)).code is None
    refused = path.classify(request_bytes(64))
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "images waiting" in refused.details


# --- the asyncio front end admits by bytes too


class _BlockingModel:
    """The registry's model, with a forward that waits for the test."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.started = threading.Event()
        self.release = threading.Event()

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.started.set()
        self.release.wait(BOUND_S)
        result: np.ndarray = self.real.predict(x)
        return result


class _BlockingRegistry:
    """A loaded ModelRegistry whose version computes with _BlockingModel."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        sv = registry.resolve("mnist")
        self.model = _BlockingModel(sv.model)
        self.sv = ServableVersion(sv.name, sv.version, self.model, sv.path, 0.0)  # type: ignore[arg-type]
        self.ready = True

    def default_model(self) -> str:
        return "mnist"

    def resolve(self, model: str = "", version: int = 0, label: str = "") -> ServableVersion:
        return self.sv

    def route(self, model: str = "", version: int = 0, label: str = "", key: str = "") -> int:
        return version  # no canary here

    def status(self) -> Any:
        return self.registry.status()


def test_aio_classify_and_stream_refuse_over_budget_messages_before_parsing(
    model_repo: Path,
) -> None:
    good = request_bytes(4)
    garbage = b"\xff" * (100 * IMAGE_BYTES)

    async def body() -> None:
        metrics = Metrics(CollectorRegistry())
        real = ModelRegistry(model_repo, metrics, rescan_interval_s=0)
        await real.start()
        registry = _BlockingRegistry(real)
        batcher = Batcher(registry, metrics, max_batch_rows=256,  # type: ignore[arg-type]
                          max_batch_wait_s=0.0, max_queue_rows=10_000,
                          max_queue_bytes=charge(good) + charge(garbage) - 1, inline_max_rows=0)
        await batcher.start()
        server = grpc.aio.server()
        classifier.add_to_server(classifier.ClassifierServicer(
            registry, batcher, metrics, max_images=4096), server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                classify = ch.unary_unary("/mnist.v1.Classifier/Classify")
                first = asyncio.ensure_future(classify(good, timeout=BOUND_S))
                assert await asyncio.to_thread(registry.model.started.wait, BOUND_S)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await classify(garbage, timeout=BOUND_S)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                stream = ch.stream_stream("/mnist.v1.Classifier/ClassifyStream",
                                          response_deserializer=pb.ClassifyStreamResponse.FromString)
                replies = [r async for r in stream(iter([garbage]), timeout=BOUND_S)]
                assert replies[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                registry.model.release.set()
                await first
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await classify(garbage, timeout=BOUND_S)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            registry.model.release.set()
            await server.stop(0)
            await batcher.close()
            await real.close()
        metrics.flush()
        refused = metrics.registry.get_sample_value("mnist_requests_total", {
            "method": "Classify", "model": "", "version": "", "code": "RESOURCE_EXHAUSTED"})
        assert refused == 1.0

    asyncio.run(body())


# --- CoreServer: accepting never starves computing; the gate; hooks that raise


class _Turns:
    """A fast method answered from the idle hook, and a first call that holds the polling
    thread until the test has sent a burst (so a burst is waiting when it lets go)."""

    def __init__(self) -> None:
        self.queued: list[FastCall] = []
        self.batches: list[int] = []
        self.hold = threading.Event()
        self.held = threading.Event()
        self.hook_calls = 0
        self.raise_in_hook = False
        self.handled = 0
        self.read: list[bytes] = []
        self.asked: list[float] = []
        self.open = threading.Event()
        self.door_s = BOUND_S

    def register(self, server: CoreServer) -> None:
        server.add_fast_method("/t.T/Hold", self.on_hold)
        server.add_fast_method("/t.T/Later", self.on_later)
        server.add_fast_method("/t.T/Gated", self.on_gated, gate=self.gate)
        server.add_fast_method("/t.T/Door", self.on_gated, gate=self.door)
        server.add_idle_hook(self.hook)
        server.add_idle_hook(self.answer)

    def on_hold(self, call: FastCall, raw: bytes) -> None:
        self.held.set()
        self.hold.wait(BOUND_S)
        call.reply(b"held")

    def on_later(self, call: FastCall, raw: bytes) -> None:
        self.queued.append(call)

    def gate(self, call: FastCall, waited_s: float) -> bool:
        call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused at the door")
        return False

    def door(self, call: FastCall, waited_s: float) -> bool | None:
        """Parks every call until `open` is set (then lets them in), or until it has waited
        `door_s` (then refuses it); records what it was asked."""
        self.asked.append(waited_s)
        if self.open.is_set():
            return True
        if waited_s >= self.door_s:
            call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, f"waited {waited_s:.3f} s")
            return False
        return None

    def on_gated(self, call: FastCall, raw: bytes) -> None:
        self.handled += 1
        self.read.append(raw)
        call.reply(b"read")

    def hook(self) -> None:
        self.hook_calls += 1
        if self.raise_in_hook:
            raise RuntimeError("idle hook bug")

    def answer(self) -> None:
        if self.queued:
            self.batches.append(len(self.queued))
        for call in self.queued:
            call.reply(b"later")
        self.queued.clear()


@pytest.fixture
def turns() -> Iterator[tuple[_Turns, Harness]]:
    t = _Turns()
    harness = Harness(t.register, CoreServer(completions_per_turn=4))
    yield t, harness
    t.hold.set()
    harness.close()


def test_idle_hooks_run_between_bounded_turns_of_a_burst(
    turns: tuple[_Turns, Harness],
) -> None:
    t, harness = turns
    with grpc.insecure_channel(harness.target) as ch, ThreadPoolExecutor(41) as pool:
        held = pool.submit(ch.unary_unary("/t.T/Hold"), b"", timeout=BOUND_S)
        assert t.held.wait(BOUND_S)
        later = [pool.submit(ch.unary_unary("/t.T/Later"), b"", timeout=BOUND_S)
                 for _ in range(40)]
        time.sleep(0.5)  # let the burst reach gRPC core; the assertion holds whatever came
        t.hold.set()
        assert held.result(BOUND_S) == b"held"
        assert all(f.result(BOUND_S) == b"later" for f in later)
    # 4 completions a turn, a call is 2 (its arrival, its message): the idle hook answered
    # the burst a few calls at a time, not all at once after every completion was handled.
    assert sum(t.batches) == 40
    assert max(t.batches) <= 4, t.batches


def test_gate_refuses_a_call_without_its_message_being_read(
    turns: tuple[_Turns, Harness],
) -> None:
    t, harness = turns
    with grpc.insecure_channel(harness.target) as ch, pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/t.T/Gated")(b"x" * 100_000, timeout=BOUND_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "refused at the door"
    assert t.handled == 0


def test_a_parked_call_is_read_only_once_the_gate_lets_it_in_oldest_first(
    turns: tuple[_Turns, Harness],
) -> None:
    t, harness = turns
    with grpc.insecure_channel(harness.target) as ch, ThreadPoolExecutor(3) as pool:
        door = ch.unary_unary("/t.T/Door")
        calls = []
        for i in range(3):
            calls.append(pool.submit(door, bytes([i]) * 50_000, timeout=BOUND_S))
            deadline = time.monotonic() + BOUND_S
            while len(t.asked) <= i and time.monotonic() < deadline:
                time.sleep(0.001)
        time.sleep(0.05)  # parked: asked again each turn, never read
        assert t.handled == 0
        asked = len(t.asked)
        assert asked > 3  # asked again while it waited, not only on arrival
        t.open.set()
        assert [c.result(BOUND_S) for c in calls] == [b"read"] * 3
    assert [raw[0] for raw in t.read] == [0, 1, 2]  # first come, first served


def test_a_parked_call_is_refused_unread_when_the_gate_says_it_waited_too_long(
    turns: tuple[_Turns, Harness],
) -> None:
    t, harness = turns
    t.door_s = 0.05
    with grpc.insecure_channel(harness.target) as ch, pytest.raises(grpc.RpcError) as info:
        ch.unary_unary("/t.T/Door")(b"x" * 100_000, timeout=BOUND_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert t.handled == 0
    assert max(t.asked) >= 0.05


def test_stopping_answers_the_calls_parked_at_the_door(
    turns: tuple[_Turns, Harness],
) -> None:
    t, harness = turns
    with grpc.insecure_channel(harness.target) as ch, ThreadPoolExecutor(1) as pool:
        parked = pool.submit(ch.unary_unary("/t.T/Door"), b"x", timeout=BOUND_S)
        deadline = time.monotonic() + BOUND_S
        while not t.asked and time.monotonic() < deadline:
            time.sleep(0.001)
        started = time.monotonic()
        harness.stop(BOUND_S).result(BOUND_S)  # asks the gate with an infinite wait
        assert time.monotonic() - started < BOUND_S / 2  # not the grace period's end
        with pytest.raises(grpc.RpcError) as info:
            parked.result(BOUND_S)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert t.handled == 0


def test_an_idle_hook_that_raises_neither_kills_the_thread_nor_stops_other_hooks(
    turns: tuple[_Turns, Harness],
) -> None:
    t, harness = turns
    t.raise_in_hook = True
    with grpc.insecure_channel(harness.target) as ch:
        for _ in range(3):
            assert ch.unary_unary("/t.T/Later")(b"", timeout=BOUND_S) == b"later"
    assert t.hook_calls >= 3
    assert not harness.call(harness.server.wait_for_termination(0.01))


def test_wait_for_termination_returns_when_the_polling_thread_ends_unasked() -> None:
    def register(server: CoreServer) -> None:
        def fatal() -> None:
            raise SystemExit("the polling thread must end")  # not an Exception: not caught

        server.add_idle_hook(fatal)

    harness = Harness(register)
    try:
        assert harness.call(harness.server.wait_for_termination(BOUND_S), BOUND_S + 1)
    finally:
        harness.stopped = True
        harness.close()


# --- calls gRPC core holds before the server takes them

async def _burst(target: str, calls: int, connections: int) -> dict[str, int]:
    """`calls` one-image Classify calls at once over `connections` channels: their codes."""
    body = request_bytes(1)
    channels = [grpc.aio.insecure_channel(target) for _ in range(connections)]
    try:
        await asyncio.gather(*(ch.channel_ready() for ch in channels))

        async def one(i: int) -> str:
            try:
                await channels[i % connections].unary_unary(classifier.CLASSIFY_PATH)(
                    body, timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as e:
                return e.code().name

        codes: dict[str, int] = {}
        for code in await asyncio.gather(*(one(i) for i in range(calls))):
            codes[code] = codes.get(code, 0) + 1
        return codes
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


@pytest.mark.parametrize("frontend", ["core", "aio"])
def test_a_burst_past_grpc_cores_default_pending_limit_is_served_not_cancelled(
    model_repo: Path, start: Callable[..., ServerThread], frontend: str
) -> None:
    """gRPC core holds calls the server has not taken yet in a pending list, and by default
    ends them CANCELLED once it holds 1,000 (grpc.aio takes calls one at a time from its
    loop): a burst of 3,000 calls, each of which fits the queue, must all be answered."""
    server = start(model_repo, frontend=frontend)
    codes = asyncio.run(_burst(server.target, 3000, 10))
    assert codes == {"OK": 3000}, codes


def test_max_pending_calls_is_the_bound_grpc_core_applies(
    model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    """The same burst against a server told to hold at most 50 such calls: gRPC core ends
    some CANCELLED (the bound is applied, and is the operator's to set)."""
    server = start(model_repo, max_pending_calls=50)
    codes = asyncio.run(_burst(server.target, 3000, 10))
    assert codes.get("CANCELLED", 0) > 0, codes
    assert set(codes) <= {"OK", "CANCELLED"}, codes
