"""Unit tests of service/metrics/: a fresh CollectorRegistry per test, exact values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from service import metrics as metrics_mod
from service.config import Settings
from service.metrics import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_S,
    Metrics,
    start_exporter,
)
from service.metrics import recording as recording_mod
from service.metrics.collector import CountsCollector, families
from service.metrics.counts import Hist, Store
from service.metrics.definitions import Family


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def loaded(metrics: Metrics, *versions: int) -> Metrics:
    """As the registry does on loading: only loaded names and versions label a series."""
    for v in versions:
        metrics.version_available("mnist", v, 0.01)
    return metrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def probs(rows: list[tuple[int, float]]) -> np.ndarray:
    """Probability rows whose argmax and max are the given (class, top probability)."""
    out = np.zeros((len(rows), 10), dtype=np.float32)
    for i, (cls, p) in enumerate(rows):
        out[i, :] = (1.0 - p) / 9
        out[i, cls] = p
    return out


def test_request_done_counts_requests_images_and_duration(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    loaded(metrics, 3)
    metrics.request_done("Classify", "mnist", "3", "OK", 5, 0.002)
    metrics.request_done("Classify", "mnist", "3", "OK", 2, 0.3)
    metrics.request_done("Classify", "mnist", "", "INVALID_ARGUMENT", 0, 0.0001)

    ok = {"method": "Classify", "model": "mnist", "version": "3", "code": "OK"}
    bad = {"method": "Classify", "model": "mnist", "version": "", "code": "INVALID_ARGUMENT"}
    assert value(registry, "mnist_requests_total", **ok) == 2
    assert value(registry, "mnist_images_total", **ok) == 7
    assert value(registry, "mnist_requests_total", **bad) == 1
    assert value(registry, "mnist_images_total", **bad) == 0
    d = {"method": "Classify", "model": "mnist"}
    assert value(registry, "mnist_request_duration_seconds_count", **d) == 3
    assert value(registry, "mnist_request_duration_seconds_sum", **d) == pytest.approx(0.3021)
    assert value(registry, "mnist_request_duration_seconds_bucket", **d, le="0.0001") == 1
    assert value(registry, "mnist_request_duration_seconds_bucket", **d, le="0.0025") == 2
    assert value(registry, "mnist_request_duration_seconds_bucket", **d, le="0.25") == 2
    assert value(registry, "mnist_request_duration_seconds_bucket", **d, le="0.5") == 3


def test_batch_done_records_rows_waits_forward_classes_and_confidence(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    p = probs([(7, 0.95), (7, 0.55), (1, 0.998), (0, 0.15)])
    metrics.batch_done("mnist", 2, [0.0001, 0.003, 0.003], 0.0004, p)

    m = {"model": "mnist"}
    assert value(registry, "mnist_batch_rows_count", **m) == 1
    assert value(registry, "mnist_batch_rows_sum", **m) == 4
    assert value(registry, "mnist_batch_rows_bucket", **m, le="2.0") == 0
    assert value(registry, "mnist_batch_rows_bucket", **m, le="4.0") == 1
    assert value(registry, "mnist_forward_duration_seconds_count", **m) == 1
    assert value(registry, "mnist_forward_duration_seconds_bucket", **m, le="0.0005") == 1
    assert value(registry, "mnist_forward_duration_seconds_bucket", **m, le="0.00025") == 0
    assert value(registry, "mnist_batch_queue_wait_seconds_count", **m) == 3
    assert value(registry, "mnist_batch_queue_wait_seconds_sum", **m) == pytest.approx(0.0061)
    assert value(registry, "mnist_batch_queue_wait_seconds_bucket", **m, le="0.0001") == 1
    assert value(registry, "mnist_batch_queue_wait_seconds_bucket", **m, le="0.0025") == 1
    assert value(registry, "mnist_batch_queue_wait_seconds_bucket", **m, le="0.005") == 3

    mv = {"model": "mnist", "version": "2"}
    assert value(registry, "mnist_predictions_total", **mv, **{"class": "7"}) == 2
    assert value(registry, "mnist_predictions_total", **mv, **{"class": "1"}) == 1
    assert value(registry, "mnist_predictions_total", **mv, **{"class": "0"}) == 1
    assert value(registry, "mnist_predictions_total", **mv, **{"class": "3"}) == 0
    conf = "mnist_prediction_confidence_ratio"
    assert value(registry, f"{conf}_count", **mv) == 4
    assert value(registry, f"{conf}_bucket", **mv, le="0.2") == 1
    assert value(registry, f"{conf}_bucket", **mv, le="0.6") == 2
    assert value(registry, f"{conf}_bucket", **mv, le="0.95") == 3
    assert value(registry, f"{conf}_bucket", **mv, le="0.99") == 3
    assert value(registry, f"{conf}_bucket", **mv, le="0.999") == 4
    assert value(registry, f"{conf}_sum", **mv) == pytest.approx(0.95 + 0.55 + 0.998 + 0.15)

    # A second batch adds to the cached children.
    metrics.batch_done("mnist", 2, np.array([0.02]), 0.001, probs([(7, 0.9)]))
    assert value(registry, "mnist_predictions_total", **mv, **{"class": "7"}) == 3
    assert value(registry, "mnist_batch_rows_count", **m) == 2
    assert value(registry, "mnist_batch_queue_wait_seconds_count", **m) == 4


def test_small_and_large_batches_record_the_same_samples() -> None:
    """Batches of <= SMALL_BATCH_ROWS go row by row in Python, larger ones through NumPy:
    the same rows and waits must give the same per-row series either way."""
    rng = np.random.default_rng(7)
    p = rng.dirichlet(np.ones(10) * 0.3, size=40).astype(np.float32)
    waits = rng.uniform(0, 0.01, 40)
    big, small = CollectorRegistry(), CollectorRegistry()
    Metrics(big).batch_done("mnist", 1, waits.tolist(), 0.001, p)
    m = Metrics(small)
    step = recording_mod.SMALL_BATCH_ROWS
    for i in range(0, 40, step):
        m.batch_done("mnist", 1, waits[i:i + step].tolist(), 0.001, p[i:i + step])
        m.flush()  # each recorded alone, so row by row (a flush groups what waits)

    def per_row(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        wanted = ("mnist_predictions", "mnist_prediction_confidence_ratio",
                  "mnist_batch_queue_wait_seconds")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in reg.collect() if fam.name in wanted
            for s in fam.samples if not s.name.endswith("_created")
        }

    a, b = per_row(big), per_row(small)
    assert a.keys() == b.keys()
    assert len(a) > 30
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert big.get_sample_value("mnist_batch_rows_count", {"model": "mnist"}) == 1
    assert small.get_sample_value("mnist_batch_rows_count", {"model": "mnist"}) == 5


def test_batches_recorded_together_equal_batches_recorded_one_by_one() -> None:
    """A scrape records every batch since the previous one grouped per model version: the
    series must be exactly those of recording each batch on its own."""
    rng = np.random.default_rng(11)
    batches = [(1 + i % 2, rng.dirichlet(np.ones(10) * 0.5, size=n).astype(np.float32),
                rng.uniform(0, 0.01, max(1, n // 3)).tolist(), float(rng.uniform(1e-4, 3e-3)))
               for i, n in enumerate([1, 3, 9, 64, 2, 17, 5, 40])]
    together, alone = CollectorRegistry(), CollectorRegistry()
    t, a = Metrics(together), Metrics(alone)
    for version, p, waits, forward_s in batches:
        t.batch_done("mnist", version, waits, forward_s, p)
        a.batch_done("mnist", version, waits, forward_s, p)
        a.flush()

    def series(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in reg.collect() if fam.name.startswith(("mnist_batch", "mnist_forward",
                                                             "mnist_predict"))
            for s in fam.samples if not s.name.endswith("_created")
        }

    x, y = series(together), series(alone)
    assert x.keys() == y.keys()
    assert together.get_sample_value("mnist_batch_rows_count", {"model": "mnist"}) == 8
    assert sum(v for (n, _), v in x.items() if n == "mnist_predictions_total") == 141
    for key in x:
        assert x[key] == pytest.approx(y[key], rel=1e-9), key


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS_S, CONFIDENCE_BUCKETS])
def test_kept_counts_export_what_observe_exports(buckets: tuple[float, ...]) -> None:
    """The service's own bucket counts, emitted by the collector, must give the very samples
    a prometheus_client Histogram fed one observe() per value gives."""
    rng = np.random.default_rng(5)
    values = np.concatenate([
        rng.uniform(0, 1.2 * buckets[-1], 500),
        np.asarray(buckets, dtype=np.float64),  # exactly on each bound: le is inclusive
        np.asarray(buckets, dtype=np.float64) * (1 + 1e-9),  # just above each bound
        np.array([0.0, 1e9]),
    ])
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    h_a = Histogram("h", "h", ["model"], buckets=buckets, registry=reg_a)
    for v in values.tolist():
        h_a.labels("m").observe(v)
    family = Family("h", "histogram", "h", ("model",), buckets)
    store = Store((family,))
    kept = store.hist(family, ("m",))
    assert isinstance(kept, Hist)
    kept.observe_many(values[: len(values) // 2])
    for v in values[len(values) // 2 :].tolist():
        kept.observe(v)  # the one-value path too
    reg_b.register(CountsCollector(lambda: families(store)))

    def samples(reg: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for fam in reg.collect() for s in fam.samples if not s.name.endswith("_created")
        }

    a, b = samples(reg_a), samples(reg_b)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
    assert a[("h_count", "")] == len(values)


def test_no_private_prometheus_client_names_in_the_service() -> None:
    """Issue 12: the metrics package uses prometheus_client's public API only: no private
    attribute of anything but its own objects (`child._sum`, `registry._collector_to_names`),
    no private name imported or fetched by string, so an upgrade cannot silently miscount."""
    import ast

    package = Path(metrics_mod.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__")
            own = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in ("self", "cls")
            if private and not own:
                offenders.append(f"{where} .{getattr(node, 'attr', '')}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prom"):
                offenders += [f"{where} import {a.name}" for a in node.names
                              if a.name.startswith("_")]
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr":
                offenders.append(f"{where} getattr")
    assert offenders == []


def test_version_lifecycle_gauges_loads_and_rejections(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    metrics.version_available("mnist", 1, 0.02)
    metrics.set_current_version("mnist", 1)
    metrics.version_failed("mnist", 2, "checksum_mismatch", 0.01)
    metrics.version_available("mnist", 3, 0.04)
    metrics.set_current_version("mnist", 3)
    metrics.batch_done("mnist", 1, [0.001], 0.001, probs([(4, 0.9)]))
    metrics.version_unloaded("mnist", 1)

    assert value(registry, "mnist_model_version_loaded", model="mnist", version="3") == 1
    assert value(registry, "mnist_model_version_loaded", model="mnist", version="1") is None
    assert value(registry, "mnist_model_current_version", model="mnist") == 3
    assert value(registry, "mnist_model_loads_total", model="mnist", result="success") == 2
    assert value(registry, "mnist_model_loads_total", model="mnist", result="failure") == 1
    assert value(registry, "mnist_model_load_duration_seconds_count", model="mnist") == 3
    assert value(
        registry, "mnist_model_rejected_versions_total", model="mnist", reason="checksum_mismatch"
    ) == 1
    # The unloaded version's per-version series are gone ...
    gone = {"model": "mnist", "version": "1"}
    assert value(registry, "mnist_predictions_total", **gone, **{"class": "4"}) is None
    assert value(registry, "mnist_prediction_confidence_ratio_count", **gone) is None
    # ... and a later batch on it (one still running at the swap) records afresh, not into a
    # child cached before the removal that the registry no longer exports.
    metrics.batch_done("mnist", 1, [0.001], 0.001, probs([(4, 0.9)]))
    assert value(registry, "mnist_predictions_total", **gone, **{"class": "4"}) == 1

    metrics.set_current_version("mnist", None)
    assert value(registry, "mnist_model_current_version", model="mnist") is None


def test_queue_rows_and_inflight_gauges(metrics: Metrics, registry: CollectorRegistry) -> None:
    loaded(metrics, 1)
    metrics.set_queue_rows("mnist", 12)
    metrics.set_queue_rows("mnist", 3)
    metrics.inflight.inc()
    metrics.inflight.inc()
    metrics.inflight.dec()
    assert value(registry, "mnist_batch_queue_rows", model="mnist") == 3
    assert value(registry, "mnist_inflight_requests") == 1


def test_disabled_records_nothing_and_costs_no_registry() -> None:
    m = Metrics.disabled()
    m.request_done("Classify", "mnist", "1", "OK", 3, 0.01)
    m.batch_done("mnist", 1, [0.001], 0.001, probs([(1, 0.9)]))
    m.set_queue_rows("mnist", 4)
    m.version_available("mnist", 1, 0.1)
    m.set_current_version("mnist", 1)
    assert m.registry.get_sample_value("mnist_requests_total", {
        "method": "Classify", "model": "mnist", "version": "1", "code": "OK"}) is None
    assert m.registry.get_sample_value("mnist_model_current_version", {"model": "mnist"}) is None


def test_process_metrics_are_on_the_registry(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    names = {s.name for fam in registry.collect() for s in fam.samples}
    assert "process_cpu_seconds_total" in names
    assert "process_resident_memory_bytes" in names
    assert "python_info" in names
    assert any(n.startswith("python_gc_") for n in names)


def test_exporter_serves_the_registry_and_stops(metrics: Metrics) -> None:
    loaded(metrics, 1)
    metrics.request_done("Classify", "mnist", "1", "OK", 4, 0.01)
    exporter = start_exporter(Settings(metrics_host="127.0.0.1", metrics_port=0), metrics)
    assert exporter is not None
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    finally:
        exporter.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text) for s in fam.samples
    }
    key = ("mnist_images_total", (("code", "OK"), ("method", "Classify"), ("model", "mnist"),
                                  ("version", "1")))
    assert samples[key] == 4
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


def test_exporter_is_off_when_metrics_are_disabled(metrics: Metrics) -> None:
    assert start_exporter(Settings(metrics_enabled=False, metrics_port=0), metrics) is None


_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from prometheus_client import CollectorRegistry
    from service.metrics import Metrics
    m = Metrics(CollectorRegistry())
    n = int(sys.argv[1])
    m.version_available("mnist", 2, 0.01)
    m.set_current_version("mnist", 2)
    for _ in range(n):
        m.request_done("Classify", "mnist", "2", "OK", 3, 0.002)
    p = np.zeros((n, 10), dtype=np.float32)
    p[:, 5] = 0.9
    m.batch_done("mnist", 2, [0.001] * n, 0.0005, p)
    m.inflight.inc()
    m.set_queue_rows("mnist", n)
    m.close()  # the last snapshot, as a worker does at exit (else within 0.5 s)
    print("ready", flush=True)
    sys.stdin.readline()  # stay alive (live gauges) until the test says go
""")


