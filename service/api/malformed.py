"""Malformed requests to servicers we do not write (health, reflection): INVALID_ARGUMENT.

grpc.aio answers a request its deserializer cannot parse with UNKNOWN, a server-side
failure as far as a caller, a retry policy or an alert can tell; our own servicers parse
raw bytes themselves and say INVALID_ARGUMENT, and so does the core front end's asyncio lane
(service/frontends/core_loop.py). `Registrar` gives third-party servicers the same answer on any
server: registering through it swaps each method's deserializer for one that hands a
`_Malformed` marker to a thin wrapper, which aborts the call with INVALID_ARGUMENT.
Well-formed requests reach the servicer unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc


class _Malformed:
    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # whatever the parser raises, the bytes are the caller's fault
            return _Malformed(e)

    return parse


async def _refuse(context: grpc.aio.ServicerContext, request: _Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"request is not a valid protobuf message: {request.error}")


async def _checked(requests: AsyncIterator[Any],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Malformed):
            await _refuse(context, request)
        yield request


def _single(inner: Callable[..., Any], streams_requests: bool) -> Callable[..., Any]:
    """A handler returning one response (or writing with context.write), wrapped."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if streams_requests:
            request = _checked(request, context)
        elif isinstance(request, _Malformed):
            await _refuse(context, request)
        return await inner(request, context)

    return handle


def _generator(inner: Callable[..., Any], streams_requests: bool) -> Callable[..., Any]:
    """A handler that yields its responses, wrapped."""
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if streams_requests:
            request = _checked(request, context)
        elif isinstance(request, _Malformed):
            await _refuse(context, request)
        async for response in inner(request, context):
            yield response

    return handle


def checked_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler`, answering INVALID_ARGUMENT for a request its deserializer rejects."""
    if handler is None or handler.request_deserializer is None:
        return handler
    parse = _lenient(handler.request_deserializer)
    serialize = handler.response_serializer
    streaming = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): (grpc.unary_unary_rpc_method_handler, handler.unary_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, handler.stream_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
    }
    build, inner = make[streaming]
    wrap = _generator if inspect.isasyncgenfunction(inner) else _single
    return build(wrap(inner, handler.request_streaming), request_deserializer=parse,
                 response_serializer=serialize)


class _CheckedGeneric(grpc.GenericRpcHandler):  # type: ignore[misc]  # no stubs
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return checked_handler(self._inner.service(handler_call_details))


class Registrar:
    """Stands in for a server in `add_*_to_server(servicer, registrar)`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_CheckedGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service_name, {name: checked_handler(h) for name, h in handlers.items()}
        )


def enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """grpc_reflection's `enable_server_reflection` for an asyncio server, through a
    Registrar."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(service_names), Registrar(server)
    )
