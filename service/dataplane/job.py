"""What a pipeline makes of a request (a `Job`) and what a pipeline is (`Pipeline`).

A pipeline is one API's `parse + validate + resolve`: request bytes in, a `Job` out, or a
`ServiceError` saying what is wrong. A job holds what the batcher needs (rows and which
version) and knows how to encode the reply from the batch's `Prediction`. Neither knows which
front end carried the bytes (service/dataplane/plane.py runs them for every lane).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import grpc

from service.batching import Array, Prediction
from service.dataplane.scope import RequestScope


class Job:
    """A valid request ready for the batcher. Subclasses add what their reply needs (not the
    parsed request: its pixels would stay alive until the reply).

    `x` is None while the request's rows are still encoded images (`blobs`, checked but not
    decoded): the data plane decodes them off the front end's thread, then queues the job."""

    __slots__ = ("blobs", "label", "model", "version", "wire_bytes", "x")

    def __init__(self, x: Array | None, model: str, version: int, label: str,
                 wire_bytes: int, blobs: Sequence[bytes] = ()) -> None:
        self.x = x
        self.model = model
        self.version = version
        self.label = label
        self.wire_bytes = wire_bytes
        self.blobs = blobs

    def encode(self, prediction: Prediction) -> bytes:
        """The reply's bytes for this request's rows of the batch."""
        raise NotImplementedError


class Pipeline(Protocol):
    """One API on one wire: `method` is the metrics label its requests are counted under."""

    @property
    def method(self) -> str: ...

    def prepare(self, raw: bytes, scope: RequestScope) -> Job:
        """Parse, validate completely and resolve (fail fast on an unknown model, version or
        label; the batch resolves again at its time). Raises ServiceError; fills
        `scope.images` (and `scope.model`/`version` once known)."""
        ...


class Responder(Protocol):
    """Who answers a fast-lane call: the completion-queue front end's call, or a test double.
    Answered exactly once, from any thread."""

    def time_remaining(self) -> float | None: ...

    def reply(self, message: bytes) -> None: ...

    def fail(self, code: grpc.StatusCode, details: str) -> None: ...
