"""The Grafana dashboard and its provisioning: every query reads metrics the service exports."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerThread, make_model, uint8_request, write_version
from metrics_util import (
    ROOT,
    dashboard_exprs,
    poll,
    promql_metric_names,
    sample_names,
    scrape,
)

from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mnist-serving.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (code) (rate(mnist_requests_total{model=~"$model"}[$__rate_interval]))',
         {"mnist_requests_total"}),
        ("histogram_quantile(0.99, sum by (le, method) (rate(x_seconds_bucket[5m])))",
         {"x_seconds_bucket"}),
        ('sum by (version, class) (rate(a_total{le="0.5"}[1m])) / ignoring (class) '
         "group_left sum by (version) (rate(b_total[1m]))", {"a_total", "b_total"}),
        ("max by (model, version) (loaded{job=~\"$job\"}) == 1 unless on (x) up offset 5m",
         {"loaded", "up"}),
        ("changes(max by (model) (current)[1m:15s]) > 0", {"current"}),
        ("1 - sum(rate(process_cpu_seconds_total[1m])) * 2.5e-3", {"process_cpu_seconds_total"}),
    ],
)
def test_promql_metric_names_finds_exactly_the_selected_metrics(
    expr: str, names: set[str]
) -> None:
    assert promql_metric_names(expr) == names


def test_dashboard_is_provisionable_against_the_provisioned_datasource(
    dashboard: dict[str, Any],
) -> None:
    datasource_yaml = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    uid = re.search(r"^\s*uid:\s*(\S+)", datasource_yaml, re.MULTILINE)
    assert uid is not None, "the provisioned datasource needs a fixed uid"
    provider = (GRAFANA / "provisioning" / "dashboards" / "mnist.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards" in compose
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in compose

    assert dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid.group(1)}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid.group(1)
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_dashboard_covers_what_operators_need(dashboard: dict[str, Any]) -> None:
    """Requests/s by code, p50/p99, batch size, queue wait, versions, failures, drift."""
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dashboard)))
    needed = {
        "mnist_requests_total", "mnist_request_duration_seconds_bucket", "mnist_batch_rows_bucket",
        "mnist_batch_queue_wait_seconds_bucket", "mnist_model_current_version",
        "mnist_model_version_loaded", "mnist_model_rejected_versions_total",
        "mnist_model_loads_total", "mnist_predictions_total",
        "mnist_prediction_confidence_ratio_bucket",
        # promotion (issue 15): shadow agreement, candidate beside current, canary, gate
        "mnist_shadow_compared_total", "mnist_shadow_dropped_total",
        "mnist_shadow_predictions_total", "mnist_shadow_confidence_bucket",
        "mnist_canary_percent", "mnist_canary_rollbacks_total",
        "mnist_gate_rejected_versions_total",
    }
    assert needed <= used, f"not on the dashboard: {sorted(needed - used)}"
    exprs = " ".join(dashboard_exprs(dashboard))
    assert "sum by (code)" in exprs
    assert "histogram_quantile(0.5," in exprs
    assert "histogram_quantile(0.99," in exprs
    assert 'by (role, class)' in exprs  # the candidate's distribution beside the current's


def traffic_with_swap_and_rejection(server: ServerThread, repo: Path) -> None:
    """Requests (good and bad), a hot swap to v2 and a rejected v3, so every series exists."""
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        stub.Classify(uint8_request(rng.integers(0, 256, (3, 784))), timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Classify(uint8_request(np.zeros(100)), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        write_version(repo, "mnist", 2, make_model(seed=2))
        poll(lambda: True if stub.Classify(uint8_request(np.zeros((1, 784))), timeout=10)
             .version == 2 else None, "the hot swap to version 2")
        broken = repo / "mnist" / ".tmp-3"
        broken.mkdir()
        (broken / "model.npz").write_bytes(b"not a zip")
        (broken / "model.npz.sha256").write_text("0" * 64 + "\n")
        broken.rename(repo / "mnist" / "3")
        poll(lambda: True if server.sample(
            "mnist_model_loads_total", {"model": "mnist", "result": "failure"}) >= 1 else None,
            "version 3 to be rejected")
        stub.Classify(uint8_request(rng.integers(0, 256, (5, 784))), timeout=10)


def test_every_dashboard_query_names_a_metric_the_service_exports(
    dashboard: dict[str, Any], model_repo: Path, start: Callable[..., ServerThread]
) -> None:
    server = start(model_repo, metrics_enabled=True, metrics_host="127.0.0.1", metrics_port=0)
    assert server.running.metrics_port is not None
    traffic_with_swap_and_rejection(server, model_repo)
    exported = sample_names(scrape(server.running.metrics_port))
    assert "mnist_requests_total" in exported  # the scrape really holds the service's metrics
    for expr in dashboard_exprs(dashboard):
        names = promql_metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        missing = names - exported
        assert not missing, f"{expr!r} reads {sorted(missing)}, which the service does not export"
