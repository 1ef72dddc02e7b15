"""What the HTTP front end needs from the core: the `RestApi` protocol, and `OipRestApi`,
its implementation over today's registry, batcher, metrics and v2 servicer.

The front end (service/http_frontend.py) owns sockets, HTTP framing, limits and the status
mapping; everything it asks of the service goes through `RestApi`, so it holds no business
logic and can be re-pointed at the data plane (issue 12: `DataPlane.call(pipeline, raw,
deadline)`, docs/architecture.md) by writing one more implementation of this protocol.
Until then `OipRestApi` does for REST what `oip.InferenceServicer._infer` does for gRPC:
admission of the wire bytes before parsing, parse + validate (service/http_codec.py over
service/oip_codec.py), resolve, `Batcher.submit`, encode, and one request's accounting
(in-flight, duration, images, status code) under `method="REST ModelInfer"`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import grpc

from service import http_codec, oip
from service import oip_codec as tensors
from service.batcher import CHARGE_PER_WIRE_BYTE, Batcher
from service.errors import NotFound, ServiceError, Unavailable, status_of
from service.metrics import Metrics
from service.registry import ModelRegistry

METHOD = "REST ModelInfer"  # the metrics' method label: one fixed value, beside "ModelInfer"


def wire_equivalent(body_bytes: int, binary: bool) -> int:
    """A REST body's size in the batcher's wire bytes, which it charges CHARGE_PER_WIRE_BYTE
    each (sized for protobuf, where float32 rows come from raw bytes). A REST request holds
    its body and its float32 rows until answered: at most 5x the body with binary UINT8
    pixels (1 byte each -> 4), 3x with JSON (every value takes 2 characters or more)."""
    most = body_bytes * (5 if binary else 3)
    return -(-most // CHARGE_PER_WIRE_BYTE)


class Unimplemented(ServiceError):
    """A protocol route this server does not serve (yet)."""

    code = grpc.StatusCode.UNIMPLEMENTED


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
        self.model_metadata(model, version)  # unknown model or version: 404 first
        raise Unimplemented(
            "model configuration is not served yet (Triton's ModelConfig, issue 13 part 3)"
        )

    def model_statistics(self, model: str, version: str) -> dict[str, Any]:
        if model:
            self.model_metadata(model, version)
        raise Unimplemented(
            "model statistics are not served yet (Triton's ModelStatistics, issue 13 part 3)"
        )

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
        """One request end to end, counted before the caller hears back."""
        started = time.perf_counter()
        inflight = self._metrics.inflight if self._metrics.enabled else None
        if inflight is not None:
            inflight.inc()
        images = 0
        code = grpc.StatusCode.OK
        answered_model = answered_version = ""
        try:
            wire = wire_equivalent(len(body), header_length is not None)
            self._batcher.admit_wire(wire)  # again: the queue may have filled meanwhile
            number, label = tensors.parse_version(version)
            sv = self._registry.resolve(model, number, label)  # fail fast: nothing unknown queues
            if not label:
                answered_model, answered_version = sv.name, str(sv.version)
            request = http_codec.parse_infer(body, header_length, self._max_images)
            images = int(request.x.shape[0])
            prediction = await self._batcher.submit(
                request.x, model=model, version=number, label=label, wire_bytes=wire
            )
            answered = prediction.version
            answered_model, answered_version = answered.name, str(answered.version)
            return http_codec.encode_infer(
                request, answered.name, answered.version, prediction.probabilities
            )
        except BaseException as e:
            code = (grpc.StatusCode.CANCELLED if isinstance(e, asyncio.CancelledError)
                    else status_of(e)[0])
            raise
        finally:
            if inflight is not None:
                inflight.dec()
            self._metrics.request_done(
                METHOD, answered_model, answered_version, code.name, images,
                time.perf_counter() - started,
            )
