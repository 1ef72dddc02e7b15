"""The Batcher: concurrent requests -> bounded queues -> one forward per version per batch.

Why batch: the Python gRPC layer, not the model, is the bottleneck (even on the
completion-queue front end, service/transport.py, a call costs ~36 us of server CPU before any
work, a one-image forward ~15-20 us). Finishing many requests together amortises the per-call
work of the forward, so concurrent requests are coalesced; but a lone request must not wait
for company that is not coming.

This facade wires the parts and is all the front ends see:
  * admission.py -- bounds by rows and bytes, shedding, the door (shared by both lanes);
  * queue.py     -- the pure batch queue and its one flush rule (injected clock);
  * compute.py   -- resolve once per batch, group by version, forward, deliver;
  * cq.py        -- the completion-queue lane: `submit_nowait` + `run_queued` on gRPC
                    core's polling thread;
  * aio.py       -- the asyncio lane: `await submit(...)`, a worker task on the event loop.
Each lane has its own queue, driven by one thread; one lock guards the queues and the
admission state they share, so the bounds cover both lanes.
"""

from __future__ import annotations

import threading
import time

from service.batching.admission import Admission, request_charge, wire_charge
from service.batching.aio import AsyncioDriver
from service.batching.compute import Compute
from service.batching.contract import (
    Array,
    BatchMetrics,
    Clock,
    ForwardObserver,
    Prediction,
    Resolver,
    Waiter,
)
from service.batching.cq import CompletionQueueDriver
from service.batching.queue import BatchQueue
from service.errors import Overloaded, Unavailable


class Batcher:
    """Coalesces concurrent requests into forward passes; see the module docstring."""

    def __init__(
        self,
        registry: Resolver,
        metrics: BatchMetrics,
        *,
        max_batch_rows: int,
        max_batch_wait_s: float,
        max_queue_rows: int,
        max_queue_bytes: int = 1 << 62,
        max_door_wait_s: float = 0.0,
        enabled: bool = True,
        forward_threads: int = 1,
        inline_max_rows: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self._default_model = registry.default_model
        self._lock = threading.Lock()
        self._admission = Admission(metrics, max_queue_rows=max_queue_rows,
                                    max_queue_bytes=max_queue_bytes,
                                    max_door_wait_s=max_door_wait_s)
        self._compute = Compute(registry, metrics, clock)

        def lane() -> BatchQueue:
            return BatchQueue(self._admission, clock, max_batch_rows=max_batch_rows,
                              max_batch_wait_s=max_batch_wait_s, batching=enabled)

        self._cq = CompletionQueueDriver(lane(), self._compute, self._lock)
        self._aio = AsyncioDriver(lane(), self._compute, self._lock, clock,
                                  inline_max_rows=inline_max_rows,
                                  forward_threads=forward_threads)

    # --- lifecycle

    async def start(self) -> None:
        await self._aio.start()

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the worker and the thread pool. Call
        it after the gRPC server stopped (as service/server.py does): the fast lane's queue is
        then drained on this thread."""
        with self._lock:
            self._admission.close()
        await self._aio.close()
        self._cq.close()

    stop = close

    # --- requests

    async def submit(
        self,
        x: Array,
        *,
        model: str = "",
        version: int = 0,
        label: str = "",
        deadline_s: float | None = None,
        wire_bytes: int = 0,
    ) -> Prediction:
        """Probabilities for `x` (float32 (n, 784) in 0..1) from one model version.

        `deadline_s` is seconds from now after which the caller no longer wants the answer;
        `wire_bytes` is the length of the message `x` came in (what `admit_wire` checked).
        Raises Overloaded when the queue is full, NotFound/Unavailable when the model or
        version cannot be resolved, DeadlineExceeded when the deadline passed before compute.
        """
        return await self._aio.submit(x, model or self._default_model(), version, label,
                                      deadline_s, request_charge(x.nbytes, wire_bytes))

    def submit_nowait(
        self,
        x: Array,
        waiter: Waiter,
        *,
        model: str = "",
        version: int = 0,
        label: str = "",
        deadline_s: float | None = None,
        wire_bytes: int = 0,
    ) -> None:
        """Queue `x` for the next `run_queued`, on the thread that calls `run_queued` (gRPC
        core's polling thread); `waiter` hears the result there. Raises what `submit` raises
        for a full queue or a closing batcher, at once."""
        self._cq.submit(x, waiter, model or self._default_model(), version, label, deadline_s,
                        request_charge(x.nbytes, wire_bytes))

    def run_queued(self) -> float | None:
        """The polling thread's idle hook: compute one batch if one is due, inline (never
        raises), and return when (time.monotonic(), the clock) the next will be due -- now or
        earlier if it already is -- or None when nothing is queued (service/batching/cq.py)."""
        return self._cq.run_queued()

    def add_forward_observer(self, observer: ForwardObserver) -> None:
        """Call `observer(version, x, probabilities)` after each version group's forward,
        once its requests have their answers, on the thread that computed the batch (gRPC
        core's polling thread on the fast path, the event loop otherwise): keep it short and
        hand heavy work to a thread of your own. An observer that raises is logged; it never
        fails the batch. None registered costs nothing."""
        self._compute.add_observer(observer)

    # --- admission (docs/serving.md, "Overload")

    def accepting(self) -> bool:
        """False while shedding: a front end refuses new calls without reading them."""
        return self._admission.accepting()

    def door(self, waited_s: float) -> bool | None:
        """For a call waiting at the door for `waited_s`: True to let it in (read and
        admit it), None to keep it waiting (shedding, for at most `max_door_wait_s`), False
        to refuse it now with `refusal()` (shedding for longer than that, or waited longer
        than that for its turn: the door bounds how long a call waits there, whatever the
        number of callers). A call that waits costs nothing but gRPC core's
        ~8 KiB; one let in when the batcher stops shedding is served instead of refused and
        retried, which under a flood of retries is the CPU that goodput needs."""
        return self._admission.door(waited_s)

    def refusal(self) -> Overloaded | Unavailable:
        """The error for a call refused at the door (while `accepting()` is False): made
        once, since under a flood every refusal costs the polling thread."""
        return self._admission.refusal()

    def admit_wire(self, wire_bytes: int) -> None:
        """Refuse a request of `wire_bytes` message bytes before anything decodes it, when
        its charge cannot fit (or while shedding). A check only: `submit*` charges."""
        admission = self._admission
        if not admission.accepting():
            raise admission.refusal()
        charge = wire_charge(wire_bytes)
        if not admission.wire_fits(charge):  # without the lock first: the common case fits
            with self._lock:
                admission.check_wire(charge)
