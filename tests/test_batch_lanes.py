"""The Batcher's two lanes end to end, with a fake clock, fake models and recording waiters.

The fast lane is the production path of the default front end: handlers on gRPC core's
polling thread call `submit_nowait(x, waiter)`, and the thread's idle hook `run_queued()`
computes a due batch inline and says when the next is due. Driven here the way the polling
thread drives it, on one thread, so every batch and every answer is exact. Then the rules
that hold whatever the lane: a batch never mixes versions and resolves each once, every
outcome gives a request's bytes back, observers see each forward and cannot break it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import pytest
from support.batching import (
    FakeClock,
    FakeResolver,
    FakeWaiter,
    RecordingMetrics,
    first_pixels,
    image_rows,
)

from service.batching import Batcher, Prediction
from service.batching.admission import request_charge
from service.errors import DeadlineExceeded, NotFound, Overloaded, ServiceError, Unavailable
from service.registry import ServableVersion

WAIT_S = 0.010
FORWARD_S = 0.003


class Rig:
    """A Batcher over FakeResolver's two versions, a fake clock and recorded metrics."""

    def __init__(self, **kw: Any) -> None:
        self.clock = FakeClock()
        self.resolver = FakeResolver(self.clock, forward_s=FORWARD_S)
        self.metrics = RecordingMetrics()
        options: dict[str, Any] = {"max_batch_rows": 64, "max_batch_wait_s": WAIT_S,
                                   "max_queue_rows": 1000}
        options.update(kw)
        self.batcher = Batcher(self.resolver, self.metrics, clock=self.clock, **options)

    def put(self, rows: int = 1, first: int = 0, **kw: Any) -> FakeWaiter:
        waiter = FakeWaiter()
        self.batcher.submit_nowait(image_rows(rows, first), waiter, **kw)
        return waiter

    def drain(self) -> None:
        """run_queued until nothing is queued, moving the clock to each due time."""
        for _ in range(100):
            due = self.batcher.run_queued()
            if due is None:
                return
            self.clock.now = max(self.clock.now, due)
        raise AssertionError("run_queued never ran dry")


def result(w: FakeWaiter) -> Prediction:
    assert w.error is None, w.error
    assert w.result is not None
    assert w.answers == 1
    return w.result


# --- the fast lane: submit_nowait + run_queued

def test_run_queued_computes_one_batch_and_hands_each_request_its_own_rows() -> None:
    rig = Rig()
    assert rig.batcher.run_queued() is None, "nothing queued: nothing due"
    waiters = [rig.put(3, first=0), rig.put(1, first=3), rig.put(2, first=4)]
    assert rig.batcher.run_queued() is None, "all three in one batch, nothing left"
    assert [first_pixels(result(w)) for w in waiters] == [[0, 1, 2], [3], [4, 5]]
    assert all(result(w).version.version == 1 for w in waiters)
    assert len(rig.resolver.models[1].inputs) == 1
    [batch] = rig.metrics.batches
    assert (batch.model, batch.version, batch.rows) == ("m", 1, 6)
    assert batch.forward_s == pytest.approx(FORWARD_S), "timed on the injected clock"
    assert batch.waits_s == pytest.approx([FORWARD_S] * 3)


def test_run_queued_says_when_the_next_batch_is_due_and_computes_it_then() -> None:
    rig = Rig()
    for _ in range(2):  # four callers at once, twice: a batch now waits for four
        ws = [rig.put() for _ in range(4)]
        rig.drain()
        assert all(w.answers == 1 for w in ws)
    queued_at = rig.clock.now
    late = rig.put()
    assert rig.batcher.run_queued() == queued_at + WAIT_S
    assert late.answers == 0
    rig.clock.advance(WAIT_S)
    assert rig.batcher.run_queued() is None
    assert result(late).probabilities.shape == (1, 10)
    assert rig.metrics.batches[-1].waits_s == pytest.approx([WAIT_S + FORWARD_S])


def test_run_queued_computes_one_batch_a_call() -> None:
    rig = Rig(max_batch_rows=2)
    waiters = [rig.put(first=i) for i in range(5)]
    due = rig.batcher.run_queued()
    assert [w.answers for w in waiters] == [1, 1, 0, 0, 0]
    assert due is not None
    assert due <= rig.clock.now, "more is due at once: the next turn computes it"
    rig.drain()
    assert [first_pixels(result(w)) for w in waiters] == [[i] for i in range(5)]


def test_with_batching_off_each_request_is_its_own_forward() -> None:
    rig = Rig(enabled=False)
    waiters = [rig.put(first=i) for i in range(3)]
    rig.drain()
    assert [b.rows for b in rig.metrics.batches] == [1, 1, 1]
    assert [first_pixels(result(w)) for w in waiters] == [[0], [1], [2]]


# --- versions

