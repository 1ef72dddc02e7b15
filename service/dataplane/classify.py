"""mnist.v1 Classify as a pipeline: request bytes -> a validated, resolved job -> reply bytes.

The rules for a valid request live in service/codec.py; this module strings them together
for the data plane (service/dataplane/plane.py), whichever front end carried the bytes.
"""

from __future__ import annotations

from service import codec
from service.batcher import Array, Prediction
from service.dataplane.job import Job
from service.dataplane.scope import RequestScope
from service.registry import ModelRegistry


class ClassifyJob(Job):
    """A valid ClassifyRequest: its rows, and of the request only what the reply echoes."""

    __slots__ = ("packed", "request_id")

    def __init__(self, x: Array, model: str, version: int, label: str, wire_bytes: int,
                 request_id: str, packed: bool) -> None:
        super().__init__(x, model, version, label, wire_bytes)
        self.request_id = request_id
        self.packed = packed

    def encode(self, prediction: Prediction) -> bytes:
        message: bytes = codec.encode_response(
            prediction.probabilities, prediction.version, self.request_id, self.packed
        ).SerializeToString()
        return message


class ClassifyPipeline:
    """parse + validate + resolve for mnist.v1.ClassifyRequest bytes."""

    __slots__ = ("_max_images", "_registry", "method")

    def __init__(self, registry: ModelRegistry, *, max_images: int,
                 method: str = "Classify") -> None:
        self._registry = registry
        self._max_images = max_images
        self.method = method

    def prepare(self, raw: bytes, scope: RequestScope) -> ClassifyJob:
        request = codec.parse_request(raw)
        x = codec.decode_pixels(request, self._max_images)
        # Fail fast on an unknown model/version/label: nothing unknown is queued (the batch
        # resolves again at its time, and the request is counted under what answered it).
        self._registry.resolve(request.model, request.version, request.version_label)
        scope.images = int(x.shape[0])  # counted once the request is known to be valid
        return ClassifyJob(x, request.model, request.version, request.version_label, len(raw),
                           request.request_id, request.packed_output)
