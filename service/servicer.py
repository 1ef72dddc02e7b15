"""The mnist.v1.Classifier servicer: decode + validate, call the batcher, encode. Nothing else.

Handlers receive raw request bytes and parse them here: a parse failure inside gRPC's own
deserializer would surface as INTERNAL, while a malformed request is the caller's error
(INVALID_ARGUMENT). Every request is validated completely before it reaches the batcher, so a
bad one never shares a batch with good ones. Domain errors become statuses only through
`errors.status_of`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from service import codec
from service.batching import Batcher, Prediction
from service.errors import NotFound, ServiceError, status_of
from service.fastpath import Answer, refuse
from service.metrics import Metrics
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.registry import ModelRegistry, ServableVersion
from service.transport import CoreServer, FastCall

log = logging.getLogger(__name__)

SERVICE_NAME = "mnist.v1.Classifier"
# Requests of one stream computed concurrently (so a stream's flow is batched too).
STREAM_WINDOW = 64


class ClassifierServicer:
    def __init__(
        self, registry: ModelRegistry, batcher: Batcher, metrics: Metrics, *, max_images: int
    ) -> None:
        self._registry = registry
        self._batcher = batcher
        self._metrics = metrics
        self._max_images = max_images

    async def _classify(
        self, raw: bytes, method: str, time_remaining: float | None
    ) -> pb.ClassifyResponse:
        """One request end to end; counts it; raises ServiceError (or a bug) on failure."""
        started = time.perf_counter()
        model = version = ""
        images = 0
        code = grpc.StatusCode.OK
        try:
            self._batcher.admit_wire(len(raw))  # before any decoding: a refusal is cheap
            request, x = self._prepare(raw)
            images = int(x.shape[0])
            prediction = await self._batcher.submit(
                x,
                model=request.model,
                version=request.version,
                label=request.version_label,
                deadline_s=time_remaining,
                wire_bytes=len(raw),
            )
            sv = prediction.version
            model, version = sv.name, str(sv.version)
            return _response(prediction, request)
        except BaseException as e:
            code = status_of(e)[0] if not isinstance(e, asyncio.CancelledError) else (
                grpc.StatusCode.CANCELLED
            )
            raise
        finally:
            self._metrics.request_done(
                method, model, version, code.name, images, time.perf_counter() - started
            )

    def _prepare(self, raw: bytes) -> tuple[pb.ClassifyRequest, codec.Array]:
        """Parse and validate completely; fail fast on an unknown model/version/label (the
        batch re-resolves at its time)."""
        request = codec.parse_request(raw)
        x = codec.decode_pixels(request, self._max_images)
        self._check_exists(request)
        return request, x

    def classify_now(self, call: FastCall, raw: bytes) -> None:
        """Classify on gRPC core's polling thread (service/transport.py): validate now and
        queue the images for the batch the polling thread computes once nothing more is
        arriving; the `fastpath.Answer` replies. Must not block or raise."""
        answer = Answer(self._metrics, "Classify", call)
        try:
            self._batcher.admit_wire(len(raw))  # before any decoding: a refusal is cheap
            request, x = self._prepare(raw)
            answer.images = int(x.shape[0])
            # Not the request itself: its pixels would stay alive until the reply.
            answer.encode = functools.partial(_encoded, request.request_id,
                                              request.packed_output)
            self._batcher.submit_nowait(
                x, answer, model=request.model, version=request.version,
                label=request.version_label, deadline_s=call.time_remaining(),
                wire_bytes=len(raw),
            )
        except Exception as e:
            answer.set_exception(e)

    def classify_gate(self, call: FastCall, waited_s: float) -> bool | None:
        """Before Classify's message is read (service/transport.py): while the batcher sheds,
        the call waits unread at the door (a bounded time) or is refused, so a flood of
        retries costs neither a read nor a decode."""
        let_in = self._batcher.door(waited_s)
        if let_in is False:
            refuse(self._metrics, "Classify", call, self._batcher.refusal(), waited_s)
        return let_in

    def _check_exists(self, request: pb.ClassifyRequest) -> ServableVersion:
        return self._registry.resolve(request.model, request.version, request.version_label)

    # --- RPCs

    async def Classify(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        inflight = self._metrics.inflight if self._metrics.enabled else None
        if inflight is not None:
            inflight.inc()
        try:
            return await self._classify(raw, "Classify", context.time_remaining())
        except ServiceError as e:
            await context.abort(*status_of(e))
        except Exception as e:
            log.exception("Classify failed")
            await context.abort(*status_of(e))
        finally:
            if inflight is not None:
                inflight.dec()
        raise AssertionError("unreachable: abort raises")

    async def ClassifyStream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Read ahead up to STREAM_WINDOW requests, answer strictly in order."""
        window: asyncio.Queue[asyncio.Task[pb.ClassifyStreamResponse] | None] = asyncio.Queue(
            STREAM_WINDOW
        )

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

    async def _stream_one(self, raw: bytes) -> pb.ClassifyStreamResponse:
        try:
            response = await self._classify(raw, "ClassifyStream", None)
            return pb.ClassifyStreamResponse(response=response)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not isinstance(e, ServiceError):
                log.exception("ClassifyStream message failed")
            code, details = status_of(e)
            request_id = ""
            with contextlib.suppress(Exception):
                request_id = pb.ClassifyRequest.FromString(raw).request_id
            return pb.ClassifyStreamResponse(
                error=pb.StreamError(code=code.value[0], message=details, request_id=request_id)
            )

    async def GetModelInfo(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            request = pb.GetModelInfoRequest.FromString(raw)
            name = request.model or self._registry.default_model()
            for status in self._registry.status():
                if status.name == name:
                    return self._info(status)
            raise NotFound(
                f"unknown model {name!r}; models: {[s.name for s in self._registry.status()]}"
            )
        except Exception as e:
            code, details = status_of(_as_service_error(e))
            await context.abort(code, details)
        finally:
            self._metrics.request_done(
                "GetModelInfo", "", "", code.name, 0, time.perf_counter() - started
            )
        raise AssertionError("unreachable: abort raises")

    async def ListModels(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            pb.ListModelsRequest.FromString(raw)
            return pb.ListModelsResponse(
                models=[self._info(s) for s in self._registry.status()]
            )
        except Exception as e:
            code, details = status_of(_as_service_error(e))
            await context.abort(code, details)
        finally:
            self._metrics.request_done(
                "ListModels", "", "", code.name, 0, time.perf_counter() - started
            )
        raise AssertionError("unreachable: abort raises")

    def _info(self, status: Any) -> pb.ModelInfo:
        current = None
        if status.current_version:
            with contextlib.suppress(ServiceError):
                current = self._registry.resolve(status.name, status.current_version)
        return codec.model_info(status, current, self._max_images)


def _response(prediction: Prediction, request: pb.ClassifyRequest) -> pb.ClassifyResponse:
    return codec.encode_response(prediction.probabilities, prediction.version,
                                 request.request_id, request.packed_output)


def _encoded(request_id: str, packed: bool, prediction: Prediction) -> bytes:
    message: bytes = codec.encode_response(prediction.probabilities, prediction.version,
                                           request_id, packed).SerializeToString()
    return message


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
    """Register with identity request deserializers (see the module docstring); on a
    CoreServer, Classify is a fast method answered on gRPC core's polling thread."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            servicer.Classify, response_serializer=pb.ClassifyResponse.SerializeToString
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            servicer.ClassifyStream,
            response_serializer=pb.ClassifyStreamResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, response_serializer=pb.ModelInfo.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString
        ),
    }
    if isinstance(server, CoreServer):
        server.add_fast_method(f"/{SERVICE_NAME}/Classify", servicer.classify_now,
                               gate=servicer.classify_gate)
    # Registered methods are matched by gRPC core when the call arrives, so a call skips the
    # Python walk over generic handlers; the generic one stays for servers without them.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
