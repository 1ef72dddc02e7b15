"""Batching: a bounded queue coalescing concurrent requests into one forward per version."""

from service.batching.batcher import (
    CHARGE_PER_WIRE_BYTE,
    REQUEST_OVERHEAD_BYTES,
    RESUME_FRACTION,
    Batcher,
    Prediction,
    Waiter,
)

__all__ = [
    "CHARGE_PER_WIRE_BYTE",
    "REQUEST_OVERHEAD_BYTES",
    "RESUME_FRACTION",
    "Batcher",
    "Prediction",
    "Waiter",
]