def test_a_batch_never_mixes_versions_and_resolves_each_version_once() -> None:
    rig = Rig()
    wanted = [1, 2, 0, 2, 1, 0]  # 0: the current version, 1
    waiters = [rig.put(first=i, version=v) for i, v in enumerate(wanted)]
    rig.drain()
    for i, (v, w) in enumerate(zip(wanted, waiters, strict=True)):
        p = result(w)
        assert p.version.version == (v or 1)
        assert first_pixels(p) == [i]
        assert p.probabilities[0, 1] == (v or 1), "computed by the version it names"
    v1, v2 = rig.resolver.models[1].inputs, rig.resolver.models[2].inputs
    assert len(v1) == 1, "versions 0 and 1 resolve to the same version: one forward"
    assert len(v2) == 1
    assert [round(float(p) * 1000) for p in v1[0][:, 0]] == [0, 2, 4, 5]
    assert sorted(rig.resolver.resolutions) == [("m", 0, ""), ("m", 1, ""), ("m", 2, "")]
    assert sorted((b.version, b.rows) for b in rig.metrics.batches) == [(1, 4), (2, 2)]


def test_the_version_is_resolved_when_the_batch_is_computed() -> None:
    rig = Rig()
    before = rig.put()
    rig.drain()
    w = rig.put()
    rig.resolver.current = 2  # a hot swap between queueing and computing
    rig.drain()
    assert result(before).version.version == 1
    assert result(w).version.version == 2, "resolved for each batch, never remembered"


def test_an_unknown_version_fails_only_its_request() -> None:
    rig = Rig()
    good, bad = rig.put(), rig.put(version=7)
    rig.drain()
    assert result(good).version.version == 1
    assert isinstance(bad.error, NotFound)


def test_a_failed_forward_fails_every_waiter_of_its_version_only() -> None:
    rig = Rig()
    rig.resolver.models[2].fail = True
    ok = [rig.put(version=1) for _ in range(2)]
    failed = [rig.put(version=2) for _ in range(3)]
    rig.drain()
    assert all(result(w).version.version == 1 for w in ok)
    for w in failed:
        assert isinstance(w.error, ServiceError)
        assert w.error.code.name == "INTERNAL"
        assert "forward pass of m version 2 failed: FloatingPointError" in str(w.error)
        assert w.answers == 1
    rig.resolver.models[2].fail = False
    again = rig.put(version=2)
    rig.drain()
    assert result(again).version.version == 2


# --- admission: bytes go back on every outcome

def _fill(rig: Rig, **kw: Any) -> FakeWaiter:
    """Queue one request that holds the whole byte budget; a second is refused (shedding)."""
    w = rig.put(**kw)
    with pytest.raises(Overloaded):
        rig.put()
    assert not rig.batcher.accepting()
    assert rig.metrics.bytes == request_charge(784 * 4, 0)
    return w


OUTCOMES = ["success", "model failure", "unknown version", "deadline", "cancelled"]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_gives_the_request_s_bytes_back(outcome: str) -> None:
    rig = Rig(max_queue_bytes=request_charge(784 * 4, 0) + 1)
    kw: dict[str, Any] = {}
    if outcome == "unknown version":
        kw["version"] = 7
    if outcome == "deadline":
        kw["deadline_s"] = 0.001
    w = _fill(rig, **kw)
    if outcome == "model failure":
        rig.resolver.models[1].fail = True
    if outcome == "deadline":
        rig.clock.advance(0.002)
    if outcome == "cancelled":
        w.cancel()
    assert rig.batcher.run_queued() is None
    expected = {"success": None, "model failure": ServiceError, "unknown version": NotFound,
                "deadline": DeadlineExceeded, "cancelled": None}[outcome]
    if expected is None:
        assert w.answers == (0 if outcome == "cancelled" else 1)
        assert w.error is None
    else:
        assert isinstance(w.error, expected)
        assert w.answers == 1
    assert rig.metrics.bytes == 0
    assert rig.batcher.accepting(), "nothing held: shedding is over"
    rig.resolver.models[1].fail = False
    after = rig.put()
    rig.drain()
    assert result(after).version.version == 1


def test_a_deadline_that_passed_while_queued_is_never_computed() -> None:
    rig = Rig()
    late = rig.put(deadline_s=0.005)
    rig.clock.advance(0.006)
    rig.drain()
    assert isinstance(late.error, DeadlineExceeded)
    assert "deadline passed while queued" in str(late.error)
    assert rig.resolver.models[1].inputs == []


