"""The asyncio driver: `await submit(...)` on the event loop, one worker task forms batches.

The streaming and v2 paths (and every path with `--frontend aio`) submit from the event loop.
The worker sleeps on a plain future, resolved by `submit` only when its request makes a batch
due sooner than the worker planned to wake (or the queue was empty), or by a timer at the
due time, so an arrival costs no extra task or loop wake-up. A due batch's groups of at most
`inline_max_rows` rows are computed inline (a tiny forward costs less than a thread hand-off
and a second wake-up of the loop); bigger ones on a small thread pool, so the loop keeps
serving while NumPy (which releases the GIL) computes. Answers are delivered on the loop.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.batching.compute import Compute
from service.batching.contract import Array, Clock, Prediction
from service.batching.queue import Batch, BatchQueue


class LoopWaiter:
    """An asyncio future as a Waiter that may be completed from another thread."""

    __slots__ = ("future", "loop", "thread")

    def __init__(self, future: asyncio.Future[Prediction], loop: asyncio.AbstractEventLoop):
        self.future = future
        self.loop = loop
        self.thread = threading.get_ident()

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result: Prediction) -> None:
        self._call(self.future.set_result, result)

    def set_exception(self, exception: BaseException) -> None:
        self._call(self.future.set_exception, exception)

    def _call(self, setter: Any, value: Any) -> None:
        if threading.get_ident() == self.thread:
            if not self.future.done():
                setter(value)
        else:
            self.loop.call_soon_threadsafe(_set_if_pending, self.future, setter, value)


def _set_if_pending(future: asyncio.Future[Prediction], setter: Any, value: Any) -> None:
    if not future.done():
        setter(value)


class AsyncioDriver:
    """Drives one BatchQueue from a worker task; `lock` is the Batcher's."""

    def __init__(self, queue: BatchQueue, compute: Compute, lock: threading.Lock, clock: Clock,
                 *, inline_max_rows: int, forward_threads: int) -> None:
        self._queue = queue
        self._compute = compute
        self._lock = lock
        self._clock = clock
        self._inline_max_rows = inline_max_rows
        self._executor = ThreadPoolExecutor(forward_threads, thread_name_prefix="forward")
        self._worker: asyncio.Task[None] | None = None
        self._signal: asyncio.Future[None] | None = None  # the sleeping worker's wake-up
        self._wake_before: float | None = None  # wake if a batch is due before this
        self._closing = False

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Finish what is queued (admission already refuses), then stop the worker and pool."""
        self._closing = True
        with self._lock:
            self._queue.close()
        self._wake()
        if self._worker is None and len(self._queue):
            await self.start()
        if self._worker is not None:
            await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    async def submit(self, x: Array, model: str, version: int, label: str,
                     deadline_s: float | None, charge: int) -> Prediction:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        queue = self._queue
        with self._lock:
            queue.enqueue(x, LoopWaiter(future, loop), model, version, label, deadline_s, charge)
            due = queue.due()
        if self._signal is not None and (
                self._wake_before is None or (due is not None and due < self._wake_before)):
            self._wake()
        return await future

    def _wake(self) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, until: float | None) -> None:
        """Until woken by `submit`/`close`, or until `until` (clock time)."""
        self._signal = loop.create_future()
        self._wake_before = until
        timer = None if until is None else loop.call_later(
            max(0.0, until - self._clock()), self._wake)
        try:
            await self._signal
        finally:
            self._signal = None
            if timer is not None:
                timer.cancel()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            with self._lock:
                batch = queue.take_due()
                due = None if batch is not None else queue.due()
            if batch is None:
                if due is None and self._closing:
                    return
                await self._sleep(loop, due)
                continue
            try:
                await self._compute_batch(batch, loop)
            finally:
                with self._lock:
                    queue.answered(batch)

    async def _compute_batch(self, batch: Batch, loop: asyncio.AbstractEventLoop) -> None:
        compute = self._compute
        try:
            for group in compute.plan(batch):
                if group.rows <= self._inline_max_rows:
                    compute.forward(group)
                else:
                    await loop.run_in_executor(self._executor, compute.forward, group)
                compute.finish(group)
        except Exception:  # never let the worker die: waiters would hang forever
            compute.fail_all(batch)
