"""One request's accounting, whatever lane served it: in-flight, duration, status code, count.

Every lane (the asyncio handlers, the completion-queue fast lane, a refusal at the door, the
metadata RPCs, any future front end) opens a `RequestScope` when the request arrives and
finishes it once, before the caller hears back (so a scrape right after a reply includes the
request). This is the only code that calls `Metrics.request_done` or moves `Metrics.inflight`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import grpc

from service.errors import status_of
from service.registry import ServableVersion


class _Count(Protocol):
    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class RequestMetrics(Protocol):
    """What a scope needs of `service.metrics.Metrics` (and what a test double provides)."""

    @property
    def enabled(self) -> bool: ...

    @property
    def inflight(self) -> _Count: ...

    def request_done(self, method: str, model: str, version: str, code: str, images: int,
                     duration_s: float) -> None: ...


class RequestScope:
    """The bookkeeping of one request from arrival to answer; `finish` counts it exactly once.

    `images`, `model` and `version` are what the request is counted under; the pipeline fills
    them in as it learns them (a request that fails before its version is known is counted
    under model and version "", never under a caller-chosen name)."""

    __slots__ = ("_inflight", "_metrics", "_open", "images", "method", "model", "started",
                 "version")

    def __init__(self, metrics: RequestMetrics, method: str, *, inflight: bool = True,
                 waited_s: float = 0.0) -> None:
        """`inflight`: count the request in `Metrics.inflight` until it finishes (the unary
        inference lanes do; stream messages, metadata RPCs and door refusals do not).
        `waited_s`: how long it had already waited before this scope opened (at the door)."""
        self._metrics = metrics
        self.method = method
        self.images = 0
        self.model = self.version = ""
        self.started = time.perf_counter() - waited_s
        self._open = True
        self._inflight = metrics.inflight if inflight and metrics.enabled else None
        if self._inflight is not None:
            self._inflight.inc()

    def answered_by(self, servable: ServableVersion) -> None:
        """The version that computed the answer: the request is counted under it."""
        self.model, self.version = servable.name, str(servable.version)

    def finish(self, code: grpc.StatusCode) -> None:
        """Count the request with `code`; later calls do nothing (one count per request)."""
        if not self._open:
            return
        self._open = False
        if self._inflight is not None:
            self._inflight.dec()
        self._metrics.request_done(self.method, self.model, self.version, code.name,
                                   self.images, time.perf_counter() - self.started)

    def fail(self, error: BaseException) -> tuple[grpc.StatusCode, str]:
        """Finish with the status `error` maps to (CANCELLED for a cancelled task); return the
        status and details for the front end to send."""
        if isinstance(error, asyncio.CancelledError):
            code, details = grpc.StatusCode.CANCELLED, "cancelled"
        else:
            code, details = status_of(error)
        self.finish(code)
        return code, details