def test_multiprocess_values_add_up_and_dead_workers_leave_no_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prom"
    monkeypatch.delenv(metrics_mod.MULTIPROC_ENV, raising=False)
    # prepare_multiprocess writes os.environ; monkeypatch restores it after the test.
    monkeypatch.setenv(metrics_mod.MULTIPROC_ENV, "")
    directory.mkdir()
    (directory / "counter_999.db").write_bytes(b"left by an old run")
    (directory / "mnist_counts_999.json").write_text('{"totals": {}, "live": {}}')
    (directory / ".mnist_counts_998.json.tmp").write_text('{"tot')  # killed mid-write
    (directory / "README").write_text("an operator's file: not ours to delete")
    metrics_mod.prepare_multiprocess(directory)
    assert os.environ[metrics_mod.MULTIPROC_ENV] == str(directory)
    assert [p.name for p in directory.iterdir()] == ["README"]

    env = dict(os.environ)
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(n)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=env,
        )
        for n in (3, 4)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            assert w.stdout.readline().strip() == "ready"
        reg = metrics_mod.exposition_registry(None)
        ok = {"method": "Classify", "model": "mnist", "version": "2", "code": "OK"}
        assert reg.get_sample_value("mnist_requests_total", ok) == 7
        assert reg.get_sample_value("mnist_images_total", ok) == 21
        assert reg.get_sample_value(
            "mnist_request_duration_seconds_count", {"method": "Classify", "model": "mnist"}
        ) == 7
        assert reg.get_sample_value(
            "mnist_predictions_total", {"model": "mnist", "version": "2", "class": "5"}
        ) == 7
        assert reg.get_sample_value(
            "mnist_batch_queue_wait_seconds_bucket", {"model": "mnist", "le": "0.001"}
        ) == 7
        assert reg.get_sample_value("mnist_inflight_requests", {}) == 2
        assert reg.get_sample_value("mnist_batch_queue_rows", {"model": "mnist"}) == 7
        assert reg.get_sample_value(
            "mnist_model_version_loaded", {"model": "mnist", "version": "2"}
        ) == 1
        assert reg.get_sample_value("mnist_model_current_version", {"model": "mnist"}) == 2
        assert reg.get_sample_value("process_cpu_seconds_total", {}) is not None

        # The 4-request worker exits: its live gauges go, its counts stay.
        dead = workers[1]
        assert dead.stdin is not None
        dead.stdin.write("go\n")
        dead.stdin.flush()
        assert dead.wait(timeout=30) == 0
        metrics_mod.worker_exited(dead.pid)
        reg = metrics_mod.exposition_registry(None)
        assert reg.get_sample_value("mnist_inflight_requests", {}) == 1
        assert reg.get_sample_value("mnist_batch_queue_rows", {"model": "mnist"}) == 3
        assert reg.get_sample_value("mnist_requests_total", ok) == 7
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait(timeout=30)
            if w.stdout is not None:
                w.stdout.close()
            if w.stdin is not None:
                w.stdin.close()


