"""gRPC on gRPC core's completion queue: one thread answers the hot RPCs, asyncio the rest.

Why this exists (docs/serving.md, "The core front end"): on this class of machine the Python
gRPC layer, not the model, bounds throughput. Per call, grpc.aio spends ~180 us of server CPU
(two tasks, four completions handed from its poller thread to the event loop through a
socket), the threaded `grpc.server` ~110 us (a thread hand-off or two per call). A loop that
polls gRPC core's completion queue itself and answers in the same thread costs ~40 us a call,
measured with the same load generator. So:

* **Fast methods** (`add_fast_method`: the data plane's fast lanes, Classify and ModelInfer,
  plugged in by service/frontends/grpc_frontend.py) are handled entirely on the polling thread:
  the request bytes go to a handler that either answers at once (a bad request) or queues the
  work; after each turn of completions (all that are waiting, but at most
  `completions_per_turn`) the idle hooks run (the batcher computes one due batch, one forward
  pass per version) and the replies go out. Requests that arrive together are answered
  together, a lone request is computed at once, and a flood of arrivals cannot starve compute
  (nor compute the arrivals). A fast method may have a gate that runs before the call's
  message is read: it lets the call in, refuses it at the door, or parks it unread (it costs
  gRPC core ~8 KiB and no CPU) and is asked again each turn, oldest first, how long it has
  waited (the batcher sheds load that way: docs/serving.md, "Overload").
* **Everything else** (health, reflection, streaming, admin, the v2 API) runs unchanged as
  grpc.aio-style handlers on the asyncio loop: the polling thread hands each new call to the
  loop, and each completion back, with `call_soon_threadsafe`; service/frontends/core_loop.py runs
  them there, with a `Context` that implements the part of `grpc.aio.ServicerContext` they use.

`CoreServer` is a `grpc.aio.Server`, so `add_*_to_server`, health and reflection register on it
as on any server. It uses `grpc._cython.cygrpc`, the layer grpcio's own two servers are built
on; it is private API, so tests/test_transport.py exercises every path, `unavailable_reason()`
makes the server fall back to grpc.aio on a grpcio that lacks what this module uses, and
`--frontend aio` serves through plain grpc.aio on request (service/server.py). This module
knows nothing of the APIs: it carries bytes to the handlers it is given.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import grpc
from grpc._cython import cygrpc

from service.frontends.core_loop import NO_FLAGS, Context, Rpc, serve, status_int

log = logging.getLogger(__name__)

# Completions requested ahead for each fast method: calls that arrive in one burst are
# matched without a round trip through the polling loop each.
_FAST_REQUESTS_AHEAD = 8
# call_details.deadline for a call without a deadline is gpr's "infinite future".
_NO_DEADLINE_AFTER_S = 10 * 365 * 24 * 3600.0
# A deadline passed to CompletionQueue.poll: block, waking now and then for the stop check.
_POLL_PERIOD_S = 1.0
# Completions handled in one turn of the polling loop before the idle hooks run (each computes
# at most one due batch a turn): a steady stream of arrivals and refusals can then no longer
# starve compute, nor compute starve arrivals. 64 covers a whole burst of 64 one-image callers
# (a new call, its message and its reply are ~3 completions, so ~21 requests a turn).
DEFAULT_COMPLETIONS_PER_TURN = 64
# An idle hook that keeps raising is logged at most this often.
_HOOK_LOG_PERIOD_S = 10.0
# While calls are parked at a gate, the polling loop turns at least this often to ask again.
_PARKED_TICK_S = 0.001
# Parked calls let in whose messages are still being read: at most this many at a time, so
# the calls let in when the door opens are about as many as the room that opened (the gate
# sees the room only once their messages are read and admitted).
_PARKED_READS = 2

FastHandler = Callable[["FastCall", bytes], None]
# Runs before a fast call's message is read, with the seconds the call has waited at the door
# so far: True to read it and call the handler, False when it has answered the call itself
# (refused at the door: the message is never read), None to park it unread and ask again next
# turn (calls parked are asked oldest first; one asked with `math.inf` must not answer None:
# the server is stopping).
FastGate = Callable[["FastCall", float], "bool | None"]


# What CoreServer uses of grpcio's private layer; checked once so that a grpcio that changed
# it makes the server fall back to grpc.aio (server.py) instead of failing mid-request.
_NEEDED = {
    "Server": ("add_http2_port", "cancel_all_calls", "destroy", "register_completion_queue",
               "register_method", "request_call", "request_registered_call", "shutdown",
               "start"),
    "CompletionQueue": ("poll",),
    "Call": ("cancel", "peer", "start_server_batch"),
    "CompletionType": ("queue_timeout",),
    "ReceiveMessageOperation": ("message",),
    "ReceiveCloseOnServerOperation": ("cancelled",),
    "SendInitialMetadataOperation": (),
    "SendMessageOperation": (),
    "SendStatusFromServerOperation": (),
}


def unavailable_reason() -> str | None:
    """Why CoreServer cannot run on the installed grpcio, or None when it can."""
    for name, attributes in _NEEDED.items():
        owner = getattr(cygrpc, name, None)
        if owner is None:
            return f"grpcio {grpc.__version__} has no cygrpc.{name}"
        for attribute in attributes:
            if not hasattr(owner, attribute):
                return f"grpcio {grpc.__version__} has no cygrpc.{name}.{attribute}"
    return None


class _Stage(enum.Enum):
    NEW = 0
    SERVING = 1
    STOPPING = 2
    STOPPED = 3


class _HandlerCallDetails(NamedTuple):
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


def _deadline(details: Any) -> float | None:
    """The call's deadline as time.time(), or None when the client set none."""
    deadline = float(details.deadline)
    return None if deadline - time.time() > _NO_DEADLINE_AFTER_S else deadline


