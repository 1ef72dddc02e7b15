"""The batch queue's flush rule and take, exactly: a fake clock, no thread, no sleeping.

The rule (service/batching/queue.py): a batch is due at once when as many requests are queued
as were outstanding at the previous peak, or `max_batch_rows` rows are; otherwise
`max_batch_wait_s` after its oldest request arrived. A batch holds at most `max_batch_rows`
rows (a bigger request is a batch alone); cancelled requests are dropped and expired ones set
aside when it is taken.
"""

from __future__ import annotations

import pytest
from support.batching import FakeClock, FakeWaiter, RecordingMetrics, image_rows

from service.batching.admission import Admission
from service.batching.queue import Batch, BatchQueue

WAIT_S = 0.010


class Lane:
    """A BatchQueue over its own admission, a fake clock and recorded gauges."""

    def __init__(self, *, max_batch_rows: int = 64, batching: bool = True) -> None:
        self.clock = FakeClock()
        self.metrics = RecordingMetrics()
        self.admission = Admission(self.metrics, max_queue_rows=10_000,
                                   max_queue_bytes=1 << 40, max_door_wait_s=0.05)
        self.queue = BatchQueue(self.admission, self.clock, max_batch_rows=max_batch_rows,
                                max_batch_wait_s=WAIT_S, batching=batching)

    def put(self, rows: int = 1, deadline_s: float | None = None,
            charge: int = 100) -> FakeWaiter:
        waiter = FakeWaiter()
        self.queue.enqueue(image_rows(rows), waiter, model="m", version=0, label="",
                           deadline_s=deadline_s, charge=charge)
        return waiter

    def take(self) -> Batch | None:
        return self.queue.take_due()

    def serve(self, n: int) -> None:
        """n concurrent callers: all queued, taken in one batch, answered."""
        for _ in range(n):
            self.put()
        batch = self.take()
        assert batch is not None
        assert len(batch.requests) == n
        self.queue.answered(batch)


def test_an_empty_queue_is_never_due() -> None:
    lane = Lane()
    assert lane.queue.due() is None
    assert lane.take() is None


def test_a_lone_request_is_due_at_once() -> None:
    lane = Lane()
    lane.put()
    assert lane.queue.due() == lane.clock.now
    batch = lane.take()
    assert batch is not None
    assert len(batch.requests) == 1


def test_a_batch_waits_for_as_many_callers_as_were_outstanding_at_the_last_peak() -> None:
    lane = Lane()
    lane.serve(4)  # four callers were active: the next batch waits for four
    lane.serve(4)
    first = lane.clock.now
    lane.put()
    lane.clock.advance(0.001)
    lane.put()
    lane.put()
    assert lane.queue.due() == first + WAIT_S, "three of four: due when the oldest has waited"
    assert lane.take() is None
    lane.put()
    assert lane.queue.due() == first, "the fourth makes it full enough: due now"
    batch = lane.take()
    assert batch is not None
    assert len(batch.requests) == 4


def test_an_incomplete_batch_is_due_max_wait_after_its_oldest_request() -> None:
    lane = Lane()
    lane.serve(4)
    lane.serve(4)
    oldest = lane.clock.now
    lane.put()
    lane.clock.advance(WAIT_S / 2)
    lane.put()
    lane.clock.advance(WAIT_S / 2 - 1e-6)
    assert lane.take() is None, "not yet: the oldest has waited less than max_batch_wait_s"
    lane.clock.advance(1e-6)
    assert lane.clock.now == oldest + WAIT_S
    batch = lane.take()
    assert batch is not None
    assert len(batch.requests) == 2


def test_when_load_drops_a_lone_caller_stops_waiting_after_the_waits_it_takes_to_learn() -> None:
    lane = Lane()
    lane.serve(4)
    waits = 0
    for _ in range(5):  # one caller from now on
        lane.put()
        batch = lane.take()
        if batch is None:
            waits += 1
            lane.clock.advance(WAIT_S)
            batch = lane.take()
        assert batch is not None
        lane.queue.answered(batch)
    # The in-flight batch counts in the peak it leaves behind, so two waits, then none.
    assert waits == 2


