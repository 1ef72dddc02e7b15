"""The Open Inference Protocol ("KServe v2") over gRPC: `inference.GRPCInferenceService`.

A second front door onto the same core as mnist.v1: it shares the registry, the batcher and
the metrics, so a v2 request and a native Classify request can land in the same batch and are
answered by the same version. The servicer only translates (tensors: service/oip_codec.py),
calls the core and maps domain errors to statuses through `errors.status_of`.

Outputs come back in `raw_output_contents` when the input came raw (what Triton's clients
send and expect) and in the typed `contents` when it came typed (what JSON tools such as
grpcurl read). `model_version` is "" (current), a number, or a version label. The
model-repository RPCs map onto the registry's admin actions under the admin token rule.
docs/oip.md is the user-facing description.

Handlers take the request as bytes and parse it themselves, as the native servicer does: a
parse failure inside gRPC's deserializer would reach the client as INTERNAL, while a malformed
request is the caller's error (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message

from service import admin
from service import oip_codec as tensors
from service.batching import Batcher, Prediction
from service.config import Settings
from service.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
    status_of,
)
from service.fastpath import Answer, refuse
from service.metrics import Metrics
from service.pb.inference import grpc_service_pb2 as pb
from service.registry import ModelRegistry, VersionState
from service.transport import CoreServer, FastCall

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "mnist-serving"
EXTENSIONS = ("model_repository",)
# Triton's words for what a version is doing (RepositoryIndex.state).
_STATE = {
    VersionState.AVAILABLE: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADED: "UNAVAILABLE",
}

# --- admin rules ----------------------------------------------------------------------------


def check_admin(settings: Settings, context: grpc.aio.ServicerContext) -> None:
    """Load/unload change what is served: the native admin API's bearer-token rule."""
    if not settings.admin_enabled or not settings.admin_token:
        raise FailedPrecondition(
            "model control is disabled: start the server with --admin-enabled and --admin-token"
        )
    admin.authenticate(context, f"Bearer {settings.admin_token}".encode())


# --- the servicer ---------------------------------------------------------------------------


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    if not isinstance(exc, ServiceError):
        log.exception("v2 call failed", exc_info=exc)
    await context.abort(*status_of(exc))
    raise AssertionError("unreachable: abort raises")


