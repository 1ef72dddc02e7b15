"""Watching candidates on live traffic: canary rollback checks and shadow comparisons.

`observe` is the batcher's forward observer (`Batcher.add_forward_observer`): after each
version group's forward it sees the version, the input rows and the answers. It does only
bookkeeping there (an argmax and a bincount, under a lock); any second forward pass goes to
one worker thread of its own through a bounded queue, and a copy that does not fit is
dropped and counted (`mnist_shadow_dropped_total`): shadow costs at most one extra forward
per batch, and never delays an answer.

- **Canary**: per window of `window_images` images the canary answered, three signals are
  compared with their thresholds: its server-error rate (from `mnist_requests_total`), its
  disagreement with the current version on the very same images (the current version
  recomputes a sample of the canary's batches on the worker) and the total-variation distance
  between its predicted-class distribution and the current version's over the same window.
  Past any of them, `ModelRegistry.roll_back_canary` takes it out of traffic (the baseline
  stays current, pinned), the reason is kept in the status and counted in
  `mnist_canary_rollbacks_total{reason}`, which the alert rule CanaryRolledBack watches.
- **Shadow**: every batch the current version answers is recomputed by the shadow version on
  the worker; answers are compared and counted, never returned.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from service.config import Settings
from service.metrics import Metrics
from service.model import NUM_CLASSES
from service.promotion.metrics import PromotionMetrics, promotion_metrics
from service.registry import ModelRegistry, ServableVersion

log = logging.getLogger("service.promotion")

Array = npt.NDArray[np.float32]
# (server errors, requests) a version has finished so far, for the error-rate signal.
ErrorCounts = Callable[[str, int], tuple[float, float]]
_SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a canary is rolled back (each a share, 0..1), judged every `window_images`."""

    window_images: int = 500
    max_error_rate: float = 0.02
    max_disagreement: float = 0.25
    max_divergence: float = 0.25


@dataclass(slots=True)
class _Window:
    version: int
    baseline: int
    errors0: float
    total0: float
    canary: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    current: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(NUM_CLASSES, np.int64))
    checked: int = 0
    disagreed: int = 0
    done: bool = False


@dataclass(frozen=True, slots=True)
class _Job:
    kind: str  # "shadow" or "check"
    model: str
    reference: ServableVersion  # answered the traffic
    other: ServableVersion  # recomputes it
    x: Array
    answered: Array  # the reference's probabilities


def request_counts(metrics: Metrics) -> ErrorCounts:
    """Server errors and requests per (model, version), read from `mnist_requests_total`."""

    def counts(model: str, version: int) -> tuple[float, float]:
        errors = total = 0.0
        for family in metrics.registry.collect():
            if family.name != "mnist_requests":
                continue
            for s in family.samples:
                if (s.name == "mnist_requests_total" and s.labels.get("model") == model
                        and s.labels.get("version") == str(version)):
                    total += s.value
                    if s.labels.get("code") in _SERVER_FAULTS:
                        errors += s.value
        return errors, total

    return counts


