"""The mnist.v1.Classifier servicer: hand the bytes to the data plane, map errors to statuses.

Handlers receive raw request bytes; the data plane's pipeline parses them
(service/dataplane/classify.py): a parse failure inside gRPC's own deserializer would surface
as INTERNAL, while a malformed request is the caller's error (INVALID_ARGUMENT). Domain errors
become statuses only through `errors.status_of`. Classify's fast lane (`fast_methods`) is the
same pipeline for a front end with a thread of its own; this module imports no front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from service.batching import Batcher
from service.dataplane import ClassifyPipeline, DataPlane, FastMethod, RequestScope, codec
from service.dataplane.images import ImageDecoder
from service.errors import NotFound, ServiceError, status_of
from service.metrics import Metrics
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.registry import ModelRegistry

log = logging.getLogger(__name__)

SERVICE_NAME = "mnist.v1.Classifier"
CLASSIFY_PATH = f"/{SERVICE_NAME}/Classify"
# Requests of one stream computed concurrently (so a stream's flow is batched too).
STREAM_WINDOW = 64
# A ClassifyStreamResponse whose `response` (field 1, length-delimited) is an encoded
# ClassifyResponse is that response's bytes behind this tag and their length: the stream
# sends what the pipeline encoded without parsing it back.
_RESPONSE_TAG = b"\x0a"


class ClassifierServicer:
    def __init__(
        self, registry: ModelRegistry, batcher: Batcher, metrics: Metrics, *, max_images: int,
        images: ImageDecoder | None = None,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._max_images = max_images
        self._plane = DataPlane(batcher, metrics, images)
        self._classify = ClassifyPipeline(registry, max_images=max_images, images=images)

    def fast_methods(self) -> dict[str, FastMethod]:
        """The RPCs a front end with a thread of its own may answer there (server.py plugs
        them into the completion-queue front end), by method path."""
        return {CLASSIFY_PATH: self._plane.fast_method(self._classify)}

    # --- RPCs

    async def Classify(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await self._plane.call(self._classify, raw, context.time_remaining())
        except Exception as e:
            await context.abort(*status_of(e))
        raise AssertionError("unreachable: abort raises")

    async def ClassifyStream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Read ahead up to STREAM_WINDOW requests, answer strictly in order."""
        window: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for raw in requests:
                    task = asyncio.ensure_future(self._stream_one(raw))
                    await window.put(task)
            finally:
                await window.put(None)

        reader = asyncio.create_task(read(), name="classify-stream-reader")
        try:
            while (task := await window.get()) is not None:
                yield await task
            await reader  # surfaces a transport error from the request side
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if leftover is not None:
                    leftover.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _stream_one(self, raw: bytes) -> bytes:
        try:
            response = await self._plane.call(self._classify, raw, None,
                                              method="ClassifyStream", inflight=False)
            return _RESPONSE_TAG + _varint(len(response)) + response
        except asyncio.CancelledError:
            raise
        except Exception as e:
            code, details = status_of(e)
            request_id = ""
            with contextlib.suppress(Exception):
                request_id = pb.ClassifyRequest.FromString(raw).request_id
            message: bytes = pb.ClassifyStreamResponse(
                error=pb.StreamError(code=code.value[0], message=details, request_id=request_id)
            ).SerializeToString()
            return message

    async def GetModelInfo(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        scope = RequestScope(self._metrics, "GetModelInfo", inflight=False)
        try:
            request = pb.GetModelInfoRequest.FromString(raw)
            name = request.model or self._registry.default_model()
            for status in self._registry.status():
                if status.name == name:
                    info = self._info(status)
                    scope.finish(grpc.StatusCode.OK)
                    return info
            raise NotFound(
                f"unknown model {name!r}; models: {[s.name for s in self._registry.status()]}"
            )
        except Exception as e:
            await context.abort(*scope.fail(_as_service_error(e)))
        raise AssertionError("unreachable: abort raises")

    async def ListModels(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        scope = RequestScope(self._metrics, "ListModels", inflight=False)
        try:
            pb.ListModelsRequest.FromString(raw)
            reply = pb.ListModelsResponse(
                models=[self._info(s) for s in self._registry.status()]
            )
        except Exception as e:
            await context.abort(*scope.fail(_as_service_error(e)))
        scope.finish(grpc.StatusCode.OK)
        return reply

    def _info(self, status: Any) -> pb.ModelInfo:
        current = None
        if status.current_version:
            with contextlib.suppress(ServiceError):
                current = self._registry.resolve(status.name, status.current_version)
        return codec.model_info(status, current, self._max_images)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _as_service_error(e: Exception) -> Exception:
    """A protobuf parse failure is the caller's fault, not ours."""
    from google.protobuf.message import DecodeError

    from service.errors import InvalidInput

    if isinstance(e, DecodeError):
        return InvalidInput(f"request is not a valid protobuf message: {e}")
    if not isinstance(e, ServiceError):
        log.exception("unexpected error", exc_info=e)
    return e


def add_to_server(servicer: ClassifierServicer, server: grpc.aio.Server) -> None:
    """Register with identity request deserializers (see the module docstring) on any
    grpc.aio-style server. Fast lanes are not registered here: server.py plugs
    `servicer.fast_methods()` into a front end that has them."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(servicer.Classify),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(servicer.ClassifyStream),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, response_serializer=pb.ModelInfo.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString
        ),
    }
    # Registered methods are matched by gRPC core when the call arrives, so a call skips the
    # Python walk over generic handlers; the generic one stays for servers without them.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
