"""What the HTTP front end needs from the core: the `RestApi` protocol, and `OipRestApi`,
its implementation over the data plane the gRPC v2 servicer uses.

The front end (service/frontends/http/server.py) owns sockets, HTTP framing, limits and the status
mapping; everything it asks of the service goes through `RestApi`, so it holds no business
logic. An infer is `DataPlane.call` with `RestInferPipeline`: REST's own parsing
(service/frontends/http/codec.py over service/dataplane/oip_codec.py's validation), then the
v2 pipeline's `resolve` (routing key, version, label), the same batcher, and the same `RequestScope`
accounting, under `method="REST ModelInfer"`.
"""

from __future__ import annotations

from typing import Any, Protocol

from service.api import oip
from service.api.oip_config import config_for
from service.api.oip_statistics import statistics_dict, versions_for
from service.batching import CHARGE_PER_WIRE_BYTE, Batcher, Prediction
from service.dataplane import InferJob, InferPipeline, InferRequest, RequestScope
from service.dataplane import oip_codec as tensors
from service.errors import NotFound, Unavailable
from service.frontends.http import codec as http_codec
from service.metrics import Metrics
from service.registry import ModelRegistry

METHOD = "REST ModelInfer"  # the metrics' method label: one fixed value, beside "ModelInfer"


def wire_equivalent(body_bytes: int, binary: bool) -> int:
    """A REST body's size in the batcher's wire bytes, which it charges CHARGE_PER_WIRE_BYTE
    each (sized for protobuf, where float32 rows come from raw bytes). A REST request holds
    its body and its float32 rows until answered: at most 5x the body with binary UINT8
    pixels (1 byte each -> 4), 3x with JSON (every value takes 2 characters or more).
    Encoded images are the exception, known only once decoded (a 200-byte PNG is 3136 bytes
    of rows): this charge admits their body, and the batcher charges their decoded rows when
    they are queued (`Batcher.submit`: the larger of the rows and the wire bytes)."""
    most = body_bytes * (5 if binary else 3)
    return -(-most // CHARGE_PER_WIRE_BYTE)


class RestApi(Protocol):
    """The KServe v2 REST operations, wire-neutral: plain values and JSON-able documents in
    and out; errors are `ServiceError`s (the front end maps their code to an HTTP status)."""

    def ready(self) -> bool: ...

    def server_metadata(self) -> dict[str, Any]: ...

    def model_ready(self, model: str, version: str) -> bool: ...

    def model_metadata(self, model: str, version: str) -> dict[str, Any]: ...

    def model_config(self, model: str, version: str) -> dict[str, Any]: ...

    def model_statistics(self, model: str, version: str) -> dict[str, Any]: ...

    def repository_index(self, body: bytes) -> list[dict[str, Any]]: ...

    def admit(self, body_bytes: int, binary: bool) -> None:
        """Refuse (Overloaded) a request of `body_bytes` before its body is read; `binary`
        when it carries binary tensors (an Inference-Header-Content-Length header)."""

    async def infer(
        self, model: str, version: str, body: bytes, header_length: str | None
    ) -> http_codec.Reply: ...


class OipRestApi:
    """`RestApi` over the registry, the batcher and the metrics the gRPC servicers share."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        batcher: Batcher,
        metrics: Metrics,
        servicer: oip.InferenceServicer,
        max_images: int,
    ) -> None:
        self._registry = registry
        self._batcher = batcher
        self._metrics = metrics
        self._servicer = servicer
        self._max_images = max_images

    # --- health and metadata

    def ready(self) -> bool:
        return self._registry.ready

    def server_metadata(self) -> dict[str, Any]:
        meta = self._servicer.server_metadata()
        return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

    def model_ready(self, model: str, version: str) -> bool:
        number, label = tensors.parse_version(version)
        try:
            self._registry.resolve(model, number, label)
        except (NotFound, Unavailable):
            return False
        return True

    def model_metadata(self, model: str, version: str) -> dict[str, Any]:
        meta = self._servicer.model_metadata(model, version)

        def tensor(t: Any) -> dict[str, Any]:
            return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}

        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [tensor(t) for t in meta.inputs],
            "outputs": [tensor(t) for t in meta.outputs],
        }

    def model_config(self, model: str, version: str) -> dict[str, Any]:
        """Triton's model configuration as its JSON (service/api/oip_config.py, as gRPC's)."""
        return {"config": config_for(self._registry, self._servicer.batching, model, version)}

    def model_statistics(self, model: str, version: str) -> dict[str, Any]:
        """Triton's statistics as its JSON (service/api/oip_statistics.py, as gRPC's)."""
        return statistics_dict(self._metrics.version_statistics(),
                               versions_for(self._registry, model, version))

    def repository_index(self, body: bytes) -> list[dict[str, Any]]:
        doc = http_codec.load_json(body) if body.strip() else None
        ready = http_codec.optional_bool(doc, "ready")
        return [
            {"name": name, "version": version, "state": state, "reason": reason}
            for name, version, state, reason in self._servicer.repository_entries(ready)
        ]

    # --- inference

    def admit(self, body_bytes: int, binary: bool) -> None:
        self._batcher.admit_wire(wire_equivalent(body_bytes, binary))

    async def infer(
        self, model: str, version: str, body: bytes, header_length: str | None
    ) -> http_codec.Reply:
        """One request end to end through the data plane, counted before the caller hears
        back."""
        pipeline = RestInferPipeline(self._servicer.infer_pipeline, model, version,
                                     header_length, self._max_images)
        message = await self._servicer.plane.call(
            pipeline, body, None, wire_bytes=wire_equivalent(len(body), header_length is not None)
        )
        return http_codec.Reply(message, pipeline.json_bytes)


class RestInferPipeline:
    """One REST infer as a data-plane pipeline (made per request: the route carries the
    model and version, a header the binary layout): JSON/binary body -> `InferRequest` ->
    the v2 pipeline's `resolve` -> a job whose reply is the REST body. Encoded images (a
    BYTES input) are only parsed here: `resolve` checks them and the data plane decodes them
    in the decoder processes before queuing, as for gRPC."""

    method = METHOD

    def __init__(self, v2: InferPipeline, model: str, version: str,
                 header_length: str | None, max_images: int) -> None:
        self._v2 = v2
        self._model = model
        self._version = version
        self._header_length = header_length
        self._max_images = max_images
        self._request: http_codec.RestInfer | None = None
        self.json_bytes: int | None = None  # set by the encoder: binary tensors follow

    def prepare(self, raw: bytes, scope: RequestScope) -> InferJob:
        number, label = tensors.parse_version(self._version)
        # The route names the model and version: fail fast on them before the body is parsed
        # (a malformed body is then counted under the version it was sent to).
        self._v2.check(self._model, number, label, "", scope)
        request = http_codec.parse_infer(raw, self._header_length, self._max_images)
        self._request = request
        intermediate = InferRequest(id=request.id, model=self._model, version=number,
                                    label=label, x=request.x, outputs=request.outputs,
                                    routing_key=request.routing_key, blobs=request.blobs)
        return self._v2.resolve(intermediate, scope, len(raw), self._encode)

    def _encode(self, job: InferJob, prediction: Prediction) -> bytes:
        assert self._request is not None
        answered = prediction.version
        reply = http_codec.encode_infer(self._request, answered.name, answered.version,
                                        prediction.probabilities)
        self.json_bytes = reply.json_bytes
        return reply.body
