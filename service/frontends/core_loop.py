"""The asyncio side of service/frontends/core.py: one call served as grpc.aio would serve it.

CoreServer's polling thread hands every call that is not a fast method to the event loop;
`serve(rpc)` runs its grpc.aio-style handler there (unary or streaming, async or plain) with a
`Context` that implements the part of `grpc.aio.ServicerContext` our servicers, health and
reflection use, and sends the status. Each batch of operations on the call is started through
`start_batch`, whose completion the polling thread resolves on the loop; a client that cancels
cancels the handler's task.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc._cython import cygrpc

log = logging.getLogger(__name__)

NO_FLAGS = 0  # no write flags on an operation
# start_batch(call, ops, future): start `ops` on `call`; their event completes `future`.
StartBatch = Callable[[Any, Sequence[Any], "asyncio.Future[Any]"], None]


def status_int(code: grpc.StatusCode) -> int:
    return int(code.value[0])


class _Abort(Exception):
    """Raised by Context.abort; the status it set goes out when the handler unwinds."""


class Context:
    """The part of grpc.aio.ServicerContext our servicers, health and reflection use."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._code: grpc.StatusCode = grpc.StatusCode.OK
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] | None = None
        self._callbacks: list[Callable[[Context], None]] = []

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Sequence[tuple[str, str | bytes]] = ()) -> None:
        if code == grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN  # as grpc.aio: abort means failure
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise _Abort(details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...] | None:
        return self._trailing

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._rpc.metadata

    def time_remaining(self) -> float | None:
        deadline = self._rpc.deadline
        return None if deadline is None else max(0.0, deadline - time.time())

    def peer(self) -> str:
        peer = self._rpc.call.peer()
        return peer.decode() if isinstance(peer, bytes) else str(peer)

    def cancelled(self) -> bool:
        return self._rpc.client_cancelled

    def done(self) -> bool:
        return self._rpc.finished

    def add_done_callback(self, callback: Callable[[Context], None]) -> None:
        self._callbacks.append(callback)

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, Any]]) -> None:
        await self._rpc.send_initial_metadata(tuple(initial_metadata))

    async def write(self, message: Any) -> None:
        await self._rpc.send(message)

    async def read(self) -> Any:
        return await self._rpc.read()

    def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("done callback failed")


class Rpc:
    """One call served on the asyncio loop: its batches, its sends and its final status."""

    def __init__(self, start_batch: StartBatch, call: Any, handler: grpc.RpcMethodHandler,
                 deadline: float | None, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self._start_batch = start_batch
        self.call = call
        self.metadata = metadata
        self.deadline = deadline
        self.handler = handler
        self.initial_sent = False
        self.finished = False
        self.client_cancelled = False
        self.reads_done = False

    async def batch(self, ops: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._start_batch(self.call, ops, future)
        return await future

    def _initial(self, metadata: tuple[tuple[str, Any], ...] | None = None) -> list[Any]:
        if self.initial_sent:
            return []
        self.initial_sent = True
        return [cygrpc.SendInitialMetadataOperation(metadata, NO_FLAGS)]

    async def send_initial_metadata(self, metadata: tuple[tuple[str, Any], ...]) -> None:
        if self.initial_sent:
            raise RuntimeError("initial metadata was already sent")
        await self.batch(self._initial(metadata))

    async def read(self) -> Any:
        """The next request message (deserialized), or grpc.aio.EOF at the end of the stream."""
        if self.reads_done:
            return grpc.aio.EOF
        event = await self.batch((cygrpc.ReceiveMessageOperation(NO_FLAGS),))
        raw = event.batch_operations[0].message() if event.success else None
        if raw is None:
            self.reads_done = True
            return grpc.aio.EOF
        return _deserialize(self.handler.request_deserializer, raw)

    async def requests(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message

    async def send(self, message: Any) -> None:
        if self.finished:
            raise RuntimeError("the RPC has already finished")
        raw = _serialize(self.handler.response_serializer, message)
        event = await self.batch([*self._initial(), cygrpc.SendMessageOperation(raw, NO_FLAGS)])
        if not event.success:
            raise asyncio.CancelledError("the client went away")

    async def finish(self, code: grpc.StatusCode, details: str, message: Any = None,
                     trailing: tuple[tuple[str, Any], ...] | None = None) -> None:
        if self.finished:
            return
        # Serialize first: if that fails, the caller's error path still sends a status.
        raw = None if message is None else _serialize(self.handler.response_serializer, message)
        self.finished = True
        ops = self._initial()
        if raw is not None:
            ops.append(cygrpc.SendMessageOperation(raw, NO_FLAGS))
        ops.append(cygrpc.SendStatusFromServerOperation(
            trailing, status_int(code), details.encode("utf-8", "replace"), NO_FLAGS))
        await self.batch(ops)


def _deserialize(deserializer: Callable[[bytes], Any] | None, raw: bytes) -> Any:
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception as e:
        raise _BadRequest(f"request could not be parsed: {e}") from None


def _serialize(serializer: Callable[[Any], bytes] | None, message: Any) -> bytes:
    return message if serializer is None else serializer(message)


class _BadRequest(Exception):
    pass


async def serve(rpc: Rpc) -> None:
    """Run `rpc`'s handler to its end and send its status; cancelled if the client goes."""
    task = asyncio.current_task()
    assert task is not None
    closed = asyncio.ensure_future(
        rpc.batch((cygrpc.ReceiveCloseOnServerOperation(NO_FLAGS),)))

    def on_close(done: asyncio.Future[Any]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        if done.result().batch_operations[0].cancelled():
            rpc.client_cancelled = True
            if not rpc.finished:
                task.cancel()

    closed.add_done_callback(on_close)
    context = Context(rpc)
    try:
        reply = await _run_handler(rpc, context)
        await rpc.finish(context.code(), context.details(), reply, context.trailing_metadata())
    except _Abort:
        await rpc.finish(context.code(), context.details(), None, context.trailing_metadata())
    except _BadRequest as e:
        await rpc.finish(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except asyncio.CancelledError:
        if not rpc.client_cancelled:
            with contextlib.suppress(Exception):
                await rpc.finish(grpc.StatusCode.CANCELLED, "the server cancelled the call")
    except Exception as e:
        log.exception("handler failed")
        await rpc.finish(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e).__name__}: {e}")
    finally:
        context._run_callbacks()

async def _run_handler(rpc: Rpc, context: Context) -> Any:
    """The handler's single reply (None for a response stream, already sent)."""
    handler = rpc.handler
    if handler.request_streaming:
        request: Any = rpc.requests()
    else:
        request = await rpc.read()
        if request is grpc.aio.EOF:
            raise _NO_MESSAGE
    if not handler.response_streaming:
        behavior = handler.stream_unary if handler.request_streaming else handler.unary_unary
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result
    behavior = handler.stream_stream if handler.request_streaming else handler.unary_stream
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for message in result:
            await rpc.send(message)
    elif inspect.isawaitable(result):
        await result
    elif result is not None:  # a plain iterator
        for message in result:
            await rpc.send(message)
    return None



_NO_MESSAGE = _BadRequest("expected exactly one request message, got none")
