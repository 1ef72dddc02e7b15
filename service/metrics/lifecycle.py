"""Model-lifecycle metrics: loads, loaded and current versions, the serving front end; and
encoded-image decoding (each decode costs ~1 ms in a decoder process, so one ordinary
`observe` per request is noise beside it).

The lifecycle ones change a few times a day, so they stay ordinary prometheus_client metrics
(public API), which work in multiprocess mode as they are (memory-mapped files, `livemax` gauges).
The registry's event subscriber that feeds them through `Metrics` is
service/registry/subscribers.py (metrics is a leaf: it imports nothing of the registry).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.metrics.definitions import LATENCY_BUCKETS_S, LOAD_BUCKETS_S

if TYPE_CHECKING:
    pass


class LifecycleMetrics:
    """The lifecycle metrics on one registry. In multiprocess mode a series cannot be removed
    (its value lives in a shared file): an unloaded version's gauge drops to 0 instead."""

    def __init__(self, r: CollectorRegistry, *, multiprocess: bool) -> None:
        self._multiprocess = multiprocess
        self.version_loaded = Gauge(
            "mnist_model_version_loaded",
            "1 for each model version loaded and servable (info-style; 0 once unloaded "
            "in multiprocess mode).",
            ["model", "version"], registry=r, multiprocess_mode="livemax",
        )
        self.current_version = Gauge(
            "mnist_model_current_version", "The version a request naming none gets.", ["model"],
            registry=r, multiprocess_mode="livemax",
        )
        self.loads = Counter(
            "mnist_model_loads", "Version load attempts, by result (success, failure).",
            ["model", "result"], registry=r,
        )
        self.load_duration = Histogram(
            "mnist_model_load_duration_seconds", "Time to load and validate a version.",
            ["model"], buckets=LOAD_BUCKETS_S, registry=r,
        )
        self.rejected = Counter(
            "mnist_model_rejected_versions", "Versions that failed validation, by reason.",
            ["model", "reason"], registry=r,
        )
        self.frontend = Gauge(
            "mnist_frontend_info",
            "1 for the gRPC front end that serves: 'core' (completion queue, proven by the "
            "startup self-test) or 'aio'.",
            ["frontend"], registry=r, multiprocess_mode="livemax",
        )

        self.image_decode_duration = Histogram(
            "mnist_image_decode_duration_seconds",
            "Time to decode and preprocess one request's encoded images (waiting for a "
            "decoder process included), by result (ok, failed).",
            ["result"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.image_decode_failures = Counter(
            "mnist_image_decode_failures",
            "Requests refused for an encoded image, by image format (the allow-list or "
            "'unknown') and reason (mnist_imaging.decode.REASONS).",
            ["format", "reason"], registry=r,
        )

    def image_decoded(self, seconds: float, failure: tuple[str, str] | None) -> None:
        self.image_decode_duration.labels("ok" if failure is None else "failed").observe(seconds)
        if failure is not None:
            self.image_decode_failures.labels(*failure).inc()

    def frontend_serves(self, frontend: str) -> None:
        self.frontend.labels(frontend).set(1)

    def loaded(self, model: str, version: int, load_s: float) -> None:
        self.loads.labels(model, "success").inc()
        self.load_duration.labels(model).observe(load_s)
        self.version_loaded.labels(model, str(version)).set(1)

    def failed(self, model: str, reason: str, load_s: float) -> None:
        self.loads.labels(model, "failure").inc()
        self.load_duration.labels(model).observe(load_s)
        self.rejected.labels(model, reason).inc()

    def refused(self, model: str, reason: str) -> None:
        self.rejected.labels(model, reason).inc()

    def unloaded(self, model: str, version: int) -> None:
        if self._multiprocess:
            self.version_loaded.labels(model, str(version)).set(0)
            return
        with contextlib.suppress(KeyError):
            self.version_loaded.remove(model, str(version))

    def current(self, model: str, version: int | None) -> None:
        """`None`: the model no longer serves (0 in multiprocess mode, else no series)."""
        if version is not None:
            self.current_version.labels(model).set(version)
        elif self._multiprocess:
            self.current_version.labels(model).set(0)
        else:
            with contextlib.suppress(KeyError):
                self.current_version.remove(model)