def test_a_waiter_that_raises_leaves_no_one_hanging_and_no_one_answered_twice() -> None:
    class Broken(FakeWaiter):
        def set_result(self, result: Prediction) -> None:
            super().set_result(result)
            raise RuntimeError("bug in a waiter")

    rig = Rig()
    first = rig.put()
    broken = Broken()
    rig.batcher.submit_nowait(image_rows(1), broken)
    last = rig.put()
    rig.drain()
    assert first.answers == 1
    assert first.error is None
    assert broken.answers == 1
    assert isinstance(last.error, ServiceError), "the rest of the batch fails, it never hangs"
    assert last.answers == 1
    assert rig.metrics.bytes == 0


# --- forward observers (issue 15)

def test_observers_see_each_version_group_after_its_answers_went_out() -> None:
    rig = Rig()
    seen: list[tuple[int, list[int], np.ndarray, bool]] = []
    waiters: list[FakeWaiter] = []

    def observer(sv: ServableVersion, x: np.ndarray, probs: np.ndarray) -> None:
        answered = all(w.answers == 1 for w in waiters if w.result and w.result.version is sv)
        seen.append((sv.version, [round(float(v) * 1000) for v in x[:, 0]], probs, answered))

    rig.batcher.add_forward_observer(observer)
    waiters += [rig.put(first=0, version=1), rig.put(first=1, version=2),
                rig.put(first=2, version=1)]
    rig.drain()
    assert sorted((v, rows) for v, rows, _, _ in seen) == [(1, [0, 2]), (2, [1])]
    for v, rows, probs, answered in seen:
        assert answered
        assert probs.shape == (len(rows), 10)
        assert (probs[:, 1] == v).all()


def test_an_observer_that_raises_is_logged_and_never_fails_the_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig()
    calls: list[int] = []

    def broken(sv: ServableVersion, x: np.ndarray, probs: np.ndarray) -> None:
        calls.append(sv.version)
        raise ValueError("observer bug")

    def counting(sv: ServableVersion, x: np.ndarray, probs: np.ndarray) -> None:
        calls.append(-sv.version)

    rig.batcher.add_forward_observer(broken)
    rig.batcher.add_forward_observer(counting)
    with caplog.at_level(logging.ERROR):
        ws = [rig.put() for _ in range(3)]
        rig.drain()
    assert all(result(w).version.version == 1 for w in ws)
    assert calls == [1, -1], "the next observer still runs"
    assert "forward observer" in caplog.text
    assert "observer bug" in caplog.text
    assert len(rig.metrics.batches) == 1


# --- closing

def test_close_computes_what_the_fast_lane_queued_then_refuses() -> None:
    rig = Rig()
    for _ in range(2):
        ws = [rig.put() for _ in range(4)]
        rig.drain()
    waiting = rig.put()  # not due yet: waits for company
    assert rig.batcher.run_queued() is not None
    asyncio.run(rig.batcher.close())
    assert result(waiting).version.version == 1
    with pytest.raises(Unavailable, match="shutting down"):
        rig.put()
    with pytest.raises(Unavailable):
        rig.batcher.admit_wire(10)
    assert rig.batcher.door(0.0) is False
    assert isinstance(rig.batcher.refusal(), Unavailable)
    assert ws


# --- the asyncio lane

def test_the_asyncio_worker_wakes_when_an_arrival_makes_a_batch_due() -> None:
    """The worker sleeps until the oldest request's wait ends (100 s on the fake clock, a
    real timer of 100 s); the arrival that makes the batch full enough must wake it."""

    async def body() -> None:
        rig = Rig(max_batch_wait_s=100.0)
        await rig.batcher.start()
        try:
            for _ in range(2):  # two callers at once: a batch now waits for two
                await asyncio.wait_for(asyncio.gather(
                    rig.batcher.submit(image_rows(1, 0)), rig.batcher.submit(image_rows(1, 1))),
                    5)
            first = asyncio.ensure_future(rig.batcher.submit(image_rows(1, 7)))
            await asyncio.sleep(0)  # let it queue: the worker goes to sleep for 100 s
            assert not first.done()
            second = await asyncio.wait_for(rig.batcher.submit(image_rows(1, 8)), 5)
            assert first_pixels(await first) == [7]
            assert first_pixels(second) == [8]
            assert rig.metrics.batches[-1].rows == 2
        finally:
            await asyncio.wait_for(rig.batcher.close(), 5)

    asyncio.run(body())


def test_the_asyncio_lane_sends_big_groups_to_the_thread_pool_and_small_ones_inline() -> None:
    async def body() -> None:
        rig = Rig(inline_max_rows=2)
        await rig.batcher.start()
        try:
            small = await rig.batcher.submit(image_rows(2, 0))
            big = await rig.batcher.submit(image_rows(3, 5))
            assert first_pixels(small) == [0, 1]
            assert first_pixels(big) == [5, 6, 7]
        finally:
            await rig.batcher.close()
        loop_thread = threading.current_thread().name
        small_on, big_on = rig.resolver.models[1].threads
        assert small_on == loop_thread
        assert big_on.startswith("forward")

    asyncio.run(body())
