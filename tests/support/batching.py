"""Fakes for the batcher's injection points: a clock that moves only when told, a waiter
that records its answer, models that answer recognisably (or fail), and a resolver over them.

They let the batch queue's rules be tested exactly: what is due, what a batch holds and who
hears what, with no thread, no event loop and no sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from service.batching import Prediction
from service.errors import NotFound
from service.model import Model
from service.registry import ServableVersion

Array = npt.NDArray[np.float32]


class FakeClock:
    """Seconds that advance only through `advance`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeWaiter:
    """Records the one answer it gets; `cancel()` makes it stop wanting one."""

    def __init__(self) -> None:
        self.result: Prediction | None = None
        self.error: BaseException | None = None
        self.answers = 0
        self.cancelled = False

    def done(self) -> bool:
        return self.cancelled

    def set_result(self, result: Prediction) -> None:
        self.answers += 1
        self.result = result

    def set_exception(self, exception: BaseException) -> None:
        self.answers += 1
        self.error = exception

    def cancel(self) -> None:
        self.cancelled = True


class TaggedModel:
    """Answers row i of x with [x[i, 0], tag, 0, ...]: which input row and which version
    produced each answer can be read back. Records each forward's input; `fail` raises."""

    def __init__(self, tag: float, clock: FakeClock | None = None,
                 forward_s: float = 0.0) -> None:
        self.tag = tag
        self.inputs: list[Array] = []
        self.threads: list[str] = []  # the thread each forward ran on
        self.fail = False
        self._clock = clock
        self._forward_s = forward_s

    def predict(self, x: Array) -> Array:
        self.inputs.append(x)
        self.threads.append(threading.current_thread().name)
        if self._clock is not None:
            self._clock.advance(self._forward_s)
        if self.fail:
            raise FloatingPointError("boom")
        out = np.zeros((x.shape[0], 10), dtype=np.float32)
        out[:, 0] = x[:, 0]
        out[:, 1] = self.tag
        return out


def servable(name: str, version: int, model: TaggedModel) -> ServableVersion:
    return ServableVersion(name, version, cast(Model, model), Path("."), 0.0)


class FakeResolver:
    """Versions 1 and 2 of model "m" (0 means the current one, 1); counts resolutions."""

    def __init__(self, clock: FakeClock | None = None, forward_s: float = 0.0) -> None:
        self.models = {v: TaggedModel(float(v), clock, forward_s) for v in (1, 2)}
        self.versions = {v: servable("m", v, m) for v, m in self.models.items()}
        self.current = 1
        self.resolutions: list[tuple[str, int, str]] = []

    def default_model(self) -> str:
        return "m"

    def resolve(self, model: str = "", version: int = 0, label: str = "") -> ServableVersion:
        self.resolutions.append((model, version, label))
        sv = self.versions.get(version or self.current)
        if sv is None or model not in ("", "m"):
            raise NotFound(f"no version {version} of model {model!r}")
        return sv


@dataclass(frozen=True)
class BatchRecord:
    model: str
    version: int
    waits_s: list[float]
    forward_s: float
    rows: int


class RecordingMetrics:
    """What the batcher recorded: each batch, and the queue's gauges as last set."""

    def __init__(self) -> None:
        self.batches: list[BatchRecord] = []
        self.bytes = 0
        self.rows: dict[str, int] = {}

    def batch_done(self, model: str, version: int, queue_waits_s: Iterable[float],
                   forward_s: float, probabilities: Array) -> None:
        self.batches.append(BatchRecord(model, version, list(queue_waits_s), forward_s,
                                        int(probabilities.shape[0])))

    def set_queue_bytes(self, held: int) -> None:
        self.bytes = held

    def set_queue_rows(self, model: str, rows: int) -> None:
        self.rows[model] = rows


def image_rows(n: int, first: int = 0) -> Array:
    """n rows whose first pixel is first, first+1, ... (scaled into 0..1): each row is
    recognisable in TaggedModel's answer."""
    x = np.zeros((n, 784), dtype=np.float32)
    x[:, 0] = (first + np.arange(n)) / 1000.0
    return x


def first_pixels(p: Prediction) -> list[int]:
    """Which image rows an answer is for (see image_rows)."""
    return [round(float(v) * 1000) for v in p.probabilities[:, 0]]

