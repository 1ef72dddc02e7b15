"""Issue 13 §1: the metrics port serves /metrics and answers 404 to every other path, so an
HTTP health check aimed at it cannot mistake a metrics page for "healthy". Real server."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.metrics_util import samples
from support.servers import ServerThread

from service.metrics import exporter as exporter_module


def request(port: int, method: str, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.fixture
def metrics_port(model_repo: Path, start: Callable[..., ServerThread]) -> int:
    server = start(model_repo, metrics_enabled=True, metrics_host="127.0.0.1", metrics_port=0)
    assert server.running.metrics_port is not None
    return server.running.metrics_port


def test_metrics_path_serves_the_exposition(metrics_port: int) -> None:
    status, body = request(metrics_port, "GET", "/metrics")
    assert status == 200
    assert ("mnist_model_current_version", (("model", "mnist"),)) in samples(body)
    # Prometheus' own `params` (a name filter) still work on the one path.
    status, body = request(metrics_port, "GET", "/metrics?name[]=mnist_model_current_version")
    assert status == 200
    assert "mnist_model_current_version" in body
    assert "mnist_requests_total" not in body


@pytest.mark.parametrize("path", [
    "/", "/healthz", "/health", "/ready", "/v2/health/ready", "/v2/health/live", "/metrics/",
    "/metricsx", "/metrics/anything", "/favicon.ico", "/METRICS", "/metrics%2F",
])
def test_every_other_path_is_not_found(metrics_port: int, path: str) -> None:
    status, body = request(metrics_port, "GET", path)
    assert status == 404, f"{path} answered {status}"
    assert "mnist_" not in body


def test_other_methods_on_metrics_are_refused(metrics_port: int) -> None:
    assert request(metrics_port, "POST", "/metrics")[0] == 405
    assert request(metrics_port, "DELETE", "/metrics")[0] == 405
    assert request(metrics_port, "HEAD", "/metrics")[0] == 405
    assert request(metrics_port, "GET", "/metrics")[0] == 200  # and it keeps serving


def test_silent_connections_hold_a_bounded_number_of_threads_and_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread serves each connection: callers that connect and send nothing kept one each,
    for ever. Now at most MAX_CONNECTIONS are served (one more is answered 503 and closed) and
    a silent one is closed after READ_TIMEOUT_S; then scrapes are served again."""
    monkeypatch.setattr(exporter_module._QuietHandler, "timeout", 1.0)
    exporter = exporter_module.serve_metrics("127.0.0.1", 0, CollectorRegistry())
    before = threading.active_count()
    silent: list[socket.socket] = []
    try:
        for _ in range(exporter_module.MAX_CONNECTIONS + 8):  # within the listen backlog
            silent.append(socket.create_connection(("127.0.0.1", exporter.port), timeout=5))
        time.sleep(0.3)
        assert threading.active_count() - before <= exporter_module.MAX_CONNECTIONS
        # The ones past the bound were told so and closed at once.
        last = silent[-1].recv(4096)
        assert last.startswith(b"HTTP/1.1 503 "), last
        assert silent[-1].recv(4096) == b""
        # The silent ones within the bound are closed once they have said nothing for 1 s.
        assert silent[0].recv(4096) == b""
        deadline = time.monotonic() + 10
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
        assert request(exporter.port, "GET", "/metrics")[0] == 200
    finally:
        for s in silent:
            s.close()
        exporter.stop()
