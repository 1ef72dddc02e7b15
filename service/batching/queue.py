"""The batch queue: requests in, due batches out, under one flush rule. Pure: an injected
clock, no threads, no asyncio; the Batcher serialises calls with its lock and a driver
decides when to ask (service/batching/cq.py, aio.py).

The flush rule (`due`), stated once:
  * a batch takes queued requests up to `max_batch_rows` (a bigger request is a batch alone);
  * it is due at once when it is full enough -- as many requests queued as were outstanding
    (queued, not yet answered) at the busiest moment since the previous batch, or
    `max_batch_rows` rows -- and otherwise `max_batch_wait_s` after its oldest request
    arrived. That peak is the best guess of how many callers are active: with one caller it
    is 1, so a lone request never waits; at concurrency 64 it is ~64, so a batch waits for
    the callers whose answers just went out. When load drops, one wait times out and the
    guess falls to what actually came.
With batching off each request is a batch of its own, due at once (the benchmark's baseline).
Requests arriving while a batch is computed queue up and form the next one.

`take` drops requests nobody waits for any more (cancelled: their bytes are released at once)
and sets aside those whose deadline passed while queued, for the compute path to fail.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from service.batching.admission import Admission
from service.batching.contract import Array, Clock, Waiter


@dataclass(slots=True, eq=False)
class Pending:
    """One queued request; `answered` once its waiter was told (so it is told only once)."""

    x: Array
    model: str
    version: int
    label: str
    deadline: float | None  # clock time after which the caller no longer wants an answer
    waiter: Waiter
    enqueued: float  # clock time it was queued
    rows: int
    charge: int  # bytes held against max_queue_bytes until answered
    answered: bool = False


@dataclass(slots=True, eq=False)
class Batch:
    """What `take` hands a driver: requests to compute, and requests that expired queued."""

    requests: list[Pending]
    expired: list[Pending] = field(default_factory=list)
    taken_at: float = 0.0


class BatchQueue:
    """One lane's queue (see the module docstring); not thread-safe."""

    def __init__(self, admission: Admission, clock: Clock, *, max_batch_rows: int,
                 max_batch_wait_s: float, batching: bool = True) -> None:
        self._admission = admission
        self._clock = clock
        self._max_rows = max_batch_rows
        self._max_wait = max_batch_wait_s
        self._batching = batching
        self._queue: collections.deque[Pending] = collections.deque()
        self.pending = self._queue  # read-only view: a driver's cheap "anything queued?"
        self._rows = 0  # rows queued here
        self._outstanding = 0  # requests queued or in a batch, not yet answered
        self._peak = 0  # most outstanding since the previous batch
        self._target = 1  # how many requests a batch waits for (the previous peak)
        self._closing = False

    def __len__(self) -> int:
        return len(self._queue)

    def enqueue(self, x: Array, waiter: Waiter, model: str, version: int, label: str,
                deadline_s: float | None, charge: int) -> None:
        """Queue `x` for `waiter`, or raise what admission refuses (Overloaded, Unavailable).
        `deadline_s`: seconds from now after which the caller stops waiting."""
        rows = int(x.shape[0])
        self._admission.admit(model, rows, charge)
        now = self._clock()
        deadline = None if deadline_s is None else now + deadline_s
        self._queue.append(Pending(x, model, version, label, deadline, waiter, now, rows, charge))
        self._rows += rows
        self._outstanding += 1
        if self._outstanding > self._peak:
            self._peak = self._outstanding

    def due(self) -> float | None:
        """When (clock time) the next batch is due -- at or before now if it already is --
        or None when nothing is queued. The flush rule: see the module docstring."""
        queue = self._queue
        if not queue:
            return None
        oldest = queue[0].enqueued
        if (len(queue) >= self._target or self._rows >= self._max_rows
                or self._max_wait <= 0 or not self._batching or self._closing):
            return oldest
        return oldest + self._max_wait

    def take_due(self) -> Batch | None:
        """The due batch, taken off the queue; None when none is due yet (`due()` says when)."""
        due = self.due()
        if due is None:
            return None
        now = self._clock()
        if due > now:
            return None
        return self.take(now)

    def take(self, now: float) -> Batch:
        """Take up to `max_batch_rows` rows of live requests (at least one request), or one
        request with batching off, whether due or not."""
        limit = self._max_rows if self._batching else 0
        admission = self._admission
        queue = self._queue
        batch = Batch([], [], now)
        requests, expired = batch.requests, batch.expired
        rows = 0
        last_model, last_rows = "", 0  # dequeued rows, reported once per run of one model
        while queue:
            p = queue[0]
            if requests and rows + p.rows > limit:
                break
            queue.popleft()
            self._rows -= p.rows
            if p.model != last_model:
                if last_rows:
                    admission.dequeued(last_model, last_rows)
                last_model, last_rows = p.model, 0
            last_rows += p.rows
            if p.waiter.done():  # cancelled: the client went away
                self._outstanding -= 1
                admission.release(p.charge)
            elif p.deadline is not None and now > p.deadline:
                expired.append(p)
            else:
                requests.append(p)
                rows += p.rows
        if last_rows:
            admission.dequeued(last_model, last_rows)
        self._target = max(1, self._peak)
        self._peak = self._outstanding
        return batch

    def answered(self, batch: Batch) -> None:
        """Every request of `batch` was answered (whatever the outcome): release its bytes."""
        members = batch.requests
        n = len(members) + len(batch.expired)
        if not n:
            return
        self._outstanding -= n
        charge = 0
        for p in members:
            charge += p.charge
        for p in batch.expired:
            charge += p.charge
        self._admission.release(charge)

    def close(self) -> None:
        """Everything queued is due at once (the batcher is draining)."""
        self._closing = True