class FastCall:
    """One fast-method call, answered exactly once by `reply` or `fail` from any thread."""

    __slots__ = ("_answered", "_call", "_server", "deadline")

    def __init__(self, server: CoreServer, call: Any, deadline: float | None) -> None:
        self._server = server
        self._call = call
        self.deadline = deadline
        self._answered = False

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.time())

    def reply(self, message: bytes) -> None:
        self._finish(status_int(grpc.StatusCode.OK), b"", message)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self._finish(status_int(code), details.encode("utf-8", "replace"), None)

    def _finish(self, code: int, details: bytes, message: bytes | None) -> None:
        if self._answered:
            return
        self._answered = True
        ops: list[Any] = [cygrpc.SendInitialMetadataOperation(None, NO_FLAGS)]
        if message is not None:
            ops.append(cygrpc.SendMessageOperation(message, NO_FLAGS))
        ops.append(cygrpc.SendStatusFromServerOperation(None, code, details, NO_FLAGS))
        # Receiving the close in the same batch frees the call in one completion.
        ops.append(cygrpc.ReceiveCloseOnServerOperation(NO_FLAGS))
        self._server._start_batch(self._call, ops, _FAST_DONE)


class _Tag:
    """What a completion means; `complete` runs on the polling thread."""

    __slots__ = ()

    def complete(self, server: CoreServer, event: Any) -> None:
        raise NotImplementedError


class _FastDone(_Tag):
    __slots__ = ()

    def complete(self, server: CoreServer, event: Any) -> None:
        pass  # the reply is out (or the client is gone); nothing holds the call any more


_FAST_DONE = _FastDone()


class _NewFastCall(_Tag):
    __slots__ = ("gate", "handler", "method")

    def __init__(self, method: str, handler: FastHandler, gate: FastGate | None) -> None:
        self.method = method
        self.handler = handler
        self.gate = gate

    def complete(self, server: CoreServer, event: Any) -> None:
        if server._stage is _Stage.SERVING:
            server._request_registered(self.method, self)
        if not event.success:
            return
        call = FastCall(server, event.call, _deadline(event.call_details))
        if self.gate is not None:
            if server._parked:  # first come, first served: behind those already waiting
                server._parked.append((self, call, time.monotonic()))
                return
            let_in = self.ask(call, 0.0)
            if let_in is None:
                server._parked.append((self, call, time.monotonic()))
                return
            if not let_in:
                return  # answered at the door; the message is never read
        self.read(server, call, False)

    def ask(self, call: FastCall, waited_s: float) -> bool | None:
        assert self.gate is not None
        try:
            return self.gate(call, waited_s)
        except Exception:
            log.exception("fast gate failed")
            call.fail(grpc.StatusCode.INTERNAL, "internal error")
            return False

    def read(self, server: CoreServer, call: FastCall, parked: bool) -> None:
        if parked:
            server._parked_reading += 1
        server._start_batch(call._call, (cygrpc.ReceiveMessageOperation(NO_FLAGS),),
                            _FastReceived(self.handler, call, parked))


