"""A fast call waiting for its batch: the glue between transport.FastCall and the batcher.

Classify (servicer.py) and the v2 ModelInfer (oip.py) are fast methods on a CoreServer: their
handlers run on gRPC core's polling thread, validate the request, and queue the images with
`Batcher.submit_nowait(x, answer)`. The `Answer` is the batcher's Waiter for that request:
when the batch is computed it encodes the reply, counts the request (before the client can
see the answer, so a scrape right after a reply includes it) and replies; a failure at any
step becomes the status `errors.status_of` gives it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from service.batching import Prediction
from service.errors import ServiceError, status_of
from service.metrics import Metrics
from service.transport import FastCall

log = logging.getLogger(__name__)


class Answer:
    """One fast call's Waiter; `encode` is set once the request is known to be valid."""

    __slots__ = ("_inflight", "_metrics", "call", "encode", "images", "method", "model",
                 "started", "version")

    def __init__(self, metrics: Metrics, method: str, call: FastCall) -> None:
        self._metrics = metrics
        self.method = method
        self.call = call
        self.encode: Callable[[Prediction], bytes] | None = None
        self.images = 0
        self.model = self.version = ""  # what a failure is counted under, once known
        self.started = time.perf_counter()
        self._inflight = metrics.inflight if metrics.enabled else None
        if self._inflight is not None:
            self._inflight.inc()

    def done(self) -> bool:
        return False  # a client going away is noticed by gRPC core, not here

    def set_result(self, prediction: Prediction) -> None:
        assert self.encode is not None
        sv = prediction.version
        self.model, self.version = sv.name, str(sv.version)
        try:
            message = self.encode(prediction)
        except Exception as e:
            self.set_exception(e)
            return
        self._count(grpc.StatusCode.OK)
        self.call.reply(message)

    def set_exception(self, exception: BaseException) -> None:
        if not isinstance(exception, ServiceError):
            log.error("%s failed", self.method, exc_info=exception)
        code, details = status_of(exception)
        self._count(code)
        self.call.fail(code, details)

    def _count(self, code: grpc.StatusCode) -> None:
        if self._inflight is not None:
            self._inflight.dec()
        self._metrics.request_done(self.method, self.model, self.version, code.name,
                                   self.images, time.perf_counter() - self.started)


def refuse(metrics: Metrics, method: str, call: FastCall, error: ServiceError,
           waited_s: float) -> None:
    """Answer a call refused at the door with `error` (its details carry no path), counted
    under model and version "": the least a refusal can cost the polling thread, which under
    a flood answers thousands a second. `waited_s`: how long it waited at the door."""
    metrics.request_done(method, "", "", error.code.name, 0, waited_s)
    call.fail(error.code, str(error))
