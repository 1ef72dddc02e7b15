"""The custom collector: metric families built at scrape time from counts the service keeps.

This is the prometheus_client maintainers' answer to "how do I record many observations at
once" (client_python #279, #911, PR #1124): keep the counts yourself and emit
`CounterMetricFamily` / `GaugeMetricFamily` / `HistogramMetricFamily` from a `Collector`. It
uses only prometheus_client's public API; the exposition is the one the `Counter`,
`Histogram` and `Gauge` objects used to give (same names, labels, help, `_total` suffix,
cumulative `le` buckets ending in `+Inf`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.metrics.counts import Cell, Hist, Store
from service.metrics.definitions import Family


def _empty(family: Family) -> Metric:
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.help, labels=family.labels)
    if family.kind == "gauge":
        return GaugeMetricFamily(family.name, family.help, labels=family.labels)
    return HistogramMetricFamily(family.name, family.help, labels=family.labels)


def families(store: Store, *, created: bool = True) -> list[Metric]:
    """The store as metric families (`created`: counters carry `_created`, as a Counter's do)."""
    out: list[Metric] = []
    for name, series in store.series.items():
        family = store.families[name]
        metric = _empty(family)
        bounds = [floatToGoString(b) for b in family.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
        for labels, v in series.items():
            if isinstance(v, Hist):
                cumulative = v.counts.cumsum().tolist()
                metric.add_metric(  # type: ignore[attr-defined]
                    labels, list(zip(bounds, (float(c) for c in cumulative), strict=True)), v.sum
                )
            elif isinstance(v, Cell):
                if isinstance(metric, CounterMetricFamily):
                    metric.add_metric(labels, v.value, created=v.created if created else None)
                else:
                    metric.add_metric(labels, v.value)  # type: ignore[attr-defined]
        # A labelless gauge or counter always has its one sample, as a Gauge() would.
        if not family.labels and not series:
            metric.add_metric((), 0.0)  # type: ignore[attr-defined]
        out.append(metric)
    return out


class CountsCollector(Collector):
    """Emits what `read()` returns at each collection: `families(store)` built by the recording
    layer under its lock after recording what waits, or in the supervisor from the workers'
    files summed into a fresh store."""

    def __init__(self, read: Callable[[], list[Metric]]) -> None:
        self._read = read
        self._describe = [_empty(f) for f in Store().families.values()]

    def describe(self) -> Iterable[Metric]:
        """The family names, so the registry refuses a second metric of the same name."""
        return self._describe

    def collect(self) -> Iterable[Metric]:
        return self._read()