class _FastReceived(_Tag):
    __slots__ = ("call", "handler", "parked")

    def __init__(self, handler: FastHandler, call: FastCall, parked: bool) -> None:
        self.handler = handler
        self.call = call
        self.parked = parked

    def complete(self, server: CoreServer, event: Any) -> None:
        if self.parked:
            server._parked_reading -= 1
        message = event.batch_operations[0].message() if event.success else None
        if message is None:
            self.call.fail(grpc.StatusCode.UNIMPLEMENTED,
                           "expected exactly one request message, got none")
            return
        try:
            self.handler(self.call, message)
        except Exception:  # a handler bug must not stop the polling thread
            log.exception("fast handler failed")
            self.call.fail(grpc.StatusCode.INTERNAL, "internal error")


class _NewCall(_Tag):
    """A call for a method served on the asyncio loop (registered name, or '' for generic)."""

    __slots__ = ("method",)

    def __init__(self, method: str) -> None:
        self.method = method

    def complete(self, server: CoreServer, event: Any) -> None:
        if server._stage is _Stage.SERVING:
            if self.method:
                server._request_registered(self.method, self)
            else:
                server._request_generic()
        if not event.success:
            return
        server._dispatch(event, self.method)


class _LoopTag(_Tag):
    """Completes an asyncio future on the loop with the event."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> None:
        self.loop = loop
        self.future = future

    def complete(self, server: CoreServer, event: Any) -> None:
        self.loop.call_soon_threadsafe(_resolve, self.future, event)


def _resolve(future: asyncio.Future[Any], event: Any) -> None:
    if not future.done():
        future.set_result(event)


class _Shutdown(_Tag):
    __slots__ = ()

    def complete(self, server: CoreServer, event: Any) -> None:
        server._shutdown_done = True


class CoreServer(grpc.aio.Server):  # type: ignore[misc]  # grpc ships no stubs
    """A grpc.aio.Server on gRPC core's completion queue; see the module docstring."""

    def __init__(self, options: Iterable[tuple[str, Any]] = (), *,
                 completions_per_turn: int = DEFAULT_COMPLETIONS_PER_TURN) -> None:
        self._completions_per_turn = completions_per_turn
        self._cq = cygrpc.CompletionQueue()
        self._server = cygrpc.Server(tuple(options), False)
        self._server.register_completion_queue(self._cq)
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: dict[str, grpc.RpcMethodHandler] = {}
        self._fast: dict[str, tuple[FastHandler, FastGate | None]] = {}
        self._idle_hooks: list[Callable[[], float | None]] = []
        # Fast calls a gate parked unread, oldest first: (their tag, the call, when parked).
        self._parked: collections.deque[tuple[_NewFastCall, FastCall, float]] = (
            collections.deque())
        self._parked_reading = 0  # parked calls let in whose message is not read yet
        self._hook_logged: dict[int, float] = {}  # hook index -> when it last logged a failure
        self._stage = _Stage.NEW
        self._lock = threading.Lock()
        self._due = 0  # batches and call requests started and not yet completed
        self._shutdown_done = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._rpcs: set[asyncio.Task[None]] = set()

    # --- registration (before start)

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]
    ) -> None:
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._check_new()
        for name, handler in method_handlers.items():
            path = f"/{service_name}/{name}"
            if path in self._fast or path in self._registered:
                continue  # a fast method wins; the generic handler stays as fallback
            self._server.register_method(path)
            self._registered[path] = handler

    def add_fast_method(self, path: str, handler: FastHandler,
                        gate: FastGate | None = None) -> None:
        """Serve unary `path` on the polling thread: `handler(call, request_bytes)` must not
        block; it answers through `call.reply`/`call.fail`, now or from an idle hook.
        `gate(call, waited_s)`, if given, runs when the call arrives, before its message is
        read: it may refuse the call (answer it and return False) so a refused message costs
        no read, or park it (None) to be asked again each turn (see FastGate)."""
        self._check_new()
        if path in self._registered:
            del self._registered[path]
        else:
            self._server.register_method(path)
        self._fast[path] = (handler, gate)

    def add_idle_hook(self, hook: Callable[[], float | None]) -> None:
        """Run `hook()` on the polling thread after each turn of completions (at most
        `completions_per_turn`, fewer when no more are waiting): it computes what the fast
        handlers queued, a bounded amount a turn. It returns when (time.monotonic()) it wants
        to run again even if nothing arrives (now: at once), or None. It should not raise: one
        that does is logged and the thread goes on (what it was computing is its to fail)."""
        self._idle_hooks.append(hook)

    def add_insecure_port(self, address: str) -> int:
        self._check_new()
        return int(self._server.add_http2_port(address.encode()))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        self._check_new()
        return int(self._server.add_http2_port(address.encode(),
                                               server_credentials._credentials))

    def _check_new(self) -> None:
        if self._stage is not _Stage.NEW:
            raise RuntimeError("register handlers and ports before start()")

    # --- lifecycle

    async def start(self) -> None:
        self._check_new()
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._server.start()
        self._stage = _Stage.SERVING
        for path, (handler, gate) in self._fast.items():
            tag = _NewFastCall(path, handler, gate)
            for _ in range(_FAST_REQUESTS_AHEAD):
                self._request_registered(path, tag)
        for path in self._registered:
            self._request_registered(path, _NewCall(path))
        self._request_generic()
        self._thread = threading.Thread(target=self._poll, name="grpc-core", daemon=True)
        self._thread.start()

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls, let calls in flight finish for `grace` seconds, then cancel them."""
        if self._stage is _Stage.NEW:
            self._stage = _Stage.STOPPED
            self._server.destroy()
            return
        assert self._stopped is not None
        with self._lock:
            if self._stage is _Stage.SERVING:
                self._stage = _Stage.STOPPING
                self._due += 1
                self._server.shutdown(self._cq, _Shutdown())
        if grace is None or grace <= 0:
            self._cancel_all_calls()
        else:
            try:
                await asyncio.wait_for(self._stopped.wait(), grace)
            except TimeoutError:
                self._cancel_all_calls()
        await self._stopped.wait()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        # gRPC core is gone: a handler still running on the loop (one that ignored its
        # cancellation) can no longer be answered; end it rather than leave it pending.
        running = [task for task in self._rpcs if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=_POLL_PERIOD_S)

    def _cancel_all_calls(self) -> None:
        # Under the lock: the polling thread destroys the server under it once it is done,
        # and cancelling calls on a destroyed server is a use-after-free in gRPC core.
        with self._lock:
            if self._stage is not _Stage.STOPPED:
                self._server.cancel_all_calls()

    async def wait_for_termination(
        self, timeout: float | None = None  # noqa: ASYNC109 (grpc.aio.Server's signature)
    ) -> bool:
        if self._stopped is None:
            return True
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- the polling thread

    def _start_batch(self, call: Any, ops: Sequence[Any], tag: _Tag) -> None:
        with self._lock:
            started = self._stage is not _Stage.STOPPED  # else the server is destroyed
            if started:
                self._due += 1  # the polling thread will not destroy it while this is due
        if started and call.start_server_batch(ops, tag):
            with self._lock:  # not started (the call is already over): no completion comes
                self._due -= 1
            started = False
        if not started and isinstance(tag, _LoopTag):
            tag.loop.call_soon_threadsafe(_fail_future, tag.future)

    def _request_registered(self, path: str, tag: _Tag) -> None:
        with self._lock:
            self._due += 1
        self._server.request_registered_call(self._cq, self._cq, path, tag)

    def _request_generic(self) -> None:
        with self._lock:
            self._due += 1
        self._server.request_call(self._cq, self._cq, _GENERIC)

    def _poll(self) -> None:
        """Turns of: up to `completions_per_turn` completions, then the idle hooks; until the
        server is shut down. However it ends, `wait_for_termination()` returns after it."""
        try:
            self._turns()
        except BaseException:
            log.exception("gRPC polling thread failed")
        finally:
            try:
                with self._lock:
                    self._stage = _Stage.STOPPED
                    self._server.destroy()
            except BaseException:
                log.exception("gRPC server destroy failed")
            finally:
                self._signal_stopped()

    def _turns(self) -> None:
        cq = self._cq
        timeout = cygrpc.CompletionType.queue_timeout
        per_turn = self._completions_per_turn
        due: float | None = None  # when (monotonic) an idle hook wants to run again
        while True:
            wait_s = _POLL_PERIOD_S if due is None else max(0.0, due - time.monotonic())
            event = cq.poll(time.time() + wait_s)
            handled = 0
            while event.completion_type != timeout:
                self._complete(event)
                handled += 1
                if handled >= per_turn:
                    break  # the rest wait for the next turn, after the idle hooks
                event = cq.poll(0)
            event = None  # drop the last call reference before running the hooks
            due = self._run_idle_hooks()
            if self._parked:
                self._ask_parked()
                if self._parked:
                    tick = time.monotonic() + _PARKED_TICK_S
                    due = tick if due is None else min(due, tick)
            if self._finished():
                break

    def _signal_stopped(self) -> None:
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)

    def _run_idle_hooks(self) -> float | None:
        due: float | None = None
        for i, hook in enumerate(self._idle_hooks):
            try:
                wanted = hook()
            except Exception:
                # A bug in one hook must not end the thread that serves every fast call;
                # run it again next turn, logging a hook that keeps failing now and then.
                now = time.monotonic()
                if now - self._hook_logged.get(i, -_HOOK_LOG_PERIOD_S) >= _HOOK_LOG_PERIOD_S:
                    self._hook_logged[i] = now
                    log.exception("idle hook %r failed", hook)
                wanted = now + 0.001  # retry soon, but do not spin on a broken hook
            if wanted is not None and (due is None or wanted < due):
                due = wanted
        return due

    def _ask_parked(self) -> None:
        """Ask the gates again about parked calls, oldest first, until one says wait (those
        behind it have waited less) or one let in finds _PARKED_READS being read."""
        parked = self._parked
        stopping = self._stage is not _Stage.SERVING
        now = time.monotonic()
        while parked:
            tag, call, since = parked[0]
            let_in = tag.ask(call, math.inf if stopping else now - since)
            if let_in is None:
                return
            if let_in:
                if self._parked_reading >= _PARKED_READS:
                    return  # asked again next tick: it may have waited too long by then
                parked.popleft()
                tag.read(self, call, True)
            else:
                parked.popleft()  # the gate answered it

    def _complete(self, event: Any) -> None:
        with self._lock:
            self._due -= 1
        tag = event.tag
        try:
            tag.complete(self, event)
        except Exception:
            log.exception("completion handling failed (%s)", type(tag).__name__)

    def _finished(self) -> bool:
        """Shut down with nothing due; from now on no batch may start (see _start_batch)."""
        with self._lock:
            if self._shutdown_done and self._due == 0:
                self._stage = _Stage.STOPPED
                return True
            return False

    # --- calls served on the asyncio loop

    def _dispatch(self, event: Any, registered: str) -> None:
        method = registered or _text(event.call_details.method)
        handler = self._registered.get(method) if registered else None
        if handler is None:
            metadata = tuple(event.invocation_metadata or ())
            details = _HandlerCallDetails(method, metadata)
            for generic in self._generic:
                handler = generic.service(details)
                if handler is not None:
                    break
        if handler is None:
            self._start_batch(event.call, (
                cygrpc.SendInitialMetadataOperation(None, NO_FLAGS),
                cygrpc.SendStatusFromServerOperation(
                    None, status_int(grpc.StatusCode.UNIMPLEMENTED),
                    f"method {method} is not implemented".encode(), NO_FLAGS),
                cygrpc.ReceiveCloseOnServerOperation(NO_FLAGS),
            ), _FAST_DONE)
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._start_rpc, event, handler)

    def _start_rpc(self, event: Any, handler: grpc.RpcMethodHandler) -> None:
        rpc = Rpc(self._start_loop_batch, event.call, handler, _deadline(event.call_details),
                  tuple(event.invocation_metadata or ()))
        task = asyncio.get_running_loop().create_task(serve(rpc))
        self._rpcs.add(task)
        task.add_done_callback(self._rpcs.discard)

    def _start_loop_batch(self, call: Any, ops: Sequence[Any],
                          future: asyncio.Future[Any]) -> None:
        """Start `ops` on `call`; the event completes `future` on its loop."""
        self._start_batch(call, ops, _LoopTag(future.get_loop(), future))

_GENERIC = _NewCall("")


def _fail_future(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(asyncio.CancelledError("the call is already over"))


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


__all__ = ["Context", "CoreServer", "FastCall", "FastHandler", "unavailable_reason"]
