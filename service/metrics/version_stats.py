"""Per model version counts in Triton's terms (ModelStatistics), kept beside the Prometheus ones.

The same recording pass that fills the Prometheus counts (service/metrics/recording.py) adds
here, so one set of observations feeds both `/metrics` and the v2 `ModelStatistics` RPC (and
the HTTP `/v2/models/{name}/stats` endpoint): a request or a batch is never timed twice.

Triton's meanings (its docs/protocol/extension_statistics.md): `inference_count` images
inferred, `execution_count` forward passes, `success`/`fail` inference requests and their
whole time in the server, `queue` each successful request's wait for its batch,
`compute_infer` each successful request's share of its forward pass (the pass's time, charged
to every request in it, as Triton does), `batch_stats` per batch size the passes and their
time. Decode and encode are not timed apart from the whole request: `compute_input` and
`compute_output` stay zero rather than claim a split this server does not measure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# The RPC methods (metric label values) that are inference requests in Triton's sense.
INFER_METHODS = frozenset({"Classify", "ClassifyStream", "ModelInfer"})
NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.ns += round(seconds * NS_PER_S)


@dataclass(slots=True)
class VersionStats:
    """One model version's counts since this process loaded it first."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    # batch size -> its forward passes (count) and their time
    batches: dict[int, Duration] = field(default_factory=dict)

    def requests_done(self, ok: bool, durations_s: list[float]) -> None:
        (self.success if ok else self.fail).add(len(durations_s), sum(durations_s))

    def batches_done(self, rows: list[int], forwards_s: list[float], requests: list[int],
                     waits_s: list[float], finished_ms: int) -> None:
        """Batches in bulk (a recording pass's worth): rows, forward time and requests of
        each, every request's queue wait, when the last one finished."""
        self.inference_count += sum(rows)
        self.execution_count += len(rows)
        self.queue.add(len(waits_s), sum(waits_s))
        self.compute_infer.add(sum(requests),
                               sum(f * n for f, n in zip(forwards_s, requests, strict=True)))
        per_size: dict[int, list[float]] = {}
        for size, f in zip(rows, forwards_s, strict=True):
            per_size.setdefault(size, []).append(f)
        for size, times in per_size.items():
            b = self.batches.get(size)
            if b is None:
                b = self.batches[size] = Duration()
            b.add(len(times), sum(times))
        self.last_inference_ms = max(self.last_inference_ms, finished_ms)

    def batch_done(self, rows: int, forward_s: float, waits_s: list[float],
                   finished_ms: int) -> None:
        self.batches_done([rows], [forward_s], [len(waits_s)], waits_s, finished_ms)

    def copy(self) -> VersionStats:
        return copy.deepcopy(self)
