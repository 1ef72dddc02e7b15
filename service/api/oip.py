"""The Open Inference Protocol ("KServe v2") over gRPC: `inference.GRPCInferenceService`.

A second front door onto the same core as mnist.v1: it shares the registry, the batcher and the
metrics, so a v2 request and a native Classify request can land in the same batch and are
answered by the same version. The servicer only translates (tensors:
service/dataplane/oip_codec.py), calls the core and maps domain errors to statuses through
`errors.status_of`.

Outputs come back in `raw_output_contents` when the input came raw (what Triton's clients
send and expect) and in the typed `contents` when it came typed (what JSON tools such as
grpcurl read). `model_version` is "" (current), a number, or a version label. The
model-repository RPCs map onto the registry's admin actions under the admin token rule.
docs/oip.md is the user-facing description.

Handlers take the request as bytes and parse it themselves, as the native servicer does: a
parse failure inside gRPC's deserializer would reach the client as INTERNAL, while a malformed
request is the caller's error (INVALID_ARGUMENT). ModelInfer is the data plane's v2 pipeline
(service/dataplane/infer.py), on the event loop or, through `fast_methods`, on a front end's
own thread; this module imports no front end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, NoReturn

import grpc
from google.protobuf.message import Message

from service.api import admin
from service.api.oip_config import BatchingConfig, model_config_response
from service.api.oip_statistics import statistics_response
from service.batching import Batcher
from service.config import Settings
from service.dataplane import DataPlane, FastMethod, InferPipeline
from service.dataplane import oip_codec as tensors
from service.dataplane.images import ImageDecoder
from service.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
    status_of,
)
from service.metrics import Metrics
from service.pb.inference import grpc_service_pb2 as pb
from service.registry import ModelRegistry, VersionState

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
MODEL_INFER_PATH = f"/{SERVICE_NAME}/ModelInfer"
SERVER_NAME = "mnist-serving"
EXTENSIONS = ("model_repository",)
# Triton's words for what a version is doing (RepositoryIndex.state).
_STATE = {
    VersionState.AVAILABLE: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADED: "UNAVAILABLE",
}

@dataclass(frozen=True, slots=True)
class V2Settings:
    """What the v2 servicer uses of Settings, and nothing more."""

    max_images_per_request: int
    repository_name: str  # the one repository RepositoryIndex and friends accept besides ''
    admin_token: str | None  # None: model control is disabled
    batching: BatchingConfig  # what ModelConfig reports

    @classmethod
    def from_settings(cls, settings: Settings) -> V2Settings:
        token = settings.admin_token if settings.admin_enabled and settings.admin_token else None
        return cls(settings.max_images_per_request, settings.model_dir.name, token,
                   BatchingConfig.from_settings(settings))


# --- admin rules ----------------------------------------------------------------------------


def check_admin(admin_token: str | None, context: grpc.aio.ServicerContext) -> None:
    """Load/unload change what is served: the native admin API's bearer-token rule."""
    if admin_token is None:
        raise FailedPrecondition(
            "model control is disabled: start the server with --admin-enabled and --admin-token"
        )
    admin.authenticate(context, f"Bearer {admin_token}".encode())


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
        settings: V2Settings,
        images: ImageDecoder | None = None,
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._plane = DataPlane(batcher, metrics, images)
        self._infer = InferPipeline(registry, max_images=settings.max_images_per_request,
                                    images=images)
        # What the REST front end shares (service/frontends/http/api.py).
        self.plane, self.infer_pipeline = self._plane, self._infer
        self.batching = settings.batching
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
        return self.server_metadata()

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self.model_metadata(request.name, request.version)

    def model_metadata(self, name: str, version_text: str) -> pb.ModelMetadataResponse:
        """Shared with the REST endpoint (service/frontends/http/api.py)."""
        version, label = tensors.parse_version(version_text)
        sv = self._registry.resolve(name, version, label)
        loaded = [
            v.version
            for m in self._registry.status()
            if m.name == sv.name
            for v in m.versions
            if v.state is VersionState.AVAILABLE
        ]
        return tensors.model_metadata(sv, loaded)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """Triton's model configuration: service/api/oip_config.py."""
        return model_config_response(self._registry, self._settings.batching, request)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Triton's per-version statistics, from the metrics' counts (api/oip_statistics.py)."""
        return statistics_response(self._registry, self._metrics.version_statistics(), request)

    # --- inference

    async def ModelInfer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Counted by the data plane before the client hears back (abort sends the status at
        once, so counting after it would race a scrape)."""
        try:
            return await self._plane.call(self._infer, raw, context.time_remaining())
        except Exception as e:  # a bug is already logged by the data plane
            await context.abort(*status_of(e))
        raise AssertionError("unreachable: abort raises")

    def fast_methods(self) -> dict[str, FastMethod]:
        """ModelInfer for a front end with a thread of its own, by method path (server.py)."""
        return {MODEL_INFER_PATH: self._plane.fast_method(self._infer)}

    # --- model-repository extension

    def _check_repository(self, name: str) -> None:
        if name not in ("", self._settings.repository_name):
            raise NotFound(
                f"unknown repository {name!r}: expected '' or {self._settings.repository_name!r}"
            )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        self._check_repository(request.repository_name)
        reply = pb.RepositoryIndexResponse()
        for name, version, state, reason in self.repository_entries(request.ready):
            reply.models.add(name=name, version=version, state=state, reason=reason)
        return reply

    def repository_entries(self, ready: bool) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every version on disk, or only the READY ones;
        shared with the REST endpoint (service/frontends/http/api.py)."""
        entries = []
        for model in self._registry.status():
            for v in model.versions:
                state = _STATE.get(v.state, "UNAVAILABLE")
                if ready and state != "READY":
                    continue
                # The short reason code: the detail names server paths (the log has it).
                entries.append((model.name, str(v.version), state, v.reason))
        return entries

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """With parameter 'version': load and keep that version. Without: rescan the
        repository now (Triton's 'load or reload') and insist the model then serves."""
        check_admin(self._settings.admin_token, context)
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
        check_admin(self._settings.admin_token, context)
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
    settings: V2Settings,
    images: ImageDecoder | None = None,
) -> InferenceServicer:
    """Serve `inference.GRPCInferenceService` on `server`, the one mnist.v1 is on (its fast
    lane, `fast_methods()` of the servicer returned, is server.py's to plug in)."""
    s = InferenceServicer(registry=registry, batcher=batcher, metrics=metrics, settings=settings,
                          images=images)
    unary: dict[str, tuple[Handler, type[Message], type[Message]]] = {
        "ServerLive": (s.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": (s.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ModelReady": (s.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ServerMetadata": (s.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
        "ModelMetadata": (s.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": (s.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelStatistics": (
            s.ModelStatistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse
        ),
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
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(s.ModelInfer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return s
