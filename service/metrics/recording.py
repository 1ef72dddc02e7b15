"""Recording: what the rest of the service calls, kept cheap on the request path.

`Metrics` is the one object the servicers, the batcher and the registry's subscriber call
(`request_done`, `batch_done`, `inflight`, `set_queue_rows`, ...). On the request path a call
only appends to a deque (atomic, no lock) or does integer arithmetic; what waits is recorded
into the service's own counts (service/metrics/counts.py) when the registry is collected (a
scrape, `get_sample_value` in tests), in multiprocess mode when the snapshot writer runs, or
once MAX_PENDING_ROWS rows wait. Recording groups the waiting entries per label set and adds
them with a few NumPy calls. A custom collector (service/metrics/collector.py) emits the counts
as metric families: no prometheus_client metric object, let alone its private fields, is on
the request path.

Model-lifecycle metrics (loads, loaded versions, current version, front end) change a few
times a day: they stay ordinary prometheus_client metrics (service/metrics/lifecycle.py),
which also work in multiprocess mode as they are.

Labels are bounded: `model` and `version` only ever name a version this process loaded (else
UNKNOWN, or '' for "not chosen yet"), so no caller-chosen string creates a series.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from service.metrics import definitions as d
from service.metrics.collector import CountsCollector, families
from service.metrics.counts import Cell, Hist, Store
from service.metrics.exporter import add_process_collectors
from service.metrics.lifecycle import LifecycleMetrics
from service.metrics.multiprocess import SnapshotWriter, multiprocess_dir
from service.metrics.version_stats import INFER_METHODS, VersionStats

# Batches up to this many rows are recorded row by row in Python, bigger ones with NumPy.
SMALL_BATCH_ROWS = 8
# Rows (and requests) waiting to be recorded before the request path records them itself.
MAX_PENDING_ROWS = 65536
UNKNOWN = d.UNKNOWN
# Re-exported for callers and tests that used them from service.metrics.
LATENCY_BUCKETS_S = d.LATENCY_BUCKETS_S
CONFIDENCE_BUCKETS = d.CONFIDENCE_BUCKETS


class _RequestSeries:
    __slots__ = ("duration", "images", "ok", "requests", "stats")

    def __init__(self, requests: Cell, images: Cell, duration: Hist,
                 stats: VersionStats | None, ok: bool) -> None:
        self.requests, self.images, self.duration = requests, images, duration
        # An inference request on a loaded version also counts in Triton's statistics.
        self.stats, self.ok = stats, ok


class _BatchSeries:
    __slots__ = ("confidence", "forward", "predictions", "rows", "stats", "wait")

    def __init__(self, rows: Hist, forward: Hist, wait: Hist, confidence: Hist,
                 predictions: tuple[Cell, ...], stats: VersionStats) -> None:
        self.rows, self.forward, self.wait = rows, forward, wait
        self.confidence, self.predictions, self.stats = confidence, predictions, stats


class _Group:
    """Waiting batches of one label set, gathered for one bulk record."""

    __slots__ = ("arrays", "finished_s", "forwards", "requests", "series", "waits")

    def __init__(self, series: _BatchSeries) -> None:
        self.series = series
        self.forwards: list[float] = []
        self.waits: list[float] = []
        self.requests: list[int] = []  # requests per batch
        self.arrays: list[npt.NDArray[np.float32]] = []
        self.finished_s = 0.0


class LiveCount:
    """A gauge's inc()/dec() as plain arithmetic under a lock, for the in-flight count.

    The event loop and gRPC core's polling thread (service/transport.py) both change it; an
    uncontended lock costs ~0.1 us. The collector reads `n`.
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


