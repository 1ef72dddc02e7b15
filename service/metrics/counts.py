"""The counts the service keeps itself: plain numbers and NumPy bucket arrays, no metric objects.

A `Store` holds, per hot family (service/metrics/definitions.py), one `Cell` (a counter or
gauge value) or `Hist` (bucket counts and a sum) per label set. The recording layer adds to
it; the collector turns it into metric families at scrape time; in multiprocess mode a worker
writes it to a file as JSON (`to_json`) and the supervisor sums the files (`merge_json`).
Nothing here is thread-safe on its own: the recording layer adds under its flush lock.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from service.metrics.definitions import HOT, Family

Labels = tuple[str, ...]


class Cell:
    """A counter's or a gauge's value; `created` is when the label set first appeared."""

    __slots__ = ("created", "value")

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.created = time.time()


class Hist:
    """A histogram's state as Prometheus exports it: counts per bucket (not cumulative, the
    last one is +Inf) and the sum. `le` is inclusive, as in prometheus_client's observe()."""

    __slots__ = ("_bounds", "_bounds_list", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds_list = list(bounds)
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """One value: a binary search (NumPy's fixed cost per call would dominate here)."""
        self.counts[bisect.bisect_left(self._bounds_list, value)] += 1
        self.sum += value

    def observe_many(self, values: npt.NDArray[Any]) -> None:
        """Many values with two NumPy calls instead of one search each."""
        if values.size == 0:
            return
        index = np.searchsorted(self._bounds, values, side="left")
        self.counts += np.bincount(index, minlength=len(self.counts))
        self.sum += float(values.sum(dtype=np.float64))  # float32 rows: sum in float64

    def add(self, counts: list[int], total: float) -> None:
        self.counts += np.asarray(counts, dtype=np.int64)
        self.sum += total

    @property
    def count(self) -> int:
        return int(self.counts.sum())


class Store:
    """Every hot family's label sets and values. Families and label sets are only ever added
    by the recording layer, which bounds the labels (loaded names only)."""

    def __init__(self, families: tuple[Family, ...] = HOT) -> None:
        self.families = {f.name: f for f in families}
        self.series: dict[str, dict[Labels, Cell | Hist]] = {f.name: {} for f in families}

    def cell(self, family: Family, labels: Labels) -> Cell:
        got = self.series[family.name].get(labels)
        if got is None:
            got = self.series[family.name][labels] = Cell()
        assert isinstance(got, Cell)
        return got

    def hist(self, family: Family, labels: Labels) -> Hist:
        got = self.series[family.name].get(labels)
        if got is None:
            got = self.series[family.name][labels] = Hist(family.buckets)
        assert isinstance(got, Hist)
        return got

    def remove(self, family: Family, match: dict[int, str]) -> None:
        """Drop the label sets whose label at each given position has the given value."""
        series = self.series[family.name]
        for labels in [k for k in series if all(k[i] == v for i, v in match.items())]:
            del series[labels]

    # --- multiprocess: one JSON document per worker, summed by the supervisor

    def to_json(self, live: tuple[Family, ...]) -> dict[str, Any]:
        """{"totals": {family: [[labels, value] | [labels, counts, sum]]}, "live": {...}}:
        `live` families (gauges of live state) apart, so a dead worker's can be dropped."""
        live_names = {f.name for f in live}
        out: dict[str, Any] = {"totals": {}, "live": {}}
        for name, series in self.series.items():
            rows: list[list[Any]] = []
            for labels, v in series.items():
                if isinstance(v, Hist):
                    rows.append([list(labels), v.counts.tolist(), v.sum])
                else:
                    rows.append([list(labels), v.value])
            out["live" if name in live_names else "totals"][name] = rows
        return out

    def merge_json(self, doc: dict[str, Any], *, with_live: bool = True) -> None:
        """Add one worker's document: counters, histograms and live gauges are all sums."""
        for section in ("totals", "live") if with_live else ("totals",):
            for name, rows in doc.get(section, {}).items():
                family = self.families.get(name)
                if family is None:  # a family a newer or older version wrote: skip it
                    continue
                for row in rows:
                    labels = tuple(str(x) for x in row[0])
                    if len(labels) != len(family.labels):
                        continue
                    if family.kind == "histogram":
                        if len(row[1]) == len(family.buckets) + 1:
                            self.hist(family, labels).add(row[1], float(row[2]))
                    else:
                        self.cell(family, labels).value += float(row[1])
