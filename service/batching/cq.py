"""The completion-queue front end's driver: fast handlers queue, the polling thread computes.

The fast methods (Classify, v2 ModelInfer) are handled on gRPC core's polling thread
(service/transport.py): each validated request is queued with `submit` as its message
arrives. After each bounded turn of completions the polling thread calls `run_queued` (its
idle hook), which computes one batch if one is due -- inline, on that thread: there is no
other Python work for it meanwhile, and a hand-off would cost a wake-up per batch -- and says
when the next will be due, so the thread polls for completions until then at most. One batch
a call: the completions that arrived meanwhile are handled before the next, so neither
accepting nor computing starves the other. The asyncio loop never computes these batches.
"""

from __future__ import annotations

import threading

from service.batching.compute import Compute
from service.batching.contract import Array, Waiter
from service.batching.queue import BatchQueue


class CompletionQueueDriver:
    """Drives one BatchQueue from the polling thread; `lock` is the Batcher's."""

    def __init__(self, queue: BatchQueue, compute: Compute, lock: threading.Lock) -> None:
        self._queue = queue
        self._compute = compute
        self._lock = lock

    def submit(self, x: Array, waiter: Waiter, model: str, version: int, label: str,
               deadline_s: float | None, charge: int) -> None:
        with self._lock:
            self._queue.enqueue(x, waiter, model, version, label, deadline_s, charge)

    def run_queued(self) -> float | None:
        """Compute the due batch, if any (never raises); return when the next is due."""
        queue = self._queue
        if not queue.pending:
            return None
        with self._lock:
            batch = queue.take_due()
            if batch is None:
                return queue.due()
        try:
            self._compute.run(batch)
        finally:
            with self._lock:
                queue.answered(batch)
                due = queue.due()
        return due

    def close(self) -> None:
        """Compute everything still queued, now, on this thread (admission already refuses;
        the polling thread has stopped)."""
        with self._lock:
            self._queue.close()  # everything queued is due at once
        while self._queue.pending:
            self.run_queued()
