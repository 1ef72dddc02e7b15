"""CoreServer (service/frontends/core.py) for real: fast methods, the asyncio lane, streams, stop,
health.

CoreServer is built on grpc's private cygrpc layer, so these tests pin down what its users rely
on: every test starts a CoreServer on 127.0.0.1 port 0 on its own event loop in a background
thread, registers small bytes-in/bytes-out handlers (no proto needed) and talks to it with
real synchronous channels. Anything the handlers observe on the server side (a cancellation,
a done callback) is reported through a threading.Event the test waits on with a bound.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service.frontends.core import Context, CoreServer, FastCall

T = TypeVar("T")
SVC = "test.Svc"
ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 10.0  # upper bound for anything that should happen "soon" (a hang guard, not a timing)
# gRPC core hands the server the deadline converted from its monotonic clock to wall time; the
# conversion (and the grpc-timeout header's rounding) can put it a few ms past the client's.
CLOCK_SLACK_S = 0.5


class Harness:
    """A CoreServer on its own event loop in a daemon thread, as service code runs it."""

    def __init__(self, configure: Callable[[CoreServer], None],
                 server: CoreServer | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = server if server is not None else CoreServer()
        configure(self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.stopped = False
        self.call(self.server.start())

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = BOUND_S) -> T:
        return self.submit(coro).result(timeout)

    def barrier(self) -> None:
        """Return once everything scheduled on the loop before this call has had a turn."""

        async def nothing() -> None:
            pass

        self.call(nothing())

    def stop(self, grace: float | None) -> Future[None]:
        self.stopped = True
        return self.submit(self.server.stop(grace))

    def close(self) -> None:
        try:
            if not self.stopped:  # with a grace: stop(0) can crash (see the test below)
                self.stop(1.0).result(BOUND_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(BOUND_S)
            self.loop.close()


@pytest.fixture
def core() -> Iterator[Callable[[Callable[[CoreServer], None]], Harness]]:
    """Factory: core(configure) -> a started Harness; all closed at teardown."""
    harnesses: list[Harness] = []

    def factory(configure: Callable[[CoreServer], None]) -> Harness:
        harness = Harness(configure)
        harnesses.append(harness)
        return harness

    yield factory
    for harness in harnesses:
        harness.close()


class Service:
    """Test handlers for both lanes; threading.Events report what happened on the server."""

    def __init__(self) -> None:
        self.later: list[tuple[FastCall, bytes]] = []  # touched only on the polling thread
        self.later_batches: list[int] = []
        self.gate = asyncio.Event()  # bound to the server loop on first use
        self.wait_started = threading.Event()
        self.wait_unwound = threading.Event()
        self.done_callback_ran = threading.Event()
        self.cancelled_seen: list[bool] = []

    def register(self, server: CoreServer) -> None:
        server.add_fast_method("/test.Fast/Now", self.fast_now)
        server.add_fast_method("/test.Fast/Fail", self.fast_fail)
        server.add_fast_method("/test.Fast/Later", self.fast_later)
        server.add_fast_method("/test.Fast/Raise", self.fast_raise)
        server.add_fast_method("/test.Fast/Deadline", self.fast_deadline)
        server.add_idle_hook(self.answer_later)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SVC, {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Abort": grpc.unary_unary_rpc_method_handler(self.abort),
            "Raise": grpc.unary_unary_rpc_method_handler(self.raise_),
            "SetCode": grpc.unary_unary_rpc_method_handler(self.set_code),
            "Metadata": grpc.unary_unary_rpc_method_handler(self.metadata),
            "Peer": grpc.unary_unary_rpc_method_handler(self.peer),
            "TimeRemaining": grpc.unary_unary_rpc_method_handler(self.time_remaining),
            "Trailing": grpc.unary_unary_rpc_method_handler(self.trailing),
            "Wait": grpc.unary_unary_rpc_method_handler(self.wait),
            "Gate": grpc.unary_unary_rpc_method_handler(self.through_gate),
            "Unserializable": grpc.unary_unary_rpc_method_handler(
                self.echo, response_serializer=refuse_to_serialize),
            "Yield": grpc.unary_stream_rpc_method_handler(self.yield_n),
            "Write": grpc.unary_stream_rpc_method_handler(self.write_n),
            "Sum": grpc.stream_unary_rpc_method_handler(self.sum_sizes),
            "SumInts": grpc.stream_unary_rpc_method_handler(
                self.sum_ints, request_deserializer=parse_int,
                response_serializer=lambda n: str(n).encode()),
            "EchoStream": grpc.stream_stream_rpc_method_handler(self.echo_stream),
        }),))

    # --- fast methods (polling thread)

    def fast_now(self, call: FastCall, raw: bytes) -> None:
        call.reply(b"now:" + raw)

    def fast_fail(self, call: FastCall, raw: bytes) -> None:
        call.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "full: " + raw.decode())

    def fast_later(self, call: FastCall, raw: bytes) -> None:
        self.later.append((call, raw))

    def answer_later(self) -> None:
        if self.later:
            self.later_batches.append(len(self.later))
        for call, raw in self.later:
            call.reply(b"later:" + raw)
        self.later.clear()

    def fast_raise(self, call: FastCall, raw: bytes) -> None:
        raise RuntimeError("fast handler bug")

    def fast_deadline(self, call: FastCall, raw: bytes) -> None:
        call.reply(repr(call.time_remaining()).encode())

    # --- the asyncio lane

    async def echo(self, request: bytes, context: Context) -> bytes:
        return request

    async def abort(self, request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused " + request.decode())
        raise AssertionError("abort returned")

    async def raise_(self, request: bytes, context: Context) -> bytes:
        raise ValueError("handler bug")

    async def set_code(self, request: bytes, context: Context) -> bytes:
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("no model " + request.decode())
        return b"ignored"

    async def metadata(self, request: bytes, context: Context) -> bytes:
        values = dict(context.invocation_metadata())
        value = values.get(request.decode(), b"<missing>")
        return value if isinstance(value, bytes) else value.encode()

    async def peer(self, request: bytes, context: Context) -> bytes:
        return context.peer().encode()

    async def time_remaining(self, request: bytes, context: Context) -> bytes:
        return repr(context.time_remaining()).encode()

    async def trailing(self, request: bytes, context: Context) -> bytes:
        await context.send_initial_metadata((("x-initial", "i-" + request.decode()),))
        context.set_trailing_metadata((("x-trailer", "t-" + request.decode()),))
        return b"ok"

    async def wait(self, request: bytes, context: Context) -> bytes:
        """Wait forever; report being unwound (cancelled) and what the done callback saw."""

        def on_done(ctx: Context) -> None:
            self.cancelled_seen.append(ctx.cancelled())
            self.done_callback_ran.set()

        context.add_done_callback(on_done)
        try:
            self.wait_started.set()
            await asyncio.Event().wait()
        finally:
            self.wait_unwound.set()
        raise AssertionError("unreachable")

    async def through_gate(self, request: bytes, context: Context) -> bytes:
        self.wait_started.set()
        await self.gate.wait()
        return b"through:" + request

    async def yield_n(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield f"y{i}".encode()

    async def write_n(self, request: bytes, context: Context) -> None:
        for i in range(int(request)):
            await context.write(f"w{i}".encode())

    async def sum_sizes(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        return str(sum([len(r) async for r in requests])).encode()

    async def sum_ints(self, requests: AsyncIterator[int], context: Context) -> int:
        return sum([r async for r in requests])

    async def echo_stream(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield b"echo:" + request


def refuse_to_serialize(message: bytes) -> bytes:
    raise TypeError(f"cannot serialize {message!r}")


def parse_int(raw: bytes) -> int:
    return int(raw.decode("ascii"))  # ValueError / UnicodeDecodeError on anything else


@pytest.fixture
def service() -> Service:
    return Service()


@pytest.fixture
def served(
    core: Callable[[Callable[[CoreServer], None]], Harness], service: Service
) -> Harness:
    return core(service.register)


@pytest.fixture
def channel(served: Harness) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.target) as ch:
        yield ch


def unary(channel: grpc.Channel, path: str) -> Any:
    return channel.unary_unary(path)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_serves(channel: grpc.Channel) -> None:
    """The server still answers on both lanes."""
    assert unary(channel, f"/{SVC}/Echo")(b"still", timeout=5) == b"still"
    assert unary(channel, "/test.Fast/Now")(b"still", timeout=5) == b"now:still"


# --- fast methods


def test_fast_method_replies_at_once(channel: grpc.Channel) -> None:
    response, call = unary(channel, "/test.Fast/Now").with_call(b"abc", timeout=5)
    assert response == b"now:abc"
    assert call.code() == grpc.StatusCode.OK


def test_fast_method_fails_at_once_with_code_and_details(channel: grpc.Channel) -> None:
    err = rpc_error(lambda: unary(channel, "/test.Fast/Fail")(b"q7", timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "full: q7"


def test_fast_method_answered_from_idle_hook_for_64_concurrent_callers(
    channel: grpc.Channel, service: Service, served: Harness
) -> None:
    later = unary(channel, "/test.Fast/Later")
    futures = [later.future(f"req-{i}".encode(), timeout=BOUND_S) for i in range(64)]
    answers = [f.result() for f in futures]
    assert answers == [f"later:req-{i}".encode() for i in range(64)]
    served.barrier()
    # Every call went through the hook exactly once (batches are timing-dependent; their sum not).
    assert sum(service.later_batches) == 64
    assert service.later == []


def test_fast_method_answered_from_idle_hook_by_64_threads(channel: grpc.Channel) -> None:
    later = unary(channel, "/test.Fast/Later")
    answers: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        try:
            answers[i] = later(f"t{i}".encode() * (i + 1), timeout=BOUND_S)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND_S)
    assert errors == []
    assert answers == {i: b"later:" + f"t{i}".encode() * (i + 1) for i in range(64)}


def test_fast_handler_that_raises_is_internal_and_server_keeps_serving(
    channel: grpc.Channel,
) -> None:
    for _ in range(3):
        err = rpc_error(lambda: unary(channel, "/test.Fast/Raise")(b"x", timeout=5))
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "fast handler bug" not in (err.details() or "")  # no internals leak
    assert_serves(channel)


def test_fast_call_sees_the_deadline(channel: grpc.Channel) -> None:
    deadline = unary(channel, "/test.Fast/Deadline")
    assert deadline(b"", timeout=None) == b"None"
    remaining = float(deadline(b"", timeout=5))
    assert 0 < remaining <= 5 + CLOCK_SLACK_S


def test_fast_method_wins_over_a_registered_handler_for_the_same_path(
    core: Callable[[Callable[[CoreServer], None]], Harness],
) -> None:
    async def slow_lane(request: bytes, context: Context) -> bytes:
        return b"asyncio:" + request

    def fast_lane(call: FastCall, raw: bytes) -> None:
        call.reply(b"fast:" + raw)

    def configure(server: CoreServer) -> None:
        handler = grpc.unary_unary_rpc_method_handler(slow_lane)
        server.add_fast_method("/test.A/M", fast_lane)  # fast first, registered second
        server.add_registered_method_handlers("test.A", {"M": handler})
        server.add_registered_method_handlers("test.B", {"M": handler})  # registered first
        server.add_fast_method("/test.B/M", fast_lane)
        server.add_registered_method_handlers("test.C", {"M": handler})  # registered only

    harness = core(configure)
    with grpc.insecure_channel(harness.target) as ch:
        assert unary(ch, "/test.A/M")(b"a", timeout=5) == b"fast:a"
        assert unary(ch, "/test.B/M")(b"b", timeout=5) == b"fast:b"
        assert unary(ch, "/test.C/M")(b"c", timeout=5) == b"asyncio:c"


# --- the asyncio lane: unary


def test_unary_returns_the_value(channel: grpc.Channel) -> None:
    response, call = unary(channel, f"/{SVC}/Echo").with_call(b"\x00hello\xff", timeout=5)
    assert response == b"\x00hello\xff"
    assert call.code() == grpc.StatusCode.OK


def test_unary_many_concurrent_calls_each_get_their_own_answer(channel: grpc.Channel) -> None:
    echo = unary(channel, f"/{SVC}/Echo")
    futures = [echo.future(f"e{i}".encode(), timeout=BOUND_S) for i in range(64)]
    assert [f.result() for f in futures] == [f"e{i}".encode() for i in range(64)]


def test_abort_sends_its_code_and_details(channel: grpc.Channel) -> None:
    err = rpc_error(lambda: unary(channel, f"/{SVC}/Abort")(b"r1", timeout=5))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "refused r1"


def test_handler_exception_is_unknown_and_server_keeps_serving(channel: grpc.Channel) -> None:
    for _ in range(3):
        err = rpc_error(lambda: unary(channel, f"/{SVC}/Raise")(b"x", timeout=5))
        assert err.code() == grpc.StatusCode.UNKNOWN
    assert_serves(channel)


def test_set_code_and_details_without_raising(channel: grpc.Channel) -> None:
    err = rpc_error(lambda: unary(channel, f"/{SVC}/SetCode")(b"m9", timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "no model m9"


def test_invocation_metadata_reaches_the_handler(channel: grpc.Channel) -> None:
    metadata_of = unary(channel, f"/{SVC}/Metadata")
    metadata = (("x-test", "v1"), ("x-raw-bin", b"\x00\x01\xff"))
    assert metadata_of(b"x-test", metadata=metadata, timeout=5) == b"v1"
    assert metadata_of(b"x-raw-bin", metadata=metadata, timeout=5) == b"\x00\x01\xff"
    assert metadata_of(b"x-absent", metadata=metadata, timeout=5) == b"<missing>"


def test_peer_is_the_loopback_client(channel: grpc.Channel) -> None:
    assert b"127.0.0.1" in unary(channel, f"/{SVC}/Peer")(b"", timeout=5)


def test_time_remaining_is_none_without_deadline_and_bounded_with_one(
    channel: grpc.Channel,
) -> None:
    time_remaining = unary(channel, f"/{SVC}/TimeRemaining")
    assert time_remaining(b"", timeout=None) == b"None"
    remaining = float(time_remaining(b"", timeout=5))
    assert 0 < remaining <= 5 + CLOCK_SLACK_S


def test_initial_and_trailing_metadata_reach_the_client(channel: grpc.Channel) -> None:
    response, call = unary(channel, f"/{SVC}/Trailing").with_call(b"z", timeout=5)
    assert response == b"ok"
    assert ("x-initial", "i-z") in tuple(call.initial_metadata())
    assert ("x-trailer", "t-z") in tuple(call.trailing_metadata())


def test_unknown_method_and_service_are_unimplemented(channel: grpc.Channel) -> None:
    for path in (f"/{SVC}/NoSuchMethod", "/no.such.Service/Echo"):
        err = rpc_error(lambda path=path: unary(channel, path)(b"", timeout=5))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED, path
    assert_serves(channel)


def test_response_that_cannot_be_serialized_is_unknown_not_a_hang(channel: grpc.Channel) -> None:
    """grpc.aio answers UNKNOWN when the response serializer raises; the client must not be
    left waiting for a status that never comes."""
    err = rpc_error(lambda: unary(channel, f"/{SVC}/Unserializable")(b"r", timeout=3))
    assert err.code() == grpc.StatusCode.UNKNOWN, err.details()
    assert_serves(channel)


# --- the asyncio lane: streams


def test_unary_stream_from_an_async_generator(channel: grpc.Channel) -> None:
    stream = channel.unary_stream(f"/{SVC}/Yield")
    assert list(stream(b"5", timeout=5)) == [b"y0", b"y1", b"y2", b"y3", b"y4"]
    assert list(stream(b"0", timeout=5)) == []


def test_unary_stream_through_context_write(channel: grpc.Channel) -> None:
    stream = channel.unary_stream(f"/{SVC}/Write")
    assert list(stream(b"4", timeout=5)) == [b"w0", b"w1", b"w2", b"w3"]
    assert list(stream(b"0", timeout=5)) == []


def test_stream_unary_sums_request_sizes(channel: grpc.Channel) -> None:
    total = channel.stream_unary(f"/{SVC}/Sum")
    requests = [b"a" * n for n in range(1, 21)]
    assert total(iter(requests), timeout=5) == str(sum(range(1, 21))).encode()
    assert total(iter([]), timeout=5) == b"0"


def test_stream_unary_with_an_unparsable_message_is_invalid_argument(
    channel: grpc.Channel,
) -> None:
    total = channel.stream_unary(f"/{SVC}/SumInts")
    assert total(iter([b"1", b"2", b"39"]), timeout=5) == b"42"
    err = rpc_error(lambda: total(iter([b"1", b"two", b"3"]), timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_stream_echoes_in_order(channel: grpc.Channel) -> None:
    echo = channel.stream_stream(f"/{SVC}/EchoStream")
    requests = [f"m{i}".encode() for i in range(200)]
    assert list(echo(iter(requests), timeout=BOUND_S)) == [b"echo:" + r for r in requests]


# --- cancellation, deadlines, stop


def test_client_cancel_cancels_the_handler_and_server_keeps_serving(
    channel: grpc.Channel, service: Service
) -> None:
    call = unary(channel, f"/{SVC}/Wait").future(b"", timeout=BOUND_S)
    assert service.wait_started.wait(BOUND_S)
    assert call.cancel()
    assert service.wait_unwound.wait(BOUND_S), "the handler's task was not cancelled"
    assert service.done_callback_ran.wait(BOUND_S)
    assert service.cancelled_seen == [True]
    assert call.cancelled()
    assert_serves(channel)


def test_deadline_exceeded_cancels_the_handler_and_server_keeps_serving(
    channel: grpc.Channel, service: Service
) -> None:
    err = rpc_error(lambda: unary(channel, f"/{SVC}/Wait")(b"", timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert service.wait_unwound.wait(BOUND_S), "the handler's task was not cancelled"
    assert_serves(channel)


def test_stop_with_grace_lets_the_call_in_flight_finish_and_refuses_new_ones(
    channel: grpc.Channel, service: Service, served: Harness
) -> None:
    in_flight = unary(channel, f"/{SVC}/Gate").future(b"g1", timeout=BOUND_S)
    assert service.wait_started.wait(BOUND_S)
    stopping = served.stop(grace=BOUND_S)
    served.barrier()  # stop() has begun: the server is shutting down
    assert not stopping.done()
    with grpc.insecure_channel(served.target) as fresh:
        err = rpc_error(lambda: unary(fresh, f"/{SVC}/Echo")(b"new", timeout=3))
        assert err.code() != grpc.StatusCode.OK
        err = rpc_error(lambda: unary(fresh, "/test.Fast/Now")(b"new", timeout=3))
        assert err.code() != grpc.StatusCode.OK
    served.loop.call_soon_threadsafe(service.gate.set)
    assert in_flight.result(BOUND_S) == b"through:g1"
    stopping.result(BOUND_S)
    assert served.call(served.server.wait_for_termination(timeout=1)) is True


def test_stop_with_short_grace_cancels_the_call_in_flight_and_returns(
    channel: grpc.Channel, service: Service, served: Harness
) -> None:
    in_flight = unary(channel, f"/{SVC}/Wait").future(b"", timeout=BOUND_S)
    assert service.wait_started.wait(BOUND_S)
    served.stop(grace=0.2).result(BOUND_S)
    err = rpc_error(lambda: in_flight.result(BOUND_S))
    assert err.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), err
    assert service.wait_unwound.wait(BOUND_S), "the handler's task was not cancelled"


STOP_WITHOUT_GRACE_SCRIPT = """
import asyncio, sys
import grpc
from service.frontends.core import CoreServer

