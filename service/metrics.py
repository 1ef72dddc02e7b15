"""Every Prometheus metric of the service, created once against a given registry.

Names are `mnist_<what>_<unit>` in base units. Labels are bounded: RPC method, model name,
model version (only loaded ones), gRPC code, class index, rejection reason. The rest of the
service calls the methods below, never prometheus_client directly, so a test can pass a fresh
CollectorRegistry and a benchmark can pass `Metrics.disabled()`.

The request path stays cheap: label children are looked up once per label set and cached in
plain dicts, and a batch records its per-row values (queue waits, confidences, predicted
classes) with a few NumPy calls and one increment per histogram bucket instead of one
`observe()` per row.

With `--workers N` the parent calls `prepare_multiprocess()` before any worker imports
prometheus_client: every worker then writes its values to memory-mapped files in one
directory, the parent's exporter merges them (`MultiProcessCollector`), and
`worker_exited(pid)` drops a dead worker's live gauges. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from service.config import Settings
from service.registry_events import (
    CurrentChanged,
    NameRefused,
    RegistryEvent,
    VersionFailed,
    VersionLoaded,
    VersionUnloaded,
)

log = logging.getLogger(__name__)

# 100 microseconds to ~10 seconds, roughly x2.5 apart.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
LOAD_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NUM_CLASSES = 10
# Batches up to this many rows are recorded row by row in Python, bigger ones with NumPy.
SMALL_BATCH_ROWS = 8
# Rows of batches waiting to be recorded before batch_done records them itself.
MAX_PENDING_ROWS = 65536
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by the process that exports in multiprocess mode; its workers inherit it and stay quiet.
EXPORTER_PID_ENV = "MNIST_METRICS_EXPORTER_PID"
_CLASS_LABELS = tuple(str(c) for c in range(NUM_CLASSES))
# The model or version label of a request naming what this process never loaded.
UNKNOWN = "unknown"


def multiprocess_dir() -> Path | None:
    """The shared directory when this process records in multiprocess mode, else None."""
    value = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return Path(value) if value else None


def prepare_multiprocess(directory: Path) -> None:
    """In the parent, before starting workers: a shared directory without old values, in the env.

    prometheus_client picks its value storage when it is first imported, so workers must be
    fresh interpreters (spawned, or exec'd) that inherit this environment variable; files left
    by a previous run are removed so old counts do not leak into the new one
    (only `*.db` files are removed: the directory may be an operator's volume).
    """
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def worker_exited(pid: int) -> None:
    """In the parent, when a worker exits: forget its live gauges (in-flight, queue, versions).

    Its counters and histograms stay, so totals never go backwards.
    """
    directory = multiprocess_dir()
    if directory is not None:
        multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class _BulkHistogram:
    """One histogram child that takes a whole array of observations at once.

    `Histogram.observe` is a Python loop over the buckets per value; a batch of 256 rows would
    pay that 256 times. Here NumPy finds each value's bucket and every bucket is incremented
    once. It writes to the child's bucket and sum values, as `observe` does (storage that works
    in multiprocess mode too); tests/test_metrics.py checks it matches `observe` exactly, so a
    prometheus_client that changes those internals fails a test instead of miscounting.
    """

    __slots__ = ("_bounds", "_bounds_list", "_buckets", "_child", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._buckets = getattr(child, "_buckets", None)
        self._sum = getattr(child, "_sum", None)
        bounds = getattr(child, "_upper_bounds", None)
        self._bounds = np.asarray(bounds, dtype=np.float64) if bounds is not None else None
        self._bounds_list = list(bounds) if bounds is not None else []
        if self._buckets is None or self._sum is None or self._bounds is None:
            log.warning("prometheus_client internals changed: histograms use observe() per row")
            self._buckets = None

    def observe(self, value: float) -> None:
        """One value: a binary search instead of observe()'s scan of every bucket."""
        buckets = self._buckets
        if buckets is None or self._sum is None:
            self._child.observe(value)
            return
        self._sum.inc(value)
        i = bisect.bisect_left(self._bounds_list, value)
        if i < len(buckets):
            buckets[i].inc(1)

    def observe_many(self, values: npt.NDArray[Any]) -> None:
        if values.size == 0:
            return
        if self._buckets is None or self._bounds is None or self._sum is None:
            for v in values.tolist():
                self._child.observe(v)
            return
        index = np.searchsorted(self._bounds, values, side="left")
        counts = np.bincount(index, minlength=len(self._bounds))
        self._sum.inc(float(values.sum(dtype=np.float64)))  # float32 rows: sum like observe()
        buckets = self._buckets
        for i in np.flatnonzero(counts[: len(buckets)]).tolist():
            buckets[i].inc(int(counts[i]))


@dataclass(slots=True)
class _RequestChildren:
    requests: Any
    images: Any
    duration: _BulkHistogram


@dataclass(slots=True)
class _BatchChildren:
    rows: _BulkHistogram
    forward: _BulkHistogram
    wait: _BulkHistogram
    confidence: _BulkHistogram
    predictions: tuple[Any, ...]


class _LiveCount:
    """A gauge's inc()/dec() as plain arithmetic under a lock, for the in-flight count.

    The event loop and gRPC core's polling thread (service/transport.py) both change it; an
    uncontended lock costs ~0.1 us, a Gauge's inc() with its own lock and value object ~1 us.
    The exporter thread reads `n` when it collects.
    """

    __slots__ = ("_lock", "n")

    def __init__(self) -> None:
        self.n = 0.0
        self._lock = threading.Lock()

    def inc(self, amount: float = 1) -> None:
        with self._lock:
            self.n += amount

    def dec(self, amount: float = 1) -> None:
        with self._lock:
            self.n -= amount


_PendingBatch = tuple[_BatchChildren, Iterable[float], float, npt.NDArray[np.float32]]


class _FlushBeforeCollect(Collector):
    """Registered first on the registry: every collection records pending batches first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        self._metrics.flush()
        return []


def _add_process_collectors(registry: CollectorRegistry) -> None:
    """process_* and python_* series, once per registry (the default one already has them)."""
    # The default registry's collectors are module singletons; a fresh registry gets its own.
    existing = set(getattr(registry, "_collector_to_names", {}))
    if {PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR} & existing:
        return
    with contextlib.suppress(ValueError):  # already registered on this registry
        ProcessCollector(registry=registry)
    with contextlib.suppress(ValueError):
        PlatformCollector(registry=registry)
    with contextlib.suppress(ValueError):
        GCCollector(registry=registry)


class Metrics:
    """The service's metrics. `enabled=False` keeps the calls but records nothing."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        enabled: bool = True,
        process_metrics: bool = True,
    ) -> None:
        self.enabled = enabled and registry is not None
        self.multiprocess = self.enabled and multiprocess_dir() is not None
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        # Batches are recorded when the registry is collected (a scrape, get_sample_value),
        # not on the event loop between a batch's answers and the next batch. Multiprocess
        # mode records at once: its exporter reads files and never collects this registry.
        self._pending: collections.deque[_PendingBatch] = collections.deque()
        self._pending_rows = 0
        self._pending_requests: collections.deque[tuple[_RequestChildren, int, float]] = (
            collections.deque()
        )
        self._queue_rows: dict[str, int] = {}
        self._flush_lock = threading.Lock()
        self._defer = self.enabled and not self.multiprocess
        if self._defer:
            r.register(_FlushBeforeCollect(self))  # first, so the metrics below are current
        if self.enabled and process_metrics and not self.multiprocess:
            # In multiprocess mode the exporter adds the serving process's own instead.
            _add_process_collectors(r)
        self.requests = Counter(
            "mnist_requests", "RPCs finished, by method, model, version and gRPC code.",
            ["method", "model", "version", "code"], registry=r,
        )
        self.images = Counter(
            "mnist_images", "Images in finished RPCs, by method, model, version and gRPC code.",
            ["method", "model", "version", "code"], registry=r,
        )
        self.request_duration = Histogram(
            "mnist_request_duration_seconds",
            "RPC time from receipt to reply (end to end inside the server), by method and model.",
            ["method", "model"], buckets=LATENCY_BUCKETS_S, registry=r,
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
            registry=r, multiprocess_mode="livesum",
        )
        self.queue_bytes = Gauge(
            "mnist_batch_queue_bytes",
            "Bytes charged by queued and in-flight requests (bounded by --max-queue-bytes).",
            registry=r, multiprocess_mode="livesum",
        )
        self._queue_bytes = 0
        self._inflight_gauge = Gauge(
            "mnist_inflight_requests", "RPCs being handled right now.", registry=r,
            multiprocess_mode="livesum",
        )
        # Callers do `inflight.inc()` / `.dec()`; deferred, that is integer arithmetic and the
        # gauge is set at collection.
        self.inflight: _LiveCount | Gauge = (
            _LiveCount() if self._defer else self._inflight_gauge
        )
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
        self.predictions = Counter(
            "mnist_predictions", "Predicted class of each image answered, by version.",
            ["model", "version", "class"], registry=r,
        )
        self.confidence = Histogram(
            "mnist_prediction_confidence_ratio",
            "Top-class probability of each image answered, by version.",
            ["model", "version"], buckets=CONFIDENCE_BUCKETS, registry=r,
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
        self.frontend = Gauge(
            "mnist_frontend_info",
            "1 for the gRPC front end that serves: 'core' (completion queue, proven by the "
            "startup self-test) or 'aio'.",
            ["frontend"], registry=r, multiprocess_mode="livemax",
        )
        # Model names and versions this process has loaded: the only values a model or
        # version label takes besides '' (not chosen yet) and UNKNOWN. Callers pass what a
        # request named; a caller-chosen string must never create a series.
        self._loaded: dict[str, set[str]] = {}
        # Label children, created on first use and then found with one dict lookup.
        self._request_children: dict[tuple[str, str, str, str], _RequestChildren] = {}
        self._batch_children: dict[tuple[str, int], _BatchChildren] = {}
        self._queue_children: dict[str, Any] = {}
        self._children_lock = threading.Lock()

    @classmethod
    def disabled(cls) -> Metrics:
        return cls(None, enabled=False)

    def image_decoded(self, seconds: float, failure: tuple[str, str] | None = None) -> None:
        """One request's images decoded, or refused for (format, reason); both from the fixed
        sets of mnist_imaging.decode, never a caller's string."""
        if not self.enabled:
            return
        self.image_decode_duration.labels("ok" if failure is None else "failed").observe(seconds)
        if failure is not None:
            self.image_decode_failures.labels(*failure).inc()

    def set_frontend(self, frontend: str) -> None:
        if self.enabled:
            self.frontend.labels(frontend).set(1)

    def _model_label(self, model: str) -> str:
        return model if model == "" or model in self._loaded else UNKNOWN

    def _version_label(self, model: str, version: str) -> str:
        if version == "":
            return version
        versions = self._loaded.get(model)
        return version if versions is not None and version in versions else UNKNOWN

    # --- servicer

    def request_done(
        self, method: str, model: str, version: str, code: str, images: int, duration_s: float
    ) -> None:
        """One finished RPC. `version` is '' when the request failed before one was chosen."""
        if not self.enabled:
            return
        key = (method, model, version, code)
        c = self._request_children.get(key)
        if c is None:
            # Not cached: a first request, or names nobody loaded (then counted as UNKNOWN,
            # and the cache keeps only the bounded key).
            key = (method, self._model_label(model), self._version_label(model, version), code)
            c = self._request_children.get(key) or self._request_children_for(key)
        if not self._defer:
            c.requests.inc()
            if images:
                c.images.inc(images)
            c.duration.observe(duration_s)
            return
        self._pending_requests.append((c, images, duration_s))
        if len(self._pending_requests) > MAX_PENDING_ROWS:
            self.flush()

    def _request_children_for(self, key: tuple[str, str, str, str]) -> _RequestChildren:
        with self._children_lock:
            c = self._request_children.get(key)
            if c is None:
                method, model, _, _ = key
                c = _RequestChildren(
                    self.requests.labels(*key),
                    self.images.labels(*key),
                    _BulkHistogram(self.request_duration.labels(method, model)),
                )
                self._request_children[key] = c
            return c

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
        c = self._batch_children.get((model, version))
        if c is None:  # (no label check: a batch only ever runs a loaded version)
            c = self._batch_children_for(model, version)
        if not self._defer:
            self._record_batches(c, [forward_s], list(queue_waits_s), [probabilities])
            return
        self._pending.append((c, queue_waits_s, forward_s, probabilities))
        self._pending_rows += probabilities.shape[0]
        if self._pending_rows > MAX_PENDING_ROWS:  # nobody scrapes: bound the memory held
            self.flush()

    def flush(self) -> None:
        """Record the batches waiting to be recorded (thread-safe; the exporter calls it)."""
        with self._flush_lock:
            self._pending_rows = 0
            self._record_pending_batches()
            self._record_requests()
            if isinstance(self.inflight, _LiveCount):
                self._inflight_gauge.set(self.inflight.n)
            self.queue_bytes.set(self._queue_bytes)
            for model, rows in list(self._queue_rows.items()):
                child = self._queue_children.get(model)
                if child is None:
                    child = self._queue_children.setdefault(model, self.queue_depth.labels(model))
                child.set(rows)

    def _record_requests(self) -> None:
        """The queued requests, one increment per label set and bucket."""
        pending = self._pending_requests
        grouped: dict[int, tuple[_RequestChildren, list[int], list[float]]] = {}
        while pending:
            c, images, duration_s = pending.popleft()
            g = grouped.get(id(c))
            if g is None:
                g = grouped[id(c)] = (c, [], [])
            g[1].append(images)
            g[2].append(duration_s)
        for c, images_list, durations in grouped.values():
            c.requests.inc(len(durations))
            total = sum(images_list)
            if total:
                c.images.inc(total)
            c.duration.observe_many(np.asarray(durations, dtype=np.float64))

    def _record_pending_batches(self) -> None:
        """The queued batches, grouped per label set: one bulk record per group, so a scrape
        costs a few NumPy calls per model version rather than ~25 us per batch."""
        pending = self._pending
        grouped: dict[int, tuple[_BatchChildren, list[float], list[float],
                                 list[npt.NDArray[np.float32]]]] = {}
        while pending:
            c, queue_waits_s, forward_s, probabilities = pending.popleft()
            g = grouped.get(id(c))
            if g is None:
                g = grouped[id(c)] = (c, [], [], [])
            g[1].append(forward_s)
            g[2].extend(queue_waits_s)
            g[3].append(probabilities)
        for c, forwards, waits, arrays in grouped.values():
            self._record_batches(c, forwards, waits, arrays)

    def _record_batches(
        self,
        c: _BatchChildren,
        forwards_s: list[float],
        queue_waits_s: list[float],
        probabilities: list[npt.NDArray[np.float32]],
    ) -> None:
        """Batches of one model version: one forward time and one probabilities array each,
        every request's queue wait."""
        rows = [p.shape[0] for p in probabilities]
        if len(rows) == 1:
            c.rows.observe(rows[0])
            c.forward.observe(forwards_s[0])
        else:
            c.rows.observe_many(np.asarray(rows, dtype=np.float64))
            c.forward.observe_many(np.asarray(forwards_s, dtype=np.float64))
        if sum(rows) <= SMALL_BATCH_ROWS:
            # NumPy's fixed cost per call (~1 µs, a dozen calls) outweighs its speed here.
            for w in queue_waits_s:
                c.wait.observe(w)
            predictions = c.predictions
            for p in probabilities:
                for row in p.tolist():
                    top = max(row)
                    predictions[row.index(top)].inc()
                    c.confidence.observe(top)
            return
        c.wait.observe_many(np.asarray(queue_waits_s, dtype=np.float64))
        probs = probabilities[0] if len(probabilities) == 1 else np.concatenate(probabilities)
        counts = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
        predictions = c.predictions
        for cls in np.flatnonzero(counts[:NUM_CLASSES]).tolist():
            predictions[cls].inc(int(counts[cls]))
        c.confidence.observe_many(probs.max(axis=1))

    def _batch_children_for(self, model: str, version: int) -> _BatchChildren:
        with self._children_lock:
            c = self._batch_children.get((model, version))
            if c is None:
                v = str(version)
                c = _BatchChildren(
                    rows=_BulkHistogram(self.batch_rows.labels(model)),
                    forward=_BulkHistogram(self.forward_duration.labels(model)),
                    wait=_BulkHistogram(self.queue_wait.labels(model)),
                    confidence=_BulkHistogram(self.confidence.labels(model, v)),
                    predictions=tuple(
                        self.predictions.labels(model, v, cls) for cls in _CLASS_LABELS
                    ),
                )
                self._batch_children[(model, version)] = c
            return c

    def set_queue_bytes(self, held: int) -> None:
        if not self.enabled:
            return
        if self._defer:
            self._queue_bytes = held
        else:
            self.queue_bytes.set(held)

    def set_queue_rows(self, model: str, rows: int) -> None:
        if not self.enabled:
            return
        if model not in self._loaded:
            model = UNKNOWN
        if self._defer:
            self._queue_rows[model] = rows
            return
        child = self._queue_children.get(model)
        if child is None:
            child = self._queue_children.setdefault(model, self.queue_depth.labels(model))
        child.set(rows)

    # --- registry

    def version_available(self, model: str, version: int, load_s: float) -> None:
        if not self.enabled:
            return
        with self._children_lock:
            self._loaded = {**self._loaded, model: {*self._loaded.get(model, ()), str(version)}}
        self.loads.labels(model, "success").inc()
        self.load_duration.labels(model).observe(load_s)
        self.version_loaded.labels(model, str(version)).set(1)

    def version_failed(self, model: str, version: int, reason: str, load_s: float) -> None:
        if not self.enabled:
            return
        self.loads.labels(model, "failure").inc()
        self.load_duration.labels(model).observe(load_s)
        self.rejected.labels(model, reason).inc()

    def name_refused(self, model: str, reason: str) -> None:
        """A repository entry that cannot be a version (or model): counted, never loaded."""
        if self.enabled:
            self.rejected.labels(model, reason).inc()

    def version_unloaded(self, model: str, version: int) -> None:
        """Drop the version's series so dashboards show only what serves.

        Multiprocess mode cannot remove a series (the value lives in a shared file): there the
        loaded gauge drops to 0 and the version's counters stay, frozen.
        """
        if not self.enabled:
            return
        v = str(version)
        self.flush()  # its pending batches go to the series about to be removed
        with self._children_lock:  # its cached children would point at removed series
            self._batch_children.pop((model, version), None)
        if self.multiprocess:
            self.version_loaded.labels(model, v).set(0)
            return
        for metric in (self.version_loaded, self.confidence):
            with contextlib.suppress(KeyError):
                metric.remove(model, v)
        for cls in _CLASS_LABELS:
            with contextlib.suppress(KeyError):
                self.predictions.remove(model, v, cls)

    def set_current_version(self, model: str, version: int | None) -> None:
        """`None`: the model no longer serves (0 in multiprocess mode, else no series)."""
        if not self.enabled:
            return
        if version is not None:
            self.current_version.labels(model).set(version)
        elif self.multiprocess:
            self.current_version.labels(model).set(0)
        else:
            with contextlib.suppress(KeyError):
                self.current_version.remove(model)


class RegistryMetrics:
    """Registry events -> the model metrics: the registry's subscriber (it never calls Metrics).

    `ModelRegistry(model_dir, metrics)` subscribes one; the metric names, labels and values
    are those the registry used to set directly.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, event: RegistryEvent) -> None:
        m = self._metrics
        if isinstance(event, VersionLoaded):
            m.version_available(event.model, event.version, event.load_s)
        elif isinstance(event, VersionFailed):
            m.version_failed(event.model, event.version, event.reason, event.load_s)
        elif isinstance(event, VersionUnloaded):
            m.version_unloaded(event.model, event.version)
        elif isinstance(event, CurrentChanged):
            m.set_current_version(event.model, event.current)
        elif isinstance(event, NameRefused):
            m.name_refused(event.model, event.reason)


# --- the /metrics endpoint


def exposition_registry(metrics: Metrics | None) -> CollectorRegistry:
    """What /metrics serves: this process's registry, or every worker's values merged."""
    directory = multiprocess_dir()
    if directory is None:
        if metrics is None:
            raise ValueError("single-process exporter needs the Metrics it serves")
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    _add_process_collectors(registry)  # the exporting process's own process_*/python_*
    return registry


@dataclass(frozen=True, slots=True)
class Exporter:
    """A running /metrics HTTP endpoint; `stop()` closes it and waits for its thread."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_exporter(settings: Settings, metrics: Metrics | None) -> Exporter | None:
    """Serve /metrics on settings.metrics_host:metrics_port (0 picks a free port).

    Returns None when metrics are disabled, and in a worker whose supervisor already exports
    for every worker (multiprocess mode). There `metrics` may be None: the supervisor records
    nothing itself and serves the workers' merged values.
    """
    if not settings.metrics_enabled:
        return None
    multi = multiprocess_dir() is not None
    owner = os.environ.get(EXPORTER_PID_ENV)
    if multi and owner and owner != str(os.getpid()):
        return None
    registry = exposition_registry(metrics)
    server, thread = start_http_server(
        settings.metrics_port, addr=settings.metrics_host, registry=registry
    )
    if multi:
        os.environ[EXPORTER_PID_ENV] = str(os.getpid())  # before the workers start
    port = int(server.server_port)
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    return Exporter(settings.metrics_host, port, server, thread)
