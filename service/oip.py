"""The Open Inference Protocol ("KServe v2") over gRPC: `inference.GRPCInferenceService`.

A second front door onto the same core as mnist.v1: it shares the registry, the batcher and
the metrics, so a v2 request and a native Classify request can land in the same batch and are
answered by the same version. This module only translates v2 tensors to the model's input
rows and predictions back to v2 tensors; the float pixel rule is the native codec's.

The model, as ModelMetadata describes it:
    input  "images"          FP32 [-1, 784] in 0..1  (also accepted: UINT8 0..255, [-1, 28, 28])
    output "probabilities"   FP32 [-1, 10]
    output "predicted_class" INT64 [-1]
Outputs come back in `raw_output_contents` when the input came raw (what Triton's clients
send and expect) and in the typed `contents` when it came typed (what JSON tools such as
grpcurl read). `model_version` is "" (current), a number, or a version label. docs/oip.md is
the user-facing description.

Handlers take the request as bytes and parse it themselves, as the native servicer does: a
parse failure inside gRPC's deserializer would reach the client as INTERNAL, while a malformed
request is the caller's error (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata as importlib_metadata
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from service import admin, codec
from service.config import Settings
from service.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ServiceError,
    Unavailable,
    status_of,
)
from service.metrics import Metrics
from service.model import IMAGE_SHAPE, INPUT_SIZE, NUM_CLASSES, pixels_to_input
from service.pb.inference import grpc_service_pb2 as pb
from service.registry import ModelRegistry, ServableVersion, VersionState

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "mnist-serving"
INPUT_NAME = "images"
PROBABILITIES = "probabilities"
PREDICTED_CLASS = "predicted_class"
OUTPUT_NAMES = (PROBABILITIES, PREDICTED_CLASS)
PLATFORM = "numpy_mlp"
EXTENSIONS = ("model_repository",)
VERSION_PARAMETER = "version"  # RepositoryModelLoad/Unload: which version (else: the model)
# The v2 data types we take -> the dtype of their raw little-endian bytes.
_RAW_DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
# Triton's words for what a version is doing (RepositoryIndex.state).
_STATE = {
    VersionState.AVAILABLE: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.FAILED: "UNAVAILABLE",
    VersionState.UNLOADED: "UNAVAILABLE",
}

Array = npt.NDArray[np.float32]
M = TypeVar("M", bound=Message)


class Prediction(Protocol):
    @property
    def probabilities(self) -> Array: ...
    @property
    def version(self) -> ServableVersion: ...


class Batcher(Protocol):
    """What this servicer needs of service.batcher.Batcher (a fake in tests is fine)."""

    async def submit(
        self,
        x: Array,
        *,
        model: str = "",
        version: int = 0,
        label: str = "",
        deadline_s: float | None = None,
    ) -> Prediction: ...


# --- requests in ----------------------------------------------------------------------------


def parse(cls: type[M], raw: bytes) -> M:
    try:
        message: M = cls.FromString(raw)
    except Exception as e:  # DecodeError, or upb's complaint about odd bytes
        raise InvalidInput(
            f"request is not a valid inference.{cls.__name__} ({len(raw)} bytes): {e}"
        ) from None
    return message


def parse_version(text: str) -> tuple[int, str]:
    """v2's string version -> (version, label): "" current, "3" a number, "stable" a label.

    The protocol's version is a free string. A number names a version directory; anything
    else is read as a version label, so v2 clients can ask for "canary" with no extension.
    """
    if text == "":
        return 0, ""
    if text.isascii() and text.isdigit():
        if int(text) < 1:
            raise InvalidInput(f"model_version: expected a version >= 1 or a label, got {text!r}")
        return int(text), ""
    if not text.isprintable() or text.strip() != text or len(text) > 64:
        raise InvalidInput(f"model_version: expected a version number or a label, got {text!r}")
    return 0, text


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _images_in(shape: Sequence[int], max_images: int) -> int:
    """N for an input of shape [N, 784] or [N, 28, 28], 1 <= N <= max_images."""
    dims = tuple(shape)
    if not ((len(dims) == 2 and dims[1] == INPUT_SIZE) or
            (len(dims) == 3 and dims[1:] == IMAGE_SHAPE)):
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected shape [N, {INPUT_SIZE}] or "
            f"[N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}], got {_shape_text(dims)}"
        )
    n = dims[0]
    if n < 1:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected at least 1 image, got shape {_shape_text(dims)}"
        )
    if n > max_images:
        raise InvalidInput(f"{n} images in one request: at most {max_images} allowed")
    return n


def _typed_values(tensor: pb.ModelInferRequest.InferInputTensor) -> npt.NDArray[Any]:
    """The typed contents of the input, from the one field its datatype allows."""
    field = "fp32_contents" if tensor.datatype == "FP32" else "uint_contents"
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise InvalidInput(
            f"input {INPUT_NAME!r} is {tensor.datatype}: expected its values in {field}, "
            f"got {', '.join(others)}"
        )
    if tensor.datatype == "FP32":
        return np.array(tensor.contents.fp32_contents, dtype=np.float32)
    values = np.array(tensor.contents.uint_contents, dtype=np.uint32)
    if values.size and int(values.max()) > 255:
        raise InvalidInput(
            f"input {INPUT_NAME!r} is UINT8: expected values 0..255, got {int(values.max())}"
        )
    return values.astype(np.uint8)


def decode_input(request: pb.ModelInferRequest, max_images: int) -> tuple[Array, bool]:
    """The request's input as float32 rows (n, 784) in 0..1, and whether it came raw.

    Raw bytes are viewed with np.frombuffer (no copy, no Python loop); typed contents are
    converted once. Float pixels then pass the native API's range and NaN check.
    """
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"expected exactly 1 input ({INPUT_NAME!r}), got {len(request.inputs)}: "
            f"{[t.name for t in request.inputs]}"
        )
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise InvalidInput(f"expected an input named {INPUT_NAME!r}, got {tensor.name!r}")
    dtype = _RAW_DTYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {INPUT_NAME!r}: expected datatype FP32 or UINT8, got {tensor.datatype!r}"
        )
    n = _images_in(tensor.shape, max_images)
    count = n * INPUT_SIZE
    raw = len(request.raw_input_contents) > 0
    values: npt.NDArray[Any]
    if raw:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                "raw_input_contents: expected 1 entry (one per input), got "
                f"{len(request.raw_input_contents)}"
            )
        if tensor.HasField("contents") and tensor.contents.ListFields():
            raise InvalidInput(
                f"input {INPUT_NAME!r}: values in both contents and raw_input_contents; "
                "expected them in one"
            )
        data = request.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {INPUT_NAME!r}: expected {count * dtype.itemsize} bytes for shape "
                f"{_shape_text(tensor.shape)} {tensor.datatype}, got {len(data)}"
            )
        values = np.frombuffer(data, dtype=dtype)
    else:
        values = _typed_values(tensor)
        if values.size != count:
            raise InvalidInput(
                f"input {INPUT_NAME!r}: expected {count} values for shape "
                f"{_shape_text(tensor.shape)}, got {values.size}"
            )
    if tensor.datatype == "UINT8":
        return pixels_to_input(values), raw
    x: Array = values.reshape(n, INPUT_SIZE)
    codec.check_unit_range(x)
    return x, raw



# --- replies out ----------------------------------------------------------------------------


def requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    """The outputs to send, in the order asked, once each; none asked means all."""
    if not request.outputs:
        return OUTPUT_NAMES
    names: list[str] = []
    for out in request.outputs:
        if out.name not in OUTPUT_NAMES:
            raise InvalidInput(
                f"unknown output {out.name!r}: expected one of {list(OUTPUT_NAMES)}"
            )
        if out.name not in names:
            names.append(out.name)
    return tuple(names)


def encode_outputs(
    reply: pb.ModelInferResponse, names: Sequence[str], probabilities: Array, raw: bool
) -> None:
    n = probabilities.shape[0]
    for name in names:
        tensor = reply.outputs.add(name=name)
        if name == PROBABILITIES:
            tensor.datatype = "FP32"
            tensor.shape.extend((n, NUM_CLASSES))
            if raw:
                reply.raw_output_contents.append(probabilities.astype("<f4", copy=False).tobytes())
            else:
                tensor.contents.fp32_contents.extend(probabilities.ravel().tolist())
        else:
            classes = probabilities.argmax(axis=1)
            tensor.datatype = "INT64"
            tensor.shape.append(n)
            if raw:
                reply.raw_output_contents.append(np.asarray(classes, "<i8").tobytes())
            else:
                tensor.contents.int64_contents.extend(classes.tolist())


def model_metadata(sv: ServableVersion, loaded: Sequence[int]) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=sv.name,
        versions=[str(v) for v in loaded] or [str(sv.version)],
        platform=PLATFORM,
        inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, INPUT_SIZE])],
        outputs=[
            tensor(name=PROBABILITIES, datatype="FP32", shape=[-1, NUM_CLASSES]),
            tensor(name=PREDICTED_CLASS, datatype="INT64", shape=[-1]),
        ],
    )


# --- admin rules ----------------------------------------------------------------------------


def check_admin(settings: Settings, context: grpc.aio.ServicerContext) -> None:
    """Load/unload change what is served: the native admin API's bearer-token rule."""
    if not settings.admin_enabled or not settings.admin_token:
        raise FailedPrecondition(
            "model control is disabled: start the server with --admin-enabled and --admin-token"
        )
    admin.authenticate(context, f"Bearer {settings.admin_token}".encode())