class InferenceServicer:
    """Translates v2 calls onto the registry and the batcher; no math or policy of its own."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        batcher: Batcher,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self._registry = registry
        self._batcher = batcher
        self._metrics = metrics
        self._settings = settings
        try:
            self._version = importlib_metadata.version(SERVER_NAME)
        except importlib_metadata.PackageNotFoundError:
            self._version = "0+unknown"

    # --- health and metadata

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._registry.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Not found or not loaded is an answer here (ready=false), not an error."""
        version, label = tensors.parse_version(request.version)
        try:
            self._registry.resolve(request.name, version, label)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        version, label = tensors.parse_version(request.version)
        sv = self._registry.resolve(request.name, version, label)
        loaded = [
            v.version
            for m in self._registry.status()
            if m.name == sv.name
            for v in m.versions
            if v.state is VersionState.AVAILABLE
        ]
        return tensors.model_metadata(sv, loaded)

    # --- inference

    async def ModelInfer(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        inflight = self._metrics.inflight if self._metrics.enabled else None
        if inflight is not None:
            inflight.inc()
        try:
            return await self._infer(raw, context.time_remaining())
        except Exception as e:
            await _abort(context, e)
        finally:
            if inflight is not None:
                inflight.dec()

    async def _infer(self, raw: bytes, time_remaining: float | None) -> pb.ModelInferResponse:
        """One request end to end, counted like the native Classify before the client hears
        back (abort sends the status at once, so counting after it would race a scrape)."""
        started = time.perf_counter()
        images = 0
        code = grpc.StatusCode.OK
        job = _Infer()
        try:
            self._batcher.admit_wire(len(raw))  # before any decoding: a refusal is cheap
            request, x = self._prepare(raw, job)
            images = int(x.shape[0])
            prediction = await self._batcher.submit(
                x, model=request.model_name, version=job.number, label=job.label,
                deadline_s=time_remaining, wire_bytes=len(raw),
            )
            answered = prediction.version
            job.model, job.version = answered.name, str(answered.version)
            return job.response(prediction)
        except BaseException as e:
            code = (grpc.StatusCode.CANCELLED if isinstance(e, asyncio.CancelledError)
                    else status_of(e)[0])
            raise
        finally:
            self._metrics.request_done(
                "ModelInfer", job.model, job.version, code.name, images,
                time.perf_counter() - started,
            )

    def _prepare(self, raw: bytes, job: _Infer) -> tuple[pb.ModelInferRequest, tensors.Array]:
        """Parse and validate completely, filling in `job` as it goes (a failure is counted
        under the version once that is known; the batch re-resolves a version at its time)."""
        request = tensors.parse(pb.ModelInferRequest, raw)
        job.id = request.id
        job.number, job.label = tensors.parse_version(request.model_version)
        # Fail fast on a model, version or label not loaded (nothing unknown is queued, nor
        # names a metric series); a label resolves again at batch time, as in the native API.
        sv = self._registry.resolve(request.model_name, job.number, job.label)
        if not job.label:
            job.model, job.version = sv.name, str(sv.version)
        job.outputs = tensors.requested_outputs(request)
        x, job.came_raw = tensors.decode_input(request, self._settings.max_images_per_request)
        return request, x

    def infer_now(self, call: FastCall, raw: bytes) -> None:
        """ModelInfer on gRPC core's polling thread, as servicer.classify_now: validate now,
        queue for the batch, and the `fastpath.Answer` replies. Must not block or raise."""
        answer = Answer(self._metrics, "ModelInfer", call)
        job = _Infer()
        try:
            self._batcher.admit_wire(len(raw))  # before any decoding: a refusal is cheap
            request, x = self._prepare(raw, job)
            answer.model, answer.version = job.model, job.version
            answer.images = int(x.shape[0])
            answer.encode = job.encoded
            self._batcher.submit_nowait(
                x, answer, model=request.model_name, version=job.number, label=job.label,
                deadline_s=call.time_remaining(), wire_bytes=len(raw),
            )
        except Exception as e:
            answer.model, answer.version = job.model, job.version
            answer.set_exception(e)

    def infer_gate(self, call: FastCall, waited_s: float) -> bool | None:
        """Before ModelInfer's message is read: while the batcher sheds, wait unread at the
        door (a bounded time) or be refused (servicer.classify_gate)."""
        let_in = self._batcher.door(waited_s)
        if let_in is False:
            refuse(self._metrics, "ModelInfer", call, self._batcher.refusal(), waited_s)
        return let_in

    # --- model-repository extension

    def _check_repository(self, name: str) -> None:
        if name not in ("", self._settings.model_dir.name):
            raise NotFound(
                f"unknown repository {name!r}: expected '' or {self._settings.model_dir.name!r}"
            )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._check_repository(request.repository_name)
        reply = pb.RepositoryIndexResponse()
        for model in self._registry.status():
            for v in model.versions:
                state = _STATE.get(v.state, "UNAVAILABLE")
                if request.ready and state != "READY":
                    continue
                reply.models.add(
                    name=model.name, version=str(v.version), state=state,
                    # The short reason code: the detail names server paths (the log has it).
                    reason=v.reason,
                )
        return reply

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """With parameter 'version': load and keep that version. Without: rescan the
        repository now (Triton's 'load or reload') and insist the model then serves."""
        check_admin(self._settings, context)
        self._check_repository(request.repository_name)
        if not request.model_name:
            raise InvalidInput("model_name: expected the name of a model, got ''")
        version = tensors.version_parameter(request.parameters)
        if version:
            await self._registry.load_version(request.model_name, version)
            return pb.RepositoryModelLoadResponse()
        await self._registry.rescan()
        status = self._registry.model_status(request.model_name)
        if status.current_version is None:
            why = "; ".join(
                f"version {v.version} {v.state.value}" + (f" ({v.reason})" if v.reason else "")
                for v in status.versions
            )
            raise FailedPrecondition(
                f"model {request.model_name!r} has no servable version: {why or 'none on disk'}"
            )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload one version (parameter 'version'). A whole model is never unloaded: the
        registry keeps at least one version of every model on disk serving."""
        check_admin(self._settings, context)
        self._check_repository(request.repository_name)
        version = tensors.version_parameter(request.parameters)
        if not version:
            raise FailedPrecondition(
                f"unloading all of model {request.model_name!r} is not supported: expected "
                f"parameter {tensors.VERSION_PARAMETER!r} naming the version to unload"
            )
        await self._registry.unload_version(request.model_name, version)
        return pb.RepositoryModelUnloadResponse()


# --- registration ---------------------------------------------------------------------------

@dataclass(slots=True)
class _Infer:
    """What a valid ModelInfer request asks for, kept until its batch answers it."""

    id: str = ""
    number: int = 0
    label: str = ""
    model: str = ""
    version: str = ""
    outputs: tuple[str, ...] = ()
    came_raw: bool = False

    def response(self, prediction: Prediction) -> pb.ModelInferResponse:
        answered = prediction.version
        reply = pb.ModelInferResponse(
            model_name=answered.name, model_version=str(answered.version), id=self.id
        )
        tensors.encode_outputs(reply, self.outputs, prediction.probabilities, self.came_raw)
        return reply

    def encoded(self, prediction: Prediction) -> bytes:
        message: bytes = self.response(prediction).SerializeToString()
        return message


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def _parsing(method: Handler, cls: type[Message]) -> Callable[..., Awaitable[Message]]:
    """Parse the request bytes here and map every domain error to its status, in one place."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await method(tensors.parse(cls, raw), context)
        except Exception as e:
            await _abort(context, e)

    return handle


def add_to_server(
    server: grpc.aio.Server,
    *,
    registry: ModelRegistry,
    batcher: Batcher,
    metrics: Metrics,
    settings: Settings,
) -> InferenceServicer:
    """Serve `inference.GRPCInferenceService` on `server`, the one mnist.v1 is on."""
    s = InferenceServicer(registry=registry, batcher=batcher, metrics=metrics, settings=settings)
    unary: dict[str, tuple[Handler, type[Message], type[Message]]] = {
        "ServerLive": (s.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (s.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (s.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (s.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (s.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "RepositoryIndex": (
            s.RepositoryIndex, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
        ),
        "RepositoryModelLoad": (
            s.RepositoryModelLoad, pb.RepositoryModelLoadRequest, pb.RepositoryModelLoadResponse
        ),
        "RepositoryModelUnload": (
            s.RepositoryModelUnload,
            pb.RepositoryModelUnloadRequest,
            pb.RepositoryModelUnloadResponse,
        ),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _parsing(method, request_cls), response_serializer=reply_cls.SerializeToString
        )
        for name, (method, request_cls, reply_cls) in unary.items()
    }
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        s.ModelInfer, response_serializer=pb.ModelInferResponse.SerializeToString
    )
    if isinstance(server, CoreServer):
        server.add_fast_method(f"/{SERVICE_NAME}/ModelInfer", s.infer_now, gate=s.infer_gate)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return s
