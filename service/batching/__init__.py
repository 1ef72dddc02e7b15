"""Batching: a bounded queue coalescing concurrent requests into one forward per version."""

from service.batching.admission import (
    CHARGE_PER_WIRE_BYTE,
    REQUEST_OVERHEAD_BYTES,
    RESUME_FRACTION,
)
from service.batching.batcher import Batcher
from service.batching.contract import Array, ForwardObserver, Prediction, Waiter

__all__ = [
    "CHARGE_PER_WIRE_BYTE",
    "REQUEST_OVERHEAD_BYTES",
    "RESUME_FRACTION",
    "Array",
    "Batcher",
    "ForwardObserver",
    "Prediction",
    "Waiter",
]