def test_batches_are_recorded_at_collection_or_when_too_many_wait(
    metrics: Metrics, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch_done only queues the batch (off the event loop's critical path); any collection
    (a scrape, get_sample_value) records it first, and a bound keeps unscraped memory small."""
    metrics.batch_done("mnist", 1, [0.001], 0.001, probs([(2, 0.9)]))
    assert len(metrics._pending) == 1
    assert value(registry, "mnist_predictions_total", model="mnist", version="1",
                 **{"class": "2"}) == 1
    assert len(metrics._pending) == 0

    monkeypatch.setattr(recording_mod, "MAX_PENDING_ROWS", 3)
    metrics.batch_done("mnist", 1, [0.001], 0.001, probs([(2, 0.9)] * 2))
    assert len(metrics._pending) == 1
    metrics.batch_done("mnist", 1, [0.001], 0.001, probs([(2, 0.9)] * 2))
    assert len(metrics._pending) == 0  # 4 rows waiting > 3: recorded without a scrape

    # Requests, in-flight and queue depth the same way: queued, then recorded at collection.
    loaded(metrics, 1)
    metrics.request_done("Classify", "mnist", "1", "OK", 2, 0.001)
    metrics.inflight.inc()
    metrics.set_queue_rows("mnist", 7)
    assert len(metrics._pending_requests) == 1
    assert value(registry, "mnist_images_total", method="Classify", model="mnist", version="1",
                 code="OK") == 2
    assert value(registry, "mnist_inflight_requests") == 1
    assert value(registry, "mnist_batch_queue_rows", model="mnist") == 7
    assert len(metrics._pending_requests) == 0
    assert value(registry, "mnist_predictions_total", model="mnist", version="1",
                 **{"class": "2"}) == 5
