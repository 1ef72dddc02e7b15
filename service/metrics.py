"""Every Prometheus metric of the service, created once against a given registry.

Names are `mnist_<what>_<unit>` in base units. Labels are bounded: RPC method, model name,
model version (only loaded ones), gRPC code, class index, rejection reason. The rest of the
service calls the methods below, never prometheus_client directly, so a test can pass a fresh
CollectorRegistry and a benchmark can pass `Metrics.disabled()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# 100 microseconds to ~10 seconds, roughly x2.5 apart.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
LOAD_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NUM_CLASSES = 10


class Metrics:
    """The service's metrics. `enabled=False` keeps the calls but records nothing."""

    def __init__(self, registry: CollectorRegistry | None, *, enabled: bool = True) -> None:
        self.enabled = enabled and registry is not None
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.requests = Counter(
            "mnist_requests", "RPCs finished, by method, model, version and gRPC code.",
            ["method", "model", "version", "code"], registry=r,
        )
        self.images = Counter(
            "mnist_images", "Images in finished RPCs, by method, model, version and gRPC code.",
            ["method", "model", "version", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "mnist_request_duration_seconds", "RPC time from receipt to reply, by method.",
            ["method"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.queue_wait = Histogram(
            "mnist_batch_queue_wait_seconds", "Time a request waited in the batch queue.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.forward_duration = Histogram(
            "mnist_forward_duration_seconds", "Time of one batched forward pass.",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.batch_rows = Histogram(
            "mnist_batch_rows", "Images in one batched forward pass.",
            ["model"], buckets=BATCH_ROWS_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "mnist_batch_queue_rows", "Images waiting in the batch queue.", ["model"],
            registry=r,
        )
        self.inflight = Gauge(
            "mnist_inflight_requests", "RPCs being handled right now.", registry=r
        )
        self.version_loaded = Gauge(
            "mnist_model_version_loaded", "1 for each model version loaded and servable.",
            ["model", "version"], registry=r,
        )
        self.current_version = Gauge(
            "mnist_model_current_version", "The version a request naming none gets.", ["model"],
            registry=r,
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
        self.predictions = Counter(
            "mnist_predictions", "Predicted class of each image answered, by version.",
            ["model", "version", "class"], registry=r,
        )
        self.confidence = Histogram(
            "mnist_prediction_confidence_ratio",
            "Top-class probability of each image answered, by version.",
            ["model", "version"], buckets=CONFIDENCE_BUCKETS, registry=r,
        )

    @classmethod
    def disabled(cls) -> Metrics:
        return cls(None, enabled=False)

    # --- servicer

    def request_done(
        self, method: str, model: str, version: str, code: str, images: int, duration_s: float
    ) -> None:
        if not self.enabled:
            return
        self.requests.labels(method, model, version, code).inc()
        if images:
            self.images.labels(method, model, version, code).inc(images)
        self.request_duration.labels(method).observe(duration_s)

    # --- batcher

    def batch_done(
        self,
        model: str,
        version: int,
        queue_waits_s: Iterable[float],
        forward_s: float,
        probabilities: npt.NDArray[np.float32],
    ) -> None:
        """One forward pass: rows, time, each request's wait, and what the model answered."""
        if not self.enabled:
            return
        rows = probabilities.shape[0]
        self.batch_rows.labels(model).observe(rows)
        self.forward_duration.labels(model).observe(forward_s)
        wait = self.queue_wait.labels(model)
        for w in queue_waits_s:
            wait.observe(w)
        v = str(version)
        counts = np.bincount(probabilities.argmax(axis=1), minlength=NUM_CLASSES)
        for cls, n in enumerate(counts.tolist()):
            if n:
                self.predictions.labels(model, v, str(cls)).inc(n)
        confidence = self.confidence.labels(model, v)
        for p in probabilities.max(axis=1).tolist():
            confidence.observe(p)

    def set_queue_rows(self, model: str, rows: int) -> None:
        if self.enabled:
            self.queue_depth.labels(model).set(rows)

    # --- registry

    def version_available(self, model: str, version: int, load_s: float) -> None:
        if not self.enabled:
            return
        self.loads.labels(model, "success").inc()
        self.load_duration.labels(model).observe(load_s)
        self.version_loaded.labels(model, str(version)).set(1)

    def version_failed(self, model: str, version: int, reason: str, load_s: float) -> None:
        if not self.enabled:
            return
        self.loads.labels(model, "failure").inc()
        self.load_duration.labels(model).observe(load_s)
        self.rejected.labels(model, reason).inc()

    def version_unloaded(self, model: str, version: int) -> None:
        if not self.enabled:
            return
        v = str(version)
        for metric in (self.version_loaded, self.confidence):
            with contextlib.suppress(KeyError):
                metric.remove(model, v)
        for cls in range(NUM_CLASSES):
            with contextlib.suppress(KeyError):
                self.predictions.remove(model, v, str(cls))

    def set_current_version(self, model: str, version: int | None) -> None:
        if not self.enabled:
            return
        if version is None:
            with contextlib.suppress(KeyError):
                self.current_version.remove(model)
        else:
            self.current_version.labels(model).set(version)
