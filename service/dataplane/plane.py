"""The one request path: admission, a pipeline, the batcher, the reply, one RequestScope.

`DataPlane.call` serves a request on the asyncio loop (any front end whose handlers are
coroutines: grpc.aio, the core front end's asyncio lane, HTTP). `DataPlane.fast_method` gives
a front end that answers on a thread of its own (service/frontends/core.py) the same request
path as a gate and a handler: the same admission, the same `Pipeline.prepare`, the same
`Job.encode`, but queued with `Batcher.submit_nowait` and answered from the batch. Both count
through `RequestScope`; the wire's own status mapping stays in the front end.

A job of encoded images (`job.x is None`) is decoded by `ImageDecoder` in its decoder
processes before it is queued: awaited on the loop in `call`, handed to the loop by the fast
lane (decoding never runs on the front end's thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

import grpc

from service.batching import Batcher, Prediction
from service.dataplane.images import ImageDecoder
from service.dataplane.job import Job, Pipeline, Responder
from service.dataplane.scope import RequestMetrics, RequestScope
from service.errors import ServiceError

log = logging.getLogger(__name__)

FastHandler = Callable[[Responder, bytes], None]
FastGate = Callable[[Responder, float], "bool | None"]


class FastMethod(NamedTuple):
    """A request path for a front end with a thread of its own (see service/frontends/core.py
    for when each runs): `gate(responder, waited_s)` before the message is read (True: read
    it; False: it refused the call; None: keep it waiting), then `handler(responder, raw)`,
    which never blocks nor raises."""

    gate: FastGate
    handler: FastHandler


class DataPlane:
    """Runs pipelines against the batcher for every front end; see the module docstring."""

    def __init__(self, batcher: Batcher, metrics: RequestMetrics,
                 images: ImageDecoder | None = None) -> None:
        self._batcher = batcher
        self._metrics = metrics
        self._images = images or ImageDecoder.off()

    async def call(self, pipeline: Pipeline, raw: bytes, deadline_s: float | None, *,
                   method: str = "", inflight: bool = True,
                   wire_bytes: int | None = None) -> bytes:
        """One request end to end on the event loop: the reply's bytes, or the exception
        (ServiceError, or a bug, logged here), counted before it returns or raises.
        `method` overrides the pipeline's metrics label (a stream counts each message);
        `wire_bytes`: what admission charges for `raw` when it is not protobuf (REST's JSON
        holds more per byte: service/frontends/http/api.py), else `len(raw)`."""
        scope = RequestScope(self._metrics, method or pipeline.method, inflight=inflight)
        try:
            # Before any decoding: a refusal is cheap.
            self._batcher.admit_wire(len(raw) if wire_bytes is None else wire_bytes)
            job = pipeline.prepare(raw, scope)
            if job.x is None:  # encoded images: decoded in the decoder processes
                started = time.monotonic()
                job.x = await self._images.decode(job.blobs, deadline_s)
                if deadline_s is not None:
                    deadline_s -= time.monotonic() - started
            prediction = await self._batcher.submit(
                job.x, model=job.model, version=job.version, label=job.label,
                deadline_s=deadline_s, wire_bytes=job.wire_bytes,
            )
            scope.answered_by(prediction.version)
            message = job.encode(prediction)
        except BaseException as e:
            if isinstance(e, Exception) and not isinstance(e, ServiceError):
                log.error("%s failed", scope.method, exc_info=e)
            scope.fail(e)
            raise
        scope.finish(grpc.StatusCode.OK)
        return message

    def fast_method(self, pipeline: Pipeline) -> FastMethod:
        """The gate and handler that serve `pipeline` on a front end's own thread."""
        lane = _FastLane(self._batcher, self._metrics, pipeline, self._images)
        return FastMethod(lane.gate, lane.handle)


class _FastLane:
    __slots__ = ("_batcher", "_images", "_method", "_metrics", "_pipeline")

    def __init__(self, batcher: Batcher, metrics: RequestMetrics, pipeline: Pipeline,
                 images: ImageDecoder) -> None:
        self._batcher = batcher
        self._metrics = metrics
        self._pipeline = pipeline
        self._method = pipeline.method
        self._images = images

    def gate(self, responder: Responder, waited_s: float) -> bool | None:
        """While the batcher sheds, the call waits unread at the door (a bounded time) or is
        refused, so a flood of retries costs neither a read nor a decode."""
        let_in = self._batcher.door(waited_s)
        if let_in is False:
            # Counted under model and version "": the least a refusal can cost the thread,
            # which under a flood answers thousands a second.
            scope = RequestScope(self._metrics, self._method, inflight=False, waited_s=waited_s)
            responder.fail(*scope.fail(self._batcher.refusal()))
        return let_in

    def handle(self, responder: Responder, raw: bytes) -> None:
        """Validate now and queue the rows for the batch the front end's thread computes
        when nothing more is arriving; the `_FastReply` answers. Never raises."""
        reply = _FastReply(self._metrics, self._method, responder)
        try:
            self._batcher.admit_wire(len(raw))  # before any decoding: a refusal is cheap
            job = self._pipeline.prepare(raw, reply)
            reply.job = job
            if job.x is None:  # encoded images: never decoded on this thread
                self._images.start_soon(self._decode_then_queue(job, reply, responder))
                return
            self._batcher.submit_nowait(
                job.x, reply, model=job.model, version=job.version, label=job.label,
                deadline_s=responder.time_remaining(), wire_bytes=job.wire_bytes,
            )
        except Exception as e:
            reply.set_exception(e)


    async def _decode_then_queue(self, job: Job, reply: _FastReply,
                                 responder: Responder) -> None:
        """`handle`'s continuation on the event loop for a job of encoded images."""
        try:
            job.x = await self._images.decode(job.blobs, responder.time_remaining())
            prediction = await self._batcher.submit(
                job.x, model=job.model, version=job.version, label=job.label,
                deadline_s=responder.time_remaining(), wire_bytes=job.wire_bytes,
            )
        except BaseException as e:
            reply.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        reply.set_result(prediction)


class _FastReply(RequestScope):
    """A fast call's scope, and the batcher's Waiter for it: one object a request."""

    __slots__ = ("job", "responder")

    def __init__(self, metrics: RequestMetrics, method: str, responder: Responder) -> None:
        super().__init__(metrics, method)
        self.responder = responder
        self.job: Job | None = None

    def done(self) -> bool:
        return False  # a client going away is noticed by the front end, not here

    def set_result(self, prediction: Prediction) -> None:
        assert self.job is not None
        self.answered_by(prediction.version)
        try:
            message = self.job.encode(prediction)
        except Exception as e:
            self.set_exception(e)
            return
        self.finish(grpc.StatusCode.OK)
        self.responder.reply(message)

    def set_exception(self, exception: BaseException) -> None:
        if not isinstance(exception, ServiceError):
            log.error("%s failed", self.method, exc_info=exception)
        self.responder.fail(*self.fail(exception))