def version_parameter(parameters: Any) -> int:
    """The optional 'version' repository parameter (int64 or string); 0 when absent."""
    if VERSION_PARAMETER not in parameters:
        return 0
    p = parameters[VERSION_PARAMETER]
    kind = p.WhichOneof("parameter_choice")
    value: Any = p.int64_param if kind == "int64_param" else p.string_param
    if kind not in ("int64_param", "string_param") or not str(value).isdigit() or int(value) < 1:
        shown = getattr(p, kind) if kind else None
        raise InvalidInput(
            f"parameter {VERSION_PARAMETER!r}: expected a version >= 1 (int64 or string), "
            f"got {kind or 'nothing'} {shown!r}"
        )
    return int(value)


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
        version, label = parse_version(request.version)
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
        version, label = parse_version(request.version)
        sv = self._registry.resolve(request.name, version, label)
        loaded = [
            v.version
            for m in self._registry.status()
            if m.name == sv.name
            for v in m.versions
            if v.state is VersionState.AVAILABLE
        ]
        return model_metadata(sv, loaded)

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
        model = version = ""
        images = 0
        code = grpc.StatusCode.OK
        try:
            request = parse(pb.ModelInferRequest, raw)
            number, label = parse_version(request.model_version)
            if not label:  # labels resolve at batch time, as in the native API
                sv = self._registry.resolve(request.model_name, number)
                model, version = sv.name, str(sv.version)
            names = requested_outputs(request)
            x, came_raw = decode_input(request, self._settings.max_images_per_request)
            images = int(x.shape[0])
            prediction = await self._batcher.submit(
                x, model=request.model_name, version=number, label=label,
                deadline_s=time_remaining,
            )
            answered = prediction.version
            model, version = answered.name, str(answered.version)
            reply = pb.ModelInferResponse(
                model_name=answered.name, model_version=version, id=request.id
            )
            encode_outputs(reply, names, prediction.probabilities, came_raw)
            return reply
        except BaseException as e:
            code = (grpc.StatusCode.CANCELLED if isinstance(e, asyncio.CancelledError)
                    else status_of(e)[0])
            raise
        finally:
            self._metrics.request_done(
                "ModelInfer", model, version, code.name, images, time.perf_counter() - started
            )

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
                    reason=getattr(v, "detail", "") or v.reason,
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
        version = version_parameter(request.parameters)
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
        version = version_parameter(request.parameters)
        if not version:
            raise FailedPrecondition(
                f"unloading all of model {request.model_name!r} is not supported: expected "
                f"parameter {VERSION_PARAMETER!r} naming the version to unload"
            )
        await self._registry.unload_version(request.model_name, version)
        return pb.RepositoryModelUnloadResponse()


# --- registration ---------------------------------------------------------------------------

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def _parsing(method: Handler, cls: type[Message]) -> Callable[..., Awaitable[Message]]:
    """Parse the request bytes here and map every domain error to its status, in one place."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        try:
            return await method(parse(cls, raw), context)
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
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return s
