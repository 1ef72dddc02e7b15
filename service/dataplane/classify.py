"""mnist.v1 Classify as a pipeline: request bytes -> a validated, resolved job -> reply bytes.

The rules for a valid request live in service/dataplane/codec.py; this module strings them together
for the data plane (service/dataplane/plane.py), whichever front end carried the bytes.
"""

from __future__ import annotations

from service.batching import Array, Prediction
from service.dataplane import codec
from service.dataplane.images import ImageDecoder, classify_blobs
from service.dataplane.job import Job
from service.dataplane.scope import RequestScope
from service.registry import ModelRegistry


class ClassifyJob(Job):
    """A valid ClassifyRequest: its rows, and of the request only what the reply echoes."""

    __slots__ = ("packed", "request_id")

    def __init__(self, x: Array | None, model: str, version: int, label: str, wire_bytes: int,
                 request_id: str, packed: bool, blobs: list[bytes]) -> None:
        super().__init__(x, model, version, label, wire_bytes, blobs)
        self.request_id = request_id
        self.packed = packed

    def encode(self, prediction: Prediction) -> bytes:
        message: bytes = codec.encode_response(
            prediction.probabilities, prediction.version, self.request_id, self.packed
        ).SerializeToString()
        return message


class ClassifyPipeline:
    """parse + validate + resolve for mnist.v1.ClassifyRequest bytes."""

    __slots__ = ("_images", "_max_images", "_registry", "method")

    def __init__(self, registry: ModelRegistry, *, max_images: int,
                 images: ImageDecoder | None = None, method: str = "Classify") -> None:
        self._registry = registry
        self._max_images = max_images
        self._images = images or ImageDecoder.off()
        self.method = method

    def prepare(self, raw: bytes, scope: RequestScope) -> ClassifyJob:
        request = codec.parse_request(raw)
        x: Array | None = None
        blobs: list[bytes] = []
        if request.images:  # encoded images: checked now, decoded off this thread
            blobs = classify_blobs(request)
            self._images.check(blobs, self._max_images)
        else:
            x = codec.decode_pixels(request, self._max_images)
        # A canary is chosen once, here, and the request queued under its number.
        version = self._registry.route(request.model, request.version, request.version_label,
                                       request.routing_key)
        # Fail fast on an unknown model/version/label: nothing unknown is queued (the batch
        # resolves again at its time, and the request is counted under what answered it).
        self._registry.resolve(request.model, version, request.version_label)
        # Counted once the request is known to be valid.
        scope.images = len(blobs) if x is None else int(x.shape[0])
        return ClassifyJob(x, request.model, version, request.version_label, len(raw),
                           request.request_id, request.packed_output, blobs)
