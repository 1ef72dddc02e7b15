"""Admission: what the batcher lets in, by rows and by bytes, and the door while it sheds.

Pure state and rules (no threads, no clock): the Batcher serialises calls with its lock.

A request is charged bytes from the length of its message before anything parses it
(`wire_charge`, checked by `check_wire`), and holds them until it is answered, so the memory
of queued and in-flight requests is bounded by `max_queue_bytes` whatever the number of
callers; queued rows stay bounded by `max_queue_rows`. Once a request is refused for either
bound the batcher sheds (`accepting()` is False: front ends refuse new calls at the door,
without reading them) until what it holds falls to RESUME_FRACTION of both bounds, so a flood
of retries costs the polling thread as little as possible while compute drains
(docs/serving.md, "Overload").
"""

from __future__ import annotations

import collections

from service.batching.contract import BatchMetrics
from service.errors import Overloaded, Unavailable

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


def wire_charge(wire_bytes: int) -> int:
    """What a message of `wire_bytes` bytes will hold once decoded, known before parsing."""
    return CHARGE_PER_WIRE_BYTE * wire_bytes + REQUEST_OVERHEAD_BYTES


def request_charge(decoded_bytes: int, wire_bytes: int) -> int:
    """What a decoded request holds until answered: its rows, or its wire charge if larger
    (so a request never holds less than `check_wire` let in)."""
    return max(decoded_bytes, CHARGE_PER_WIRE_BYTE * wire_bytes) + REQUEST_OVERHEAD_BYTES


class Admission:
    """Rows queued and bytes held against their bounds; shedding with hysteresis; the door."""

    def __init__(self, gauges: BatchMetrics, *, max_queue_rows: int, max_queue_bytes: int,
                 max_door_wait_s: float) -> None:
        self._gauges = gauges
        self.max_queue_rows = max_queue_rows
        self.max_queue_bytes = max_queue_bytes
        self.max_door_wait_s = max_door_wait_s
        self.held_bytes = 0  # charged by queued and in-flight requests, until answered
        self.queued_rows = 0  # rows waiting in any queue (not yet taken into a batch)
        self._rows_by_model: collections.Counter[str] = collections.Counter()
        self.shedding = False  # refuse at the door until below RESUME_FRACTION of bounds
        self.closing = False
        # Made once: under a flood every refusal costs the polling thread.
        self._refusal = Overloaded(
            f"queue full: new requests are refused until what is queued falls to "
            f"{RESUME_FRACTION:.0%} of the limits ({max_queue_bytes} bytes, {max_queue_rows} "
            f"images); retry later"
        )
        self._closed = Unavailable("server is shutting down")

    # --- before a request is read

    def accepting(self) -> bool:
        """False while shedding or closing: front ends refuse new calls without reading them."""
        return not self.shedding and not self.closing

    def door(self, waited_s: float) -> bool | None:
        """For a call at the door for `waited_s`: True to let it in, None to keep it waiting
        (shedding, for less than `max_door_wait_s`), False to refuse it now (see
        Batcher.door)."""
        if self.closing or waited_s > self.max_door_wait_s:
            return False
        if not self.shedding:
            return True
        return None if waited_s < self.max_door_wait_s else False

    def refusal(self) -> Overloaded | Unavailable:
        """The error for a call refused at the door."""
        return self._closed if self.closing else self._refusal

    def wire_fits(self, charge: int) -> bool:
        """Whether `charge` more bytes fit now (a read without side effects: callers may use
        it without the lock and call `check_wire` under it when it says no)."""
        held = self.held_bytes
        return not held or held + charge <= self.max_queue_bytes

    def check_wire(self, charge: int) -> None:
        """Raise Overloaded (and shed) unless `charge` more bytes fit. Nothing is held: a
        request is charged when it is queued (`admit`)."""
        if not self.wire_fits(charge):  # shed only while something is held, or nothing ends it
            self.shedding = True
            raise self._bytes_error(charge)

    # --- a request's life: admitted (queued), dequeued (taken into a batch), released

    def admit(self, model: str, rows: int, charge: int) -> None:
        """Raise unless `rows` images charged `charge` bytes fit now; else hold them."""
        if self.closing:
            raise self._closed
        queued = self.queued_rows
        if queued and queued + rows > self.max_queue_rows:
            self.shedding = True
            raise Overloaded(
                f"queue full: {queued} images waiting, {rows} more would pass the limit of "
                f"{self.max_queue_rows}; retry later"
            )
        if not self.wire_fits(charge):
            self.shedding = True
            raise self._bytes_error(charge)
        self.queued_rows = queued + rows
        self.held_bytes += charge
        by_model = self._rows_by_model
        by_model[model] += rows
        self._gauges.set_queue_bytes(self.held_bytes)
        self._gauges.set_queue_rows(model, by_model[model])

    def dequeued(self, model: str, rows: int) -> None:
        """`rows` of `model` left the queue for a batch (their bytes stay held)."""
        self.queued_rows -= rows
        by_model = self._rows_by_model
        by_model[model] -= rows
        self._gauges.set_queue_rows(model, by_model[model])

    def release(self, charge: int) -> None:
        """Answered requests give back `charge` bytes; shedding stops once both bounds have
        room again."""
        self.held_bytes -= charge
        if (self.shedding
                and self.held_bytes <= RESUME_FRACTION * self.max_queue_bytes
                and self.queued_rows <= RESUME_FRACTION * self.max_queue_rows):
            self.shedding = False
        self._gauges.set_queue_bytes(self.held_bytes)

    def close(self) -> None:
        """Refuse everything new (Unavailable) from now on."""
        self.closing = True

    def _bytes_error(self, charge: int) -> Overloaded:
        return Overloaded(
            f"queue full: {self.held_bytes} bytes held by queued requests, {charge} more would "
            f"pass the limit of {self.max_queue_bytes}; retry later"
        )