# (series, each request's queue wait, forward time, probabilities, when it finished)
_PendingBatch = tuple[_BatchSeries, Iterable[float], float, npt.NDArray[np.float32], float]


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
        directory = multiprocess_dir() if self.enabled else None
        self.multiprocess = directory is not None
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registry = r
        self.counts = Store()
        self._lock = threading.Lock()  # guards self.counts and the series caches
        self._pending: collections.deque[_PendingBatch] = collections.deque()
        self._pending_rows = 0
        self._pending_requests: collections.deque[tuple[_RequestSeries, int, float]] = (
            collections.deque()
        )
        self._queue_rows: dict[str, int] = {}
        self._queue_bytes = 0
        self.inflight = LiveCount()
        # Model names and versions this process has loaded: the only values a model or
        # version label takes besides '' (not chosen yet) and UNKNOWN.
        self._loaded: dict[str, set[str]] = {}
        self._request_children: dict[tuple[str, str, str, str], _RequestSeries] = {}
        self._batch_children: dict[tuple[str, int], _BatchSeries] = {}
        self._version_stats: dict[tuple[str, int], VersionStats] = {}
        if self.enabled:
            r.register(CountsCollector(self._families))
            if process_metrics and not self.multiprocess:
                # In multiprocess mode the exporter adds the serving process's own instead.
                add_process_collectors(r)
        self.lifecycle = LifecycleMetrics(r, multiprocess=self.multiprocess)
        self._writer: SnapshotWriter | None = None
        if directory is not None:
            self._writer = SnapshotWriter(directory, self._snapshot)

    @classmethod
    def disabled(cls) -> Metrics:
        return cls(None, enabled=False)

    def close(self) -> None:
        """Stop the multiprocess snapshot writer after one last snapshot (no-op otherwise)."""
        if self._writer is not None:
            self._writer.stop()

    def image_decoded(self, seconds: float, failure: tuple[str, str] | None = None) -> None:
        """One request's images decoded, or refused for (format, reason); both from the fixed
        sets of mnist_imaging.decode, never a caller's string."""
        if self.enabled:
            self.lifecycle.image_decoded(seconds, failure)

    def set_frontend(self, frontend: str) -> None:
        if self.enabled:
            self.lifecycle.frontend_serves(frontend)

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
        s = self._request_children.get(key)
        if s is None:
            # Not cached: a first request, or names nobody loaded (then counted as UNKNOWN,
            # and the cache keeps only the bounded key).
            key = (method, self._model_label(model), self._version_label(model, version), code)
            s = self._request_children.get(key) or self._request_children_for(key)
        self._pending_requests.append((s, images, duration_s))
        if len(self._pending_requests) > MAX_PENDING_ROWS:
            self.flush()

    def _request_children_for(self, key: tuple[str, str, str, str]) -> _RequestSeries:
        with self._lock:
            s = self._request_children.get(key)
            if s is None:
                c = self.counts
                method, model, version, code = key
                stats = None
                if method in INFER_METHODS and version.isdigit():  # (a loaded version)
                    stats = self._stats_for(model, int(version))
                s = _RequestSeries(c.cell(d.REQUESTS, key), c.cell(d.IMAGES, key),
                                   c.hist(d.REQUEST_DURATION, key[:2]), stats, code == "OK")
                self._request_children[key] = s
            return s

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
        s = self._batch_children.get((model, version))
        if s is None:  # (no label check: a batch only ever runs a loaded version)
            s = self._batch_children_for(model, version)
        self._pending.append((s, queue_waits_s, forward_s, probabilities, time.time()))
        self._pending_rows += probabilities.shape[0]
        if self._pending_rows > MAX_PENDING_ROWS:  # nobody scrapes: bound the memory held
            self.flush()

    def _batch_children_for(self, model: str, version: int) -> _BatchSeries:
        with self._lock:
            s = self._batch_children.get((model, version))
            if s is None:
                v, c = str(version), self.counts
                s = _BatchSeries(
                    rows=c.hist(d.BATCH_ROWS, (model,)),
                    forward=c.hist(d.FORWARD_DURATION, (model,)),
                    wait=c.hist(d.QUEUE_WAIT, (model,)),
                    confidence=c.hist(d.CONFIDENCE, (model, v)),
                    predictions=tuple(c.cell(d.PREDICTIONS, (model, v, cls))
                                      for cls in d.CLASS_LABELS),
                    stats=self._stats_for(model, version),
                )
                self._batch_children[(model, version)] = s
            return s

    def _stats_for(self, model: str, version: int) -> VersionStats:
        """(under self._lock)"""
        stats = self._version_stats.get((model, version))
        if stats is None:
            stats = self._version_stats[(model, version)] = VersionStats()
        return stats

    def version_statistics(self) -> dict[tuple[str, int], VersionStats]:
        """Triton's per-version statistics, current (what waits is recorded first): copies
        keyed by (model, version), for the v2 ModelStatistics RPC and HTTP endpoint."""
        with self._lock:
            self._record_locked()
            return {k: v.copy() for k, v in self._version_stats.items()}

    def set_queue_bytes(self, held: int) -> None:
        if self.enabled:
            self._queue_bytes = held

    def set_queue_rows(self, model: str, rows: int) -> None:
        if not self.enabled:
            return
        if model not in self._loaded:
            model = UNKNOWN
        self._queue_rows[model] = rows

    # --- recording what waits

    def flush(self) -> None:
        """Record what waits into the counts (thread-safe; the collector calls it)."""
        with self._lock:
            self._record_locked()

    def _record_locked(self) -> None:
        self._pending_rows = 0
        self._record_batches_pending()
        self._record_requests()
        c = self.counts
        c.cell(d.INFLIGHT, ()).value = self.inflight.n
        c.cell(d.QUEUE_BYTES, ()).value = float(self._queue_bytes)
        for model, rows in list(self._queue_rows.items()):
            c.cell(d.QUEUE_ROWS, (model,)).value = float(rows)

    def _families(self) -> list[Metric]:
        """The collector's read: record what waits, then the counts as metric families."""
        with self._lock:
            self._record_locked()
            return families(self.counts)

    def _snapshot(self) -> dict[str, Any]:
        """The snapshot writer's read (multiprocess mode): the counts as one JSON document."""
        with self._lock:
            self._record_locked()
            return self.counts.to_json(live=(d.INFLIGHT, d.QUEUE_ROWS, d.QUEUE_BYTES))

    def _record_requests(self) -> None:
        """The queued requests, one addition per label set and a bulk histogram record."""
        pending = self._pending_requests
        grouped: dict[int, tuple[_RequestSeries, list[int], list[float]]] = {}
        while pending:
            s, images, duration_s = pending.popleft()
            g = grouped.get(id(s))
            if g is None:
                g = grouped[id(s)] = (s, [], [])
            g[1].append(images)
            g[2].append(duration_s)
        for s, images_list, durations in grouped.values():
            if s.stats is not None:
                s.stats.requests_done(s.ok, durations)
            s.requests.value += len(durations)
            s.images.value += sum(images_list)
            if len(durations) == 1:
                s.duration.observe(durations[0])
            else:
                s.duration.observe_many(np.asarray(durations, dtype=np.float64))

    def _record_batches_pending(self) -> None:
        """The queued batches, grouped per label set: one bulk record per group, so a scrape
        costs a few NumPy calls per model version rather than ~25 us per batch."""
        pending = self._pending
        grouped: dict[int, _Group] = {}
        while pending:
            s, queue_waits_s, forward_s, probabilities, finished_s = pending.popleft()
            g = grouped.get(id(s))
            if g is None:
                g = grouped[id(s)] = _Group(s)
            g.forwards.append(forward_s)
            before = len(g.waits)
            g.waits.extend(queue_waits_s)
            g.requests.append(len(g.waits) - before)
            g.arrays.append(probabilities)
            g.finished_s = max(g.finished_s, finished_s)
        for g in grouped.values():
            g.series.stats.batches_done(
                [p.shape[0] for p in g.arrays], g.forwards, g.requests, g.waits,
                int(g.finished_s * 1000),
            )
            self._record_batches(g.series, g.forwards, g.waits, g.arrays)

    def _record_batches(
        self,
        s: _BatchSeries,
        forwards_s: list[float],
        queue_waits_s: list[float],
        probabilities: list[npt.NDArray[np.float32]],
    ) -> None:
        """Batches of one model version: one forward time and one probabilities array each,
        every request's queue wait."""
        rows = [p.shape[0] for p in probabilities]
        if len(rows) == 1:
            s.rows.observe(rows[0])
            s.forward.observe(forwards_s[0])
        else:
            s.rows.observe_many(np.asarray(rows, dtype=np.float64))
            s.forward.observe_many(np.asarray(forwards_s, dtype=np.float64))
        predictions = s.predictions
        if sum(rows) <= SMALL_BATCH_ROWS:
            # NumPy's fixed cost per call (~1 us, a dozen calls) outweighs its speed here.
            for w in queue_waits_s:
                s.wait.observe(w)
            for p in probabilities:
                for row in p.tolist():
                    top = max(row)
                    predictions[row.index(top)].value += 1
                    s.confidence.observe(top)
            return
        s.wait.observe_many(np.asarray(queue_waits_s, dtype=np.float64))
        probs = probabilities[0] if len(probabilities) == 1 else np.concatenate(probabilities)
        counts = np.bincount(probs.argmax(axis=1), minlength=d.NUM_CLASSES)
        for cls in np.flatnonzero(counts[: d.NUM_CLASSES]).tolist():
            predictions[cls].value += int(counts[cls])
        s.confidence.observe_many(probs.max(axis=1))

    # --- registry (RegistryMetrics calls these on the registry's events)

    def version_available(self, model: str, version: int, load_s: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._loaded = {**self._loaded, model: {*self._loaded.get(model, ()), str(version)}}
        self.lifecycle.loaded(model, version, load_s)

    def version_failed(self, model: str, version: int, reason: str, load_s: float) -> None:
        if self.enabled:
            self.lifecycle.failed(model, reason, load_s)

    def name_refused(self, model: str, reason: str) -> None:
        """A repository entry that cannot be a version (or model): counted, never loaded."""
        if self.enabled:
            self.lifecycle.refused(model, reason)

    def version_unloaded(self, model: str, version: int) -> None:
        """Drop the version's series so dashboards show only what serves."""
        if not self.enabled:
            return
        v = str(version)
        with self._lock:
            self._record_locked()  # its pending batches go to the series about to be removed
            self._batch_children.pop((model, version), None)
            self.counts.remove(d.CONFIDENCE, {0: model, 1: v})
            self.counts.remove(d.PREDICTIONS, {0: model, 1: v})
        self.lifecycle.unloaded(model, version)

    def set_current_version(self, model: str, version: int | None) -> None:
        """`None`: the model no longer serves."""
        if self.enabled:
            self.lifecycle.current(model, version)
