"""KServe v2 ModelInfer as a pipeline, built so that every wire shares all but its parsing.

Two steps, so an HTTP/JSON front end reuses the second:
  1. wire -> `InferRequest`: for gRPC `InferPipeline.prepare` parses the protobuf with
     service/dataplane/oip_codec.py; an HTTP adapter parses its JSON into the same fields with
     the same validation helpers.
  2. `InferPipeline.resolve(request, scope, wire_bytes, encoder)` -> `InferJob`: the model,
     version or label must be loaded; the job carries what the reply needs and the wire's
     `encoder(job, prediction) -> bytes` (`grpc_encoder` here; `oip_codec.output_tensors`
     gives any encoder the outputs as arrays).
The data plane (service/dataplane/plane.py) runs the job for every front end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.batching import Array, Prediction
from service.dataplane import oip_codec as tensors
from service.dataplane.images import ImageDecoder, v2_blobs
from service.dataplane.job import Job
from service.dataplane.scope import RequestScope
from service.pb.inference import grpc_service_pb2 as pb
from service.registry import ModelRegistry


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A valid v2 inference request, whatever wire it came on.

    `x`: float32 (n, 784) in 0..1; `version` 0 and `label` "" mean the current version;
    `outputs`: names from `oip_codec.OUTPUT_NAMES`, in the order asked (all when none asked);
    `raw_outputs`: reply in binary form (gRPC raw_output_contents; HTTP binary extension);
    `routing_key`: picks canary or current for a request naming no version (the request
    parameter "routing_key"); `blobs`: encoded images instead of `x` (then `x` is None)."""

    id: str
    model: str
    version: int
    label: str
    x: Array | None
    outputs: tuple[str, ...] = tensors.OUTPUT_NAMES
    raw_outputs: bool = False
    routing_key: str = ""
    blobs: tuple[bytes, ...] = ()


Encoder = Callable[["InferJob", Prediction], bytes]


class InferJob(Job):
    """A resolved v2 request: its rows and what its reply needs."""

    __slots__ = ("encoder", "id", "outputs", "raw_outputs")

    def __init__(self, x: Array | None, model: str, version: int, label: str,
                 wire_bytes: int, *, id: str, outputs: tuple[str, ...], raw_outputs: bool,
                 encoder: Encoder, blobs: tuple[bytes, ...] = ()) -> None:
        super().__init__(x, model, version, label, wire_bytes, blobs)
        self.id = id
        self.outputs = outputs
        self.raw_outputs = raw_outputs
        self.encoder = encoder

    def encode(self, prediction: Prediction) -> bytes:
        return self.encoder(self, prediction)


def grpc_encoder(job: InferJob, prediction: Prediction) -> bytes:
    """A ModelInferResponse: outputs raw when the input came raw (Triton's clients), typed
    when it came typed (grpcurl and JSON tools)."""
    answered = prediction.version
    reply = pb.ModelInferResponse(
        model_name=answered.name, model_version=str(answered.version), id=job.id
    )
    tensors.encode_outputs(reply, job.outputs, prediction.probabilities, job.raw_outputs)
    message: bytes = reply.SerializeToString()
    return message


class InferPipeline:
    """parse + validate + resolve for ModelInferRequest bytes; `resolve` for other wires."""

    __slots__ = ("_images", "_max_images", "_registry", "method")

    def __init__(self, registry: ModelRegistry, *, max_images: int,
                 images: ImageDecoder | None = None, method: str = "ModelInfer") -> None:
        self._registry = registry
        self._max_images = max_images
        self._images = images or ImageDecoder.off()
        self.method = method

    @property
    def max_images(self) -> int:
        return self._max_images

    def prepare(self, raw: bytes, scope: RequestScope) -> InferJob:
        request = tensors.parse(pb.ModelInferRequest, raw)
        number, label = tensors.parse_version(request.model_version)
        key = (request.parameters["routing_key"].string_param
               if "routing_key" in request.parameters else "")
        number = self.check(request.model_name, number, label, key, scope)
        outputs = tensors.requested_outputs(request)
        blobs = v2_blobs(request)
        if blobs is not None:  # a BYTES input: encoded images, checked now, decoded later
            self._images.check(blobs, self._max_images)
            scope.images = len(blobs)
            return InferJob(None, request.model_name, number, label, len(raw), id=request.id,
                            outputs=outputs, raw_outputs=len(request.raw_input_contents) > 0,
                            encoder=grpc_encoder, blobs=tuple(blobs))
        x, came_raw = tensors.decode_input(request, self._max_images)
        scope.images = int(x.shape[0])
        return InferJob(x, request.model_name, number, label, len(raw), id=request.id,
                        outputs=outputs, raw_outputs=came_raw, encoder=grpc_encoder)

    def resolve(self, request: InferRequest, scope: RequestScope, wire_bytes: int,
                encoder: Encoder) -> InferJob:
        """Step 2 for a wire that parsed its own request (see the module docstring)."""
        number = self.check(request.model, request.version, request.label,
                             request.routing_key, scope)
        if request.x is None:
            self._images.check(request.blobs, self._max_images)
            scope.images = len(request.blobs)
        else:
            scope.images = int(request.x.shape[0])
        return InferJob(request.x, request.model, number, request.label, wire_bytes,
                        id=request.id, outputs=request.outputs,
                        raw_outputs=request.raw_outputs, encoder=encoder, blobs=request.blobs)

    def check(self, model: str, version: int, label: str, key: str,
               scope: RequestScope) -> int:
        """The version number to queue under (a canary is chosen once, here, by `key`). Fail
        fast on a model, version or label not loaded (nothing unknown is queued, nor names a
        metric series). A request for a version is counted under it from here on; a label
        resolves again at batch time, so it is counted under what answered."""
        version = self._registry.route(model, version, label, key)
        sv = self._registry.resolve(model, version, label)
        if not label:
            scope.answered_by(sv)
        return version