async def main(rounds):
    loop = asyncio.get_running_loop()
    for _ in range(rounds):
        server = CoreServer()
        server.add_fast_method("/t.S/M", lambda call, raw: call.reply(raw))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        def client():
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                assert ch.unary_unary("/t.S/M")(b"x", timeout=5) == b"x"

        await loop.run_in_executor(None, client)
        await server.stop(None if _ % 2 else 0)
    print("stopped", rounds)

asyncio.run(main(int(sys.argv[1])))
"""


def test_stop_without_grace_after_a_call_never_crashes_the_process() -> None:
    """stop(0) / stop(None), the usual grpc.aio shutdown, run many times in a child process
    (a crash there is a failed test, not a dead test run)."""
    rounds = 300
    result = subprocess.run(
        [sys.executable, "-c", STOP_WITHOUT_GRACE_SCRIPT, str(rounds)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["stopped", str(rounds)]


# --- health, reflection, bad requests on a CoreServer


@pytest.fixture
def health_server(
    core: Callable[[Callable[[CoreServer], None]], Harness],
) -> tuple[Harness, Any]:
    servicer = health.aio.HealthServicer()

    def configure(server: CoreServer) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(
            ["grpc.health.v1.Health", reflection.SERVICE_NAME], server)

    harness = core(configure)
    harness.call(servicer.set("svc", health_pb2.HealthCheckResponse.NOT_SERVING))
    return harness, servicer


def test_health_check_follows_set(health_server: tuple[Harness, Any]) -> None:
    harness, servicer = health_server
    with grpc.insecure_channel(harness.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        request = health_pb2.HealthCheckRequest(service="svc")
        assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
        harness.call(servicer.set("svc", health_pb2.HealthCheckResponse.SERVING))
        assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        err = rpc_error(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"),
                                           timeout=5))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_a_change(health_server: tuple[Harness, Any]) -> None:
    harness, servicer = health_server
    with grpc.insecure_channel(harness.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="svc"), timeout=BOUND_S)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        harness.call(servicer.set("svc", health_pb2.HealthCheckResponse.SERVING))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_reflection_lists_the_services(health_server: tuple[Harness, Any]) -> None:
    harness, _ = health_server
    with grpc.insecure_channel(harness.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert len(responses) == 1
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {"grpc.health.v1.Health", reflection.SERVICE_NAME}


def test_unparsable_request_is_invalid_argument(health_server: tuple[Harness, Any]) -> None:
    harness, _ = health_server
    with grpc.insecure_channel(harness.target) as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        err = rpc_error(lambda: check(b"\xff\xff", timeout=5))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        stub = health_pb2_grpc.HealthStub(ch)
        status = stub.Check(health_pb2.HealthCheckRequest(service="svc"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
