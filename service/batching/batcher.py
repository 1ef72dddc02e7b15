"""Bounded queue -> batches by rows or deadline -> one forward pass -> rows back to callers.

Why it looks like this: the Python gRPC layer, not the model, is the bottleneck (even on the
completion-queue front end, service/transport.py, a call costs ~36 us of server CPU before any
work, a one-image forward ~15-20 us). Finishing many requests together amortises the per-call
work of the forward, so concurrent requests are coalesced; but a lone request must not wait
for company that is not coming.

Flush policy (one worker task):
  * take requests until `max_batch_rows` would be exceeded (a bigger request is a batch alone);
  * wait for more only while fewer requests are queued than were outstanding (submitted, not
    yet answered) at the busiest moment since the previous flush, and at most
    `max_batch_wait_s` after the oldest arrived. That peak is the best guess of how many
    callers are active: with one caller it is 1, so a lone request never waits; at
    concurrency 64 it is ~64, so a batch waits for the callers whose answers just went out.
    When load drops, one wait times out and the guess falls to what actually came.
Requests arriving while a forward runs queue up and form the next batch. The worker sleeps on
a plain future resolved by `submit` (only when the batch is full enough) or by a timer, so an
arrival costs no extra task or event-loop wakeup.

Two ways in, one queue (guarded by a lock, so either thread may take from it):
  * `submit` (async, on the event loop): the streaming and v2 paths; the worker task above
    forms their batches.
  * `submit_nowait` + `run_queued` (any thread, no asyncio): the fast path of gRPC core's
    polling thread (service/transport.py). Its handlers queue requests as their messages
    arrive; after each bounded turn of completions, the polling thread calls `run_queued`,
    which computes one batch if one is due (the same rule as the worker's), inline, and says
    when the next will be: the polling thread waits for completions until then at most. A
    lone request is computed at once.
A waiter is told its result from whichever thread computed it: asyncio futures through
`call_soon_threadsafe` when that is not the loop's thread.

Each batch resolves versions once at batch time, groups requests by the version they get (so a
batch never mixes versions) and runs one `Model.predict` per group on a small dedicated thread
pool (NumPy releases the GIL, the event loop keeps serving) -- except forwards of at most
`inline_max_rows` rows, which cost less than the thread handoff and run inline. Cancelled
requests and requests whose deadline has passed are dropped before compute; a failed forward
fails every waiter in its group; a full queue rejects at once with `Overloaded`.

Admission (docs/serving.md, "Overload"): a request is charged bytes from the length of its
message, before anything parses it (`admit_wire`), and holds them until it is answered, so the
memory of queued and in-flight requests is bounded by `max_queue_bytes` whatever the number
of callers; rows stay bounded by `max_queue_rows`. Once a request is refused for either
bound, the batcher sheds (`accepting()` is False: front ends refuse new calls at the door,
without reading them) until what it holds falls to RESUME_FRACTION of both bounds, so a
flood of retries costs the polling thread as little as possible while compute drains.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from service.errors import DeadlineExceeded, Overloaded, ServiceError, Unavailable
from service.metrics import Metrics
from service.registry import ModelRegistry, ServableVersion

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]

# Decoded float32 rows take at most 4 bytes per byte of the message carrying them (uint8
# pixels expand 4x, float32 pixels and v2 typed contents at most 1x-4x): a request is charged
# 4 bytes per message byte, known before it is parsed.
CHARGE_PER_WIRE_BYTE = 4
# What a request holds besides its rows (its call, waiter, parsed message, reply): charged
# too, so a flood of one-image requests is bounded in bytes as well.
REQUEST_OVERHEAD_BYTES = 2048
# After a refusal, new calls are refused at the door until held bytes and queued rows are
# back to this fraction of their bounds (hysteresis: shed in bursts, not one call in two).
RESUME_FRACTION = 0.75


@dataclass(frozen=True, slots=True)
class Prediction:
    """What a request gets back: its rows of probabilities and the version that computed them."""

    probabilities: Array
    version: ServableVersion


class Waiter(Protocol):
    """Who hears a request's result: `done()` once it no longer wants one (cancelled)."""

    def done(self) -> bool: ...

    def set_result(self, result: Prediction) -> None: ...

    def set_exception(self, exception: BaseException) -> None: ...


