"""Admission by rows and bytes, shedding with hysteresis, and the door: exact, no timing.

service/batching/admission.py is pure: these drive it directly (and the Batcher's
`admit_wire`, which charges a message's bytes before anything parses it).
"""

from __future__ import annotations

import pytest
from support.batching import FakeClock, FakeResolver, FakeWaiter, RecordingMetrics, image_rows

from service.batching import CHARGE_PER_WIRE_BYTE, REQUEST_OVERHEAD_BYTES, Batcher
from service.batching.admission import Admission, request_charge, wire_charge
from service.errors import Overloaded, Unavailable

DOOR_S = 0.05


def admission(rows: int = 10, nbytes: int = 1000, door_s: float = DOOR_S) -> Admission:
    return Admission(RecordingMetrics(), max_queue_rows=rows, max_queue_bytes=nbytes,
                     max_door_wait_s=door_s)


def test_rows_are_bounded_and_a_refusal_starts_shedding() -> None:
    a = admission(rows=10)
    a.admit("m", 6, 1)
    a.admit("m", 4, 1)  # exactly the bound
    assert a.accepting()
    with pytest.raises(Overloaded, match="10 images waiting, 1 more would pass the limit of 10"):
        a.admit("m", 1, 1)
    assert a.shedding
    assert not a.accepting()


def test_rows_leave_the_bound_when_taken_not_when_answered() -> None:
    a = admission(rows=10)
    a.admit("m", 10, 1)
    a.dequeued("m", 10)
    a.admit("m", 10, 1)
    assert a.queued_rows == 10


def test_a_lone_request_bigger_than_the_bounds_is_served_when_nothing_is_held() -> None:
    a = admission(rows=10, nbytes=1000)
    a.admit("m", 50, 5000)
    assert (a.queued_rows, a.held_bytes) == (50, 5000)
    assert a.accepting()


def test_bytes_are_bounded_until_answered() -> None:
    a = admission(nbytes=1000)
    a.admit("m", 1, 600)
    a.dequeued("m", 1)  # taken into a batch: its bytes are still held
    with pytest.raises(Overloaded, match="600 bytes held by queued requests, 401 more"):
        a.admit("m", 1, 401)
    assert a.shedding
    assert a.held_bytes == 600, "a refused request holds nothing"
    a.release(600)
    a.admit("m", 1, 1000)


def test_check_wire_refuses_what_cannot_fit_and_holds_nothing() -> None:
    a = admission(nbytes=1000)
    a.check_wire(5000)  # nothing held: a lone request of any size may come in
    assert a.held_bytes == 0
    a.admit("m", 1, 500)
    a.check_wire(500)
    assert a.accepting()
    with pytest.raises(Overloaded, match="queue full"):
        a.check_wire(501)
    assert a.shedding
    assert a.held_bytes == 500


def test_shedding_stops_only_when_rows_are_back_to_three_quarters() -> None:
    a = admission(rows=100, nbytes=1000)
    a.admit("m", 80, 400)
    a.admit("m", 1, 500)
    with pytest.raises(Overloaded):
        a.admit("m", 1, 200)
    a.dequeued("m", 1)
    a.release(500)  # bytes 400 <= 750, but rows 80 > 75
    assert a.shedding
    a.dequeued("m", 80)
    a.release(100)  # rows 0, bytes 300
    assert not a.shedding
    assert a.accepting()


def test_shedding_stops_only_when_bytes_are_back_to_three_quarters() -> None:
    a = admission(rows=100, nbytes=1000)
    a.admit("m", 1, 900)
    with pytest.raises(Overloaded):
        a.admit("m", 1, 200)
    a.dequeued("m", 1)
    a.release(100)  # bytes 800 > 750
    assert a.shedding
    a.release(50)  # bytes 750
    assert not a.shedding


def test_the_door_lets_in_parks_and_refuses() -> None:
    a = admission()
    assert a.door(0.0) is True
    assert a.door(DOOR_S) is True, "not shedding: a call that waited its turn comes in"
    assert a.door(DOOR_S * 1.01) is False, "waited past the bound for its turn: refused"
    a.admit("m", 10, 1)
    with pytest.raises(Overloaded):
        a.admit("m", 1, 1)
    assert a.door(0.0) is None, "shedding: wait unread"
    assert a.door(DOOR_S / 2) is None
    assert a.door(DOOR_S) is False, "shedding for the whole bound: refused"
    assert isinstance(a.refusal(), Overloaded)
    assert a.refusal() is a.refusal(), "made once: a refusal is cheap under a flood"


def test_with_no_door_wait_a_shedding_admission_refuses_at_once() -> None:
    a = admission(door_s=0.0)
    assert a.door(0.0) is True
    a.admit("m", 10, 1)
    with pytest.raises(Overloaded):
        a.admit("m", 1, 1)
    assert a.door(0.0) is False


def test_a_closing_admission_refuses_everything_as_unavailable() -> None:
    a = admission()
    a.close()
    assert not a.accepting()
    assert a.door(0.0) is False
    assert isinstance(a.refusal(), Unavailable)
    with pytest.raises(Unavailable, match="shutting down"):
        a.admit("m", 1, 1)


def test_charges_are_known_before_parsing_and_never_shrink_after() -> None:
    assert wire_charge(1000) == CHARGE_PER_WIRE_BYTE * 1000 + REQUEST_OVERHEAD_BYTES
    assert request_charge(10, 1000) == wire_charge(1000), "decoded smaller: the wire charge"
    assert request_charge(10_000, 1000) == 10_000 + REQUEST_OVERHEAD_BYTES


def test_admit_wire_refuses_a_message_before_it_is_parsed() -> None:
    budget = wire_charge(784) + wire_charge(784) - 1  # one 1-image message fits, not two
    batcher = Batcher(FakeResolver(), RecordingMetrics(), max_batch_rows=64,
                      max_batch_wait_s=0.0, max_queue_rows=100, max_queue_bytes=budget,
                      clock=FakeClock())
    batcher.admit_wire(784)
    batcher.submit_nowait(image_rows(1), FakeWaiter(), wire_bytes=784)
    with pytest.raises(Overloaded, match="queue full"):
        batcher.admit_wire(784)
    assert not batcher.accepting(), "a refusal sheds: the next calls wait at the door"
    with pytest.raises(Overloaded, match="refused until what is queued falls to 75%"):
        batcher.admit_wire(1)
    assert batcher.run_queued() is None
    assert batcher.accepting()
    batcher.admit_wire(784)
