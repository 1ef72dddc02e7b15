"""The service's metrics checked by the real Prometheus tools.

`promtool check metrics` lints a served exposition; a real Prometheus server scrapes a real
service every second while the test drives traffic and a hot swap, and the test reads the
result back through Prometheus's HTTP API. Everything started here is stopped by PID.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from support.dashboard import DASHBOARD, traffic_with_swap_and_rejection
from support.metrics_util import (
    ROOT,
    dashboard_exprs,
    grafana_to_promql,
    poll,
    running_prometheus,
    scrape,
    tool,
)
from support.servers import ServerThread, make_model, uint8_request, write_version

from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc


def metrics_server(start: Callable[..., ServerThread], repo: Path) -> ServerThread:
    server = start(repo, metrics_enabled=True, metrics_host="127.0.0.1", metrics_port=0,
                   rescan_interval_s=0.2)
    assert server.running.metrics_port is not None
    return server


def test_promtool_check_metrics_passes_on_a_served_exposition(
    model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    server = metrics_server(start, model_repo)
    traffic_with_swap_and_rejection(server, model_repo)
    assert server.running.metrics_port is not None
    exposition = scrape(server.running.metrics_port)
    assert "mnist_request_duration_seconds_bucket" in exposition
    checked = subprocess.run(
        [str(tool("promtool")), "check", "metrics"], input=exposition, capture_output=True,
        text=True, timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "", checked.stdout  # no lint findings at all
    assert checked.stderr.strip() == "", checked.stderr


def test_promtool_accepts_the_compose_prometheus_config_and_alert_rules() -> None:
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    checked = subprocess.run(
        [str(tool("promtool")), "check", "config", str(config)], capture_output=True, text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    assert "rules found" in checked.stdout


def test_promtool_rejects_a_broken_exposition() -> None:
    """The check above can fail: promtool flags a counter without `_total` and a `_ms` unit."""
    bad = (
        "# HELP mnist_requests RPCs.\n# TYPE mnist_requests counter\nmnist_requests 3\n"
        "# HELP mnist_latency_ms Latency.\n# TYPE mnist_latency_ms gauge\nmnist_latency_ms 3\n"
    )
    checked = subprocess.run(
        [str(tool("promtool")), "check", "metrics"], input=bad, capture_output=True, text=True,
        timeout=60,
    )
    assert checked.returncode != 0
    assert "_total" in checked.stdout + checked.stderr


@pytest.mark.slow
def test_real_prometheus_sees_request_counts_p99_and_the_hot_swap(
    model_repo: Path, start: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = metrics_server(start, model_repo)
    target = f"127.0.0.1:{server.running.metrics_port}"
    rng = np.random.default_rng(1)
    sizes = [1 + (i % 5) for i in range(40)]  # 40 requests, 120 images
    with running_prometheus(tmp_path / "prom", [target]) as prom, \
            grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        def settled(promql: str, expected: float) -> Callable[[], float | None]:
            def check() -> float | None:
                got = prom.scalar(promql)
                return got if got == expected else None
            return check

        # One request first, seen by Prometheus, so the series exist before the load: rate()
        # needs two samples of a series to see an increase.
        assert stub.Classify(uint8_request(np.zeros((1, 784))), timeout=10).version == 1
        ok = 'method="Classify", code="OK"'
        poll(settled(f"sum(mnist_requests_total{{{ok}}})", 1), "the first scrape with a request")
        futures = [stub.Classify.future(uint8_request(rng.integers(0, 256, (n, 784))), timeout=20)
                   for n in sizes]
        assert all(f.result().version == 1 for f in futures)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as bad:
                stub.Classify(uint8_request(np.zeros(10)), timeout=10)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        poll(settled(f"sum(mnist_requests_total{{{ok}}})", 41), "41 OK requests in Prometheus")
        images = sum(sizes) + 1
        assert prom.scalar(f"sum(mnist_images_total{{{ok}}})") == images
        assert prom.scalar(f'sum(mnist_requests_total{{{ok}, version="1"}})') == 41
        poll(settled('sum(mnist_requests_total{code="INVALID_ARGUMENT"})', 3),
             "3 INVALID_ARGUMENT requests in Prometheus")
        assert prom.scalar('sum(mnist_predictions_total{version="1"})') == images
        assert prom.scalar('sum(mnist_prediction_confidence_ratio_count{version="1"})') == images
        assert prom.scalar("sum(mnist_batch_rows_sum)") == images

        p99 = prom.scalar(
            "histogram_quantile(0.99, sum by (le) "
            '(mnist_request_duration_seconds_bucket{method="Classify"}))'
        )
        assert p99 is not None
        assert math.isfinite(p99), p99
        assert 0 < p99 < 5, p99

        def p99_over_rate() -> float | None:
            got = prom.scalar(
                "histogram_quantile(0.99, sum by (le) "
                '(rate(mnist_request_duration_seconds_bucket{method="Classify"}[1m])))'
            )
            return got if got is not None and math.isfinite(got) else None

        p99_rate = poll(p99_over_rate, "a finite p99 over rate()")
        assert 0 < p99_rate < 5, p99_rate

        assert prom.scalar('mnist_model_current_version{model="mnist"}') == 1
        write_version(model_repo, "mnist", 2, make_model(seed=2))
        poll(settled('mnist_model_current_version{model="mnist"}', 2),
             "Prometheus to see version 2 serving", deadline_s=30)
        loaded = {r["metric"]["version"] for r in prom.query("mnist_model_version_loaded == 1")}
        assert "2" in loaded
        reply = stub.Classify(uint8_request(rng.integers(0, 256, (2, 784))), timeout=10)
        assert reply.version == 2
        poll(settled(f'sum(mnist_requests_total{{{ok}, version="2"}})', 1),
             "the request answered by version 2 in Prometheus")
        assert prom.scalar('sum(mnist_model_loads_total{result="success"})') == 2
        # The standard process metrics arrive with the same scrape.
        assert (prom.scalar("process_resident_memory_bytes") or 0) > 0

        # Every dashboard query is valid PromQL for the real engine.
        for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
            prom.query(grafana_to_promql(expr))


def test_alert_rules_fire_on_the_series_they_watch() -> None:
    """`promtool test rules`: synthetic series in, the expected alerts (and no others) out."""
    checked = subprocess.run(
        [str(tool("promtool")), "test", "rules", "alerts_test.yml"],
        cwd=ROOT / "deploy" / "prometheus", capture_output=True, text=True, timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