class _LoopWaiter:
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


@dataclass(slots=True, eq=False)
class _Pending:
    x: Array
    model: str
    version: int
    label: str
    deadline: float | None  # time.monotonic() by which the caller stops waiting
    future: Waiter
    enqueued: float  # time.monotonic() at submit
    rows: int
    charge: int  # bytes held against max_queue_bytes until answered


class Batcher:
    """Coalesces concurrent `submit` calls into forward passes; see the module docstring."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        max_batch_rows: int,
        max_batch_wait_s: float,
        max_queue_rows: int,
        max_queue_bytes: int = 1 << 62,
        max_door_wait_s: float = 0.0,
        enabled: bool = True,
        forward_threads: int = 1,
        inline_max_rows: int = 0,
    ) -> None:
        self._registry = registry
        self._resolve = registry.resolve
        self._metrics = metrics
        self._max_rows = max_batch_rows
        self._max_wait = max_batch_wait_s
        self._max_queue_rows = max_queue_rows
        self._max_queue_bytes = max_queue_bytes
        self._held_bytes = 0  # charged by queued and in-flight requests, until answered
        self._shedding = False  # refuse at the door until below RESUME_FRACTION of bounds
        self._max_door_wait = max_door_wait_s
        self._refusal = Overloaded(
            f"queue full: new requests are refused until what is queued falls to "
            f"{RESUME_FRACTION:.0%} of the limits ({max_queue_bytes} bytes, {max_queue_rows} "
            f"images); retry later"
        )
        self.enabled = enabled
        self._inline_max_rows = inline_max_rows
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._queued_by_model: collections.Counter[str] = collections.Counter()
        self._signal: asyncio.Future[None] | None = None  # the sleeping worker's wake-up
        self._signal_any = False  # wake on any arrival (queue was empty) vs only when full
        self._executor = ThreadPoolExecutor(forward_threads, thread_name_prefix="forward")
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._outstanding = 0  # requests submitted and not yet answered
        self._peak = 0  # most outstanding since the previous flush
        self._target = 1  # how many requests a batch waits for (the previous peak)
        self._unbatched_rows = 0  # rows being computed with batching off (same queue bound)
        # Guards the queue and its counts: submit_nowait/run_queued run on gRPC core's polling
        # thread, submit and the worker on the event loop.
        self._lock = threading.Lock()

    # --- lifecycle

    async def start(self) -> None:
        if self.enabled and self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="batcher")

    async def close(self) -> None:
        """Refuse new work, finish what is queued, stop the worker and the thread pool."""
        self._closing = True
        self._wake()
        if self._worker is not None:
            await self._worker
            self._worker = None
        self._executor.shutdown(wait=True)

    # --- the request side

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
        if not self.enabled:
            charge = self._charge(x, wire_bytes)
            with self._lock:
                self._admit(int(x.shape[0]), charge)
                self._hold(charge)
            try:
                loop = asyncio.get_running_loop()
                deadline = None if deadline_s is None else loop.time() + deadline_s
                return await self._unbatched(x, model, version, label, deadline)
            finally:
                with self._lock:
                    self._release(charge)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Prediction] = loop.create_future()
        self._enqueue(x, model, version, label, deadline_s, _LoopWaiter(future, loop),
                      wire_bytes)
        if self._signal is not None and (self._signal_any or self._full_enough()):
            self._wake()
        return await future

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
        """Queue `x` for the next `run_queued` (any thread); `waiter` hears the result.

        Raises what `submit` raises for a full queue or a closing batcher, at once.
        """
        self._enqueue(x, model, version, label, deadline_s, waiter, wire_bytes)

    def run_queued(self) -> float | None:
        """Compute one batch if one is due, inline on this thread (never raises), and return
        when (time.monotonic()) the next will be due (now if it already is), or None when
        nothing is queued.

        One batch a call: the polling thread handles the completions that arrived meanwhile
        (a bounded number, service/transport.py) before the next, so neither accepting nor
        computing can starve the other. A batch is due under the worker's rule: full enough
        (as many requests as were outstanding at the busiest moment since the previous batch,
        or max_batch_rows), or max_batch_wait_s after its oldest request arrived. With
        batching off, each request is its own forward (the benchmark's baseline)."""
        if not self._queue:
            return None
        if self.enabled and self._max_wait > 0 and not self._full_enough():
            due = self._queue[0].enqueued + self._max_wait
            if time.monotonic() < due:
                return due
        batch = self._take(self._max_rows if self.enabled else 1)
        if batch:
            self._compute_now(batch)
        return time.monotonic() if self._queue else None

    # --- admission

    def accepting(self) -> bool:
        """False while shedding: a front end refuses new calls without reading them."""
        return not self._shedding and not self._closing

    def door(self, waited_s: float) -> bool | None:
        """For a call waiting unread at the door for `waited_s`: True to let it in (read and
        admit it), None to keep it waiting (shedding, for at most `max_door_wait_s`), False
        to refuse it now with `refusal()` (shedding for longer than that, or waited longer
        than that for its turn: the door bounds how long a call waits there, whatever the
        number of callers). A call that waits costs nothing but gRPC core's
        ~8 KiB; one let in when the batcher stops shedding is served instead of refused and
        retried, which under a flood of retries is the CPU that goodput needs."""
        if self._closing or waited_s > self._max_door_wait:
            return False
        if not self._shedding:
            return True
        return None if waited_s < self._max_door_wait else False

    def refusal(self) -> Overloaded | Unavailable:
        """The error for a call refused at the door (while `accepting()` is False): made
        once, since under a flood every refusal costs the polling thread."""
        if self._closing:
            return Unavailable("server is shutting down")
        return self._refusal

    def admit_wire(self, wire_bytes: int) -> None:
        """Refuse a request of `wire_bytes` message bytes before anything decodes it, when
        its charge cannot fit (or while shedding). A check only: `submit*` charges."""
        if not self.accepting():
            raise self.refusal()
        charge = CHARGE_PER_WIRE_BYTE * wire_bytes + REQUEST_OVERHEAD_BYTES
        held = self._held_bytes
        if held and held + charge > self._max_queue_bytes:
            with self._lock:  # shed only while something is held, or nothing would end it
                held = self._held_bytes
                if held and held + charge > self._max_queue_bytes:
                    self._shedding = True
                    raise self._bytes_error(held, charge)

    def _charge(self, x: Array, wire_bytes: int) -> int:
        return max(int(x.nbytes), CHARGE_PER_WIRE_BYTE * wire_bytes) + REQUEST_OVERHEAD_BYTES

    def _bytes_error(self, held: int, charge: int) -> Overloaded:
        return Overloaded(
            f"queue full: {held} bytes held by queued requests, {charge} more would pass the "
            f"limit of {self._max_queue_bytes}; retry later"
        )

    def _admit(self, rows: int, charge: int) -> None:
        """Under the lock: raise unless `rows` images charged `charge` bytes fit now."""
        if self._closing:
            raise Unavailable("server is shutting down")
        queued = self._queued_rows + self._unbatched_rows
        if queued + rows > self._max_queue_rows and queued > 0:
            self._shedding = True
            raise Overloaded(
                f"queue full: {queued} images waiting, {rows} more would pass the limit of "
                f"{self._max_queue_rows}; retry later"
            )
        held = self._held_bytes
        if held and held + charge > self._max_queue_bytes:
            self._shedding = True
            raise self._bytes_error(held, charge)

    def _hold(self, charge: int) -> None:
        self._held_bytes += charge
        self._metrics.set_queue_bytes(self._held_bytes)

    def _release(self, charge: int) -> None:
        """Under the lock: give back bytes; stop shedding once both bounds have room."""
        self._held_bytes -= charge
        if (self._shedding
                and self._held_bytes <= RESUME_FRACTION * self._max_queue_bytes
                and self._queued_rows + self._unbatched_rows
                <= RESUME_FRACTION * self._max_queue_rows):
            self._shedding = False
        self._metrics.set_queue_bytes(self._held_bytes)

    def _enqueue(self, x: Array, model: str, version: int, label: str,
                 deadline_s: float | None, waiter: Waiter, wire_bytes: int) -> None:
        rows = int(x.shape[0])
        charge = self._charge(x, wire_bytes)
        now = time.monotonic()
        deadline = None if deadline_s is None else now + deadline_s
        name = model or self._registry.default_model()
        with self._lock:
            self._admit(rows, charge)
            self._queue.append(
                _Pending(x, name, version, label, deadline, waiter, now, rows, charge))
            self._queued_rows += rows
            self._hold(charge)
            self._queued_by_model[name] += rows
            self._outstanding += 1
            if self._outstanding > self._peak:
                self._peak = self._outstanding
            queued = self._queued_by_model[name]
        self._metrics.set_queue_rows(name, queued)

    def _full_enough(self) -> bool:
        return (
            len(self._queue) >= self._target
            or self._queued_rows >= self._max_rows
            or self._closing
        )

    def _wake(self) -> None:
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, any_arrival: bool,
                     until: float | None) -> None:
        """Until woken by `submit`/`close`, or until `until` (loop time)."""
        self._signal = loop.create_future()
        self._signal_any = any_arrival
        timer = None if until is None else loop.call_at(until, self._wake)
        try:
            await self._signal
        finally:
            self._signal = None
            if timer is not None:
                timer.cancel()

    async def _unbatched(
        self, x: Array, model: str, version: int, label: str, deadline: float | None
    ) -> Prediction:
        """Batching off: each request is its own forward (the benchmark's baseline)."""
        servable = self._resolve(model, version, label)
        loop = asyncio.get_running_loop()
        if deadline is not None and loop.time() > deadline:
            raise DeadlineExceeded("deadline passed before the request was computed")
        rows = int(x.shape[0])
        self._unbatched_rows += rows
        try:
            start = time.perf_counter()
            probs = await self._predict(servable, x, loop)
            self._metrics.batch_done(
                servable.name, servable.version, (0.0,), time.perf_counter() - start, probs
            )
        finally:
            self._unbatched_rows -= rows
        return Prediction(probs, servable)

    # --- the worker

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                await self._sleep(loop, True, None)
                continue
            if not self._full_enough() and self._max_wait > 0:
                until = self._queue[0].enqueued + self._max_wait
                if loop.time() < until:
                    await self._sleep(loop, False, until)
                    continue  # re-check: full, timed out, or closing
            batch = self._take()
            if batch:
                try:
                    await self._compute(batch, loop)
                except Exception:  # never let the worker die: waiters would hang forever
                    log.exception("batch failed unexpectedly")
                    self._fail_all(batch)

    def _take(self, max_rows: int = 0) -> list[_Pending]:
        """Pop up to max_rows (default max_batch_rows) of live requests (at least one)."""
        max_rows = max_rows or self._max_rows
        batch: list[_Pending] = []
        rows = 0
        with self._lock:
            while self._queue:
                p = self._queue[0]
                if batch and rows + p.rows > max_rows:
                    break
                self._queue.popleft()
                self._queued_rows -= p.rows
                self._queued_by_model[p.model] -= p.rows
                if p.future.done():  # cancelled: the client went away
                    self._outstanding -= 1
                    self._release(p.charge)
                    continue
                batch.append(p)
                rows += p.rows
            self._target = max(1, self._peak)
            self._peak = self._outstanding
            queued = list(self._queued_by_model.items())
        for name, n in queued:
            self._metrics.set_queue_rows(name, n)
        return batch

    def _answered(self, members: list[_Pending]) -> None:
        """They have their answer: no longer outstanding, their bytes are free."""
        with self._lock:
            self._outstanding -= len(members)
            for p in members:
                self._release(p.charge)

    def _groups(self, batch: list[_Pending]) -> list[tuple[ServableVersion, list[_Pending]]]:
        """Drop expired requests, resolve versions once, group by the version each gets."""
        now = time.monotonic()
        groups: dict[int, tuple[ServableVersion, list[_Pending]]] = {}
        resolved: dict[tuple[str, int, str], ServableVersion] = {}
        failed: list[_Pending] = []
        for p in batch:
            if p.deadline is not None and now > p.deadline:
                p.future.set_exception(
                    DeadlineExceeded("deadline passed while queued; the request was dropped")
                )
                failed.append(p)
                continue
            key = (p.model, p.version, p.label)
            try:
                sv = resolved.get(key) or self._resolve(*key)
            except ServiceError as e:
                p.future.set_exception(e)
                failed.append(p)
                continue
            resolved[key] = sv
            groups.setdefault(id(sv), (sv, []))[1].append(p)
        if failed:
            self._answered(failed)
        return list(groups.values())

    def _compute_now(self, batch: list[_Pending]) -> None:
        try:
            for sv, members in self._groups(batch):
                x = _stack(members)
                started = time.perf_counter()
                try:
                    probs = sv.model.predict(x)
                except Exception as e:
                    self._failed(sv, members, x, e)
                    continue
                self._deliver(sv, members, probs, time.perf_counter() - started)
        except Exception:  # never leave a waiter hanging
            log.exception("batch failed unexpectedly")
            self._fail_all(batch)

    def _fail_all(self, batch: list[_Pending]) -> None:
        left = [p for p in batch if not p.future.done()]
        for p in left:
            p.future.set_exception(ServiceError("batch failed unexpectedly"))
        self._answered(left)

    async def _compute(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        for sv, members in self._groups(batch):
            await self._forward(sv, members, loop)

    async def _predict(
        self, sv: ServableVersion, x: Array, loop: asyncio.AbstractEventLoop
    ) -> Array:
        """A tiny forward (tens of microseconds) costs less than handing it to a thread and
        waking the loop again, so it runs inline; anything bigger runs on the thread pool."""
        if x.shape[0] <= self._inline_max_rows:
            return sv.model.predict(x)
        return await loop.run_in_executor(self._executor, sv.model.predict, x)

    async def _forward(
        self, sv: ServableVersion, members: list[_Pending], loop: asyncio.AbstractEventLoop
    ) -> None:
        x = _stack(members)
        started = time.perf_counter()
        try:
            probs = await self._predict(sv, x, loop)
        except Exception as e:
            self._failed(sv, members, x, e)
            return
        self._deliver(sv, members, probs, time.perf_counter() - started)

    def _failed(self, sv: ServableVersion, members: list[_Pending], x: Array,
                e: Exception) -> None:
        log.exception("forward failed: model %s version %d, %d rows", sv.name, sv.version,
                      x.shape[0], exc_info=e)
        # A server fault, not the caller's: INTERNAL, and every waiter hears of it.
        err = ServiceError(
            f"forward pass of {sv.name} version {sv.version} failed: {type(e).__name__}"
        )
        for p in members:
            if not p.future.done():
                p.future.set_exception(err)
        self._answered(members)

    def _deliver(self, sv: ServableVersion, members: list[_Pending], probs: Array,
                 forward_s: float) -> None:
        now = time.monotonic()
        waits = [now - p.enqueued for p in members]
        start = 0
        for p in members:
            end = start + p.rows
            if not p.future.done():
                p.future.set_result(Prediction(probs[start:end], sv))
            start = end
        self._answered(members)
        self._metrics.batch_done(sv.name, sv.version, waits, forward_s, probs)


def _stack(members: list[_Pending]) -> Array:
    return members[0].x if len(members) == 1 else np.concatenate([p.x for p in members])