def test_max_batch_rows_makes_a_batch_due_and_bounds_it() -> None:
    lane = Lane(max_batch_rows=8)
    lane.serve(6)
    for _ in range(2):
        lane.put(rows=3)
    assert lane.take() is None, "6 rows from 2 of 6 callers: not full enough yet"
    lane.put(rows=3)  # 9 rows: full enough by rows, though 3 < 6 callers
    assert lane.queue.due() == lane.clock.now
    batch = lane.take()
    assert batch is not None
    assert [p.rows for p in batch.requests] == [3, 3], "a third would pass 8 rows"
    lane.queue.answered(batch)
    assert len(lane.queue) == 1


def test_a_request_bigger_than_max_batch_rows_is_a_batch_alone() -> None:
    lane = Lane(max_batch_rows=8)
    lane.put(rows=20)
    lane.put(rows=1)
    batch = lane.take()
    assert batch is not None
    assert [p.rows for p in batch.requests] == [20]


def test_requests_past_their_deadline_are_set_aside_when_taken() -> None:
    lane = Lane()
    lane.put(deadline_s=0.005)
    lane.put(deadline_s=0.020)
    lane.put()
    lane.clock.advance(0.005)
    batch = lane.queue.take(lane.clock.now)
    assert len(batch.expired) == 0, "a deadline reached exactly is not yet passed"
    lane.queue.answered(batch)
    lane.put(deadline_s=0.005)
    lane.put()
    lane.clock.advance(0.0051)
    batch = lane.queue.take(lane.clock.now)
    assert len(batch.expired) == 1
    assert len(batch.requests) == 1


def test_expired_requests_take_no_room_in_the_batch() -> None:
    lane = Lane(batching=False)
    lane.put(deadline_s=0.001)
    lane.put()
    lane.clock.advance(0.002)
    batch = lane.take()
    assert batch is not None
    assert (len(batch.expired), len(batch.requests)) == (1, 1)


def test_cancelled_requests_are_dropped_and_give_their_bytes_back_at_once() -> None:
    lane = Lane()
    gone = lane.put(charge=1000)
    lane.put(charge=10)
    gone.cancel()
    assert lane.metrics.bytes == 1010
    batch = lane.take()
    assert batch is not None
    assert len(batch.requests) == 1
    assert lane.metrics.bytes == 10
    assert gone.answers == 0


def test_answered_gives_back_every_member_s_bytes() -> None:
    lane = Lane()
    lane.put(charge=100, deadline_s=0.001)
    lane.put(charge=200)
    lane.clock.advance(0.002)
    batch = lane.take()
    assert batch is not None
    assert lane.metrics.bytes == 300, "taken, not yet answered: still held"
    lane.queue.answered(batch)
    assert lane.metrics.bytes == 0


def test_queued_rows_are_reported_per_model_until_taken() -> None:
    lane = Lane()
    lane.put(rows=3)
    lane.put(rows=2)
    assert lane.metrics.rows == {"m": 5}
    lane.take()
    assert lane.metrics.rows == {"m": 0}


@pytest.mark.parametrize("n", [1, 3])
def test_with_batching_off_each_request_is_a_batch_due_at_once(n: int) -> None:
    lane = Lane(batching=False)
    lane.serve(1)
    for _ in range(n):
        lane.put()
    lane.put()  # whatever the previous peak, a request never waits for company
    for _ in range(n + 1):
        batch = lane.take()
        assert batch is not None
        assert len(batch.requests) == 1
    assert lane.take() is None


def test_a_closing_queue_is_due_at_once() -> None:
    lane = Lane()
    lane.serve(4)
    lane.serve(4)
    lane.put()
    assert lane.take() is None
    lane.queue.close()
    assert lane.take() is not None
