"""What the batcher exchanges with the code around it, as types.

Callers hand it pixels and a `Waiter` and get a `Prediction`; it reads versions through a
`Resolver` (the ModelRegistry in production, a fake in tests), records batches and its queue
through `BatchMetrics` (service/metrics.py's Metrics) and tells time through a `Clock`, so
the queue's rules can be tested with a fake clock and no sleeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from service.registry import ServableVersion

Array = npt.NDArray[np.float32]

# Seconds on a monotonic scale: time.monotonic in production.
Clock = Callable[[], float]

# Told of every version group's forward pass: the version, its input rows and the
# probabilities it answered (issue 15's shadow traffic). Must not modify the arrays.
ForwardObserver = Callable[[ServableVersion, Array, Array], None]


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


class Resolver(Protocol):
    """Which loaded version answers a request (service/registry/__init__.py's ModelRegistry)."""

    def default_model(self) -> str: ...

    def resolve(self, model: str = "", version: int = 0, label: str = "") -> ServableVersion: ...


class BatchMetrics(Protocol):
    """What the batcher records (service/metrics.py's Metrics): each forward pass, and the
    queue's size."""

    def batch_done(self, model: str, version: int, queue_waits_s: Iterable[float],
                   forward_s: float, probabilities: Array) -> None: ...

    def set_queue_bytes(self, held: int) -> None: ...

    def set_queue_rows(self, model: str, rows: int) -> None: ...