class PromotionMonitor:
    """The forward observer behind canary rollback and shadow comparisons."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        thresholds: Thresholds = Thresholds(),
        queue_batches: int = 64,
        errors: ErrorCounts | None = None,
    ) -> None:
        self._registry = registry
        self._metrics: PromotionMetrics = promotion_metrics(metrics.registry)
        self._limits = thresholds
        self._errors = errors or request_counts(metrics)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max(1, queue_batches))
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._loop = asyncio.get_running_loop()
        self._worker = threading.Thread(target=self._work, name="promotion", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the worker (what is queued is dropped)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._worker.join(5)

    # --- on the compute thread: bookkeeping only

    def observe(self, sv: ServableVersion, x: Array, probs: Array) -> None:
        name = sv.name
        canary = self._registry.canary_of(name)
        shadow = self._registry.shadow_of(name)
        if canary is None and shadow is None:
            return
        current = self._registry.current_of(name)
        if canary is not None and current is not None:
            self._canary_answers(name, sv, current, canary.version, canary.baseline, x, probs)
        if shadow is not None and sv is current and shadow is not sv:
            self._submit(_Job("shadow", name, sv, shadow, x, probs))

    def _canary_answers(self, name: str, sv: ServableVersion, current: ServableVersion,
                        version: int, baseline: int, x: Array, probs: Array) -> None:
        counts = np.bincount(np.argmax(probs, axis=1), minlength=NUM_CLASSES)
        with self._lock:
            w = self._windows.get(name)
            if w is None or w.version != version or w.done:
                if w is not None and w.version == version and w.done:
                    return
                w = self._windows[name] = self._open(name, version, baseline)
            if sv.version == version:
                w.canary += counts
            elif sv is current:
                w.current += counts
                return
            else:
                return
            due = int(w.canary.sum()) >= self._limits.window_images
        if sv.version == version:
            self._submit(_Job("check", name, sv, current, x, probs))
        if due:
            self._judge(name, w)

    def _open(self, name: str, version: int, baseline: int) -> _Window:
        errors, total = self._errors(name, version)
        return _Window(version, baseline, errors, total)

    def _submit(self, job: _Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._metrics.shadow_dropped.labels(job.model).inc(int(job.x.shape[0]))

    # --- the worker: second forward passes

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._compare(job)
            except Exception:  # a candidate's failure must not stop the comparisons
                log.exception("promotion: comparing %s version %d with %d failed",
                              job.model, job.other.version, job.reference.version)

    def _compare(self, job: _Job) -> None:
        mine = job.other.model.predict(job.x)
        top_ref = np.argmax(job.answered, axis=1)
        top_other = np.argmax(mine, axis=1)
        agree = int(np.count_nonzero(top_ref == top_other))
        n = int(top_ref.shape[0])
        if job.kind == "check":
            with self._lock:
                w = self._windows.get(job.model)
                if w is not None and w.version == job.reference.version and not w.done:
                    w.checked += n
                    w.disagreed += n - agree
            return
        m = self._metrics
        m.shadow_compared.labels(job.model, "agree").inc(agree)
        m.shadow_compared.labels(job.model, "disagree").inc(n - agree)
        both = (("current", top_ref, job.answered), ("candidate", top_other, mine))
        for role, top, probs in both:
            for cls, count in enumerate(np.bincount(top, minlength=NUM_CLASSES)):
                if count:
                    m.shadow_predictions.labels(job.model, role, str(cls)).inc(int(count))
            hist = m.shadow_confidence.labels(job.model, role)
            for value in np.max(probs, axis=1):
                hist.observe(float(value))

    # --- judging a window

    def _judge(self, name: str, w: _Window) -> None:
        with self._lock:
            if w.done:
                return
            canary = w.canary / max(1, int(w.canary.sum()))
            current = w.current / max(1, int(w.current.sum()))
            divergence = float(0.5 * np.abs(canary - current).sum()) if w.current.sum() else 0.0
            disagreement = w.disagreed / w.checked if w.checked else 0.0
            checked = w.checked
            w.done = True  # a new window opens with the next canary batch
        errors, total = self._errors(name, w.version)
        requests = total - w.total0
        error_rate = (errors - w.errors0) / requests if requests > 0 else 0.0
        lim = self._limits
        why = ""
        reason = ""
        if error_rate > lim.max_error_rate:
            reason, why = "errors", (f"error rate {error_rate:.3f} > {lim.max_error_rate:g} "
                                     f"over {requests:.0f} requests")
        elif disagreement > lim.max_disagreement:
            reason, why = "disagreement", (
                f"disagrees with version {w.baseline} on {disagreement:.3f} of {checked} "
                f"images > {lim.max_disagreement:g}")
        elif divergence > lim.max_divergence:
            reason, why = "divergence", (
                f"predicted-class distribution {divergence:.3f} (total variation) from version "
                f"{w.baseline}'s > {lim.max_divergence:g}")
        log.info("model %s canary %d window: error_rate %.4f disagreement %.4f (%d checked) "
                 "divergence %.4f", name, w.version, error_rate, disagreement, checked,
                 divergence)
        with self._lock:
            if self._windows.get(name) is w:
                del self._windows[name]  # the next canary batch opens a fresh window
        if reason:
            self._roll_back(name, w.version, reason, f"{why} (window {lim.window_images} images)")

    def _roll_back(self, name: str, version: int, reason: str, why: str) -> None:
        async def act() -> None:
            if await self._registry.roll_back_canary(name, version, why):
                self._metrics.rollbacks.labels(name, reason).inc()

        asyncio.run_coroutine_threadsafe(act(), self._loop)


def promotion_monitor(registry: ModelRegistry, metrics: Metrics, settings: Settings
                      ) -> PromotionMonitor:
    """The monitor `settings` ask for (on the running event loop)."""
    return PromotionMonitor(
        registry, metrics,
        thresholds=Thresholds(
            settings.canary_window_images, settings.canary_max_error_rate,
            settings.canary_max_disagreement, settings.canary_max_divergence,
        ),
        queue_batches=settings.shadow_queue_batches,
    )
