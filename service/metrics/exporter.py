"""The /metrics endpoint: what it serves (`exposition_registry`) and the HTTP server.

The metrics port answers `GET /metrics` and nothing else: any other path is a 404,
so an HTTP health check pointed at the wrong port fails instead of reading a metrics page as
"healthy" (issue 13). `/metrics/` is a 404 too, as in Prometheus' own exporters
(promhttp, node_exporter): the scrape path is exactly Prometheus' default `metrics_path`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app, multiprocess
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service.metrics.collector import CountsCollector, families
from service.metrics.multiprocess import multiprocess_dir, read_counts

if TYPE_CHECKING:
    from service.config import Settings
    from service.metrics.recording import Metrics

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# Set by the process that exports in multiprocess mode; its workers inherit it and stay quiet.
EXPORTER_PID_ENV = "MNIST_METRICS_EXPORTER_PID"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def add_process_collectors(registry: CollectorRegistry) -> None:
    """process_* and python_* series, once per registry (the default one already has them)."""
    if registry is REGISTRY:
        return
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        with contextlib.suppress(ValueError):  # already registered on this registry
            collector(registry=registry)


def exposition_registry(metrics: Metrics | None) -> CollectorRegistry:
    """What /metrics serves: this process's registry, or every worker's values summed."""
    directory = multiprocess_dir()
    if directory is None:
        if metrics is None:
            raise ValueError("single-process exporter needs the Metrics it serves")
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    # (no _created: summed over processes, a creation time would be any one worker's)
    registry.register(CountsCollector(lambda: families(read_counts(directory), created=False)))
    add_process_collectors(registry)  # the exporting process's own process_*/python_*
    return registry


def only_metrics_path(app: WSGIApp) -> WSGIApp:
    """`app` on GET /metrics; 404 on every other path, 405 on other methods (HEAD included,
    as prometheus_client's own WSGI app answers it)."""

    def handle(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Not Found: metrics are served at /metrics\n"]
        if environ.get("REQUEST_METHOD", "GET") != "GET":
            start_response("405 Method Not Allowed", [
                ("Content-Type", "text/plain; charset=utf-8"), ("Allow", "GET")])
            return [b"Method Not Allowed\n"]
        return app(environ, start_response)

    return handle


# A thread serves each connection. Without these bounds a caller that opens connections and
# sends nothing kept a thread each, for ever (2,000 such connections: 120 more threads and
# counting); Prometheus needs one connection per scraper.
MAX_CONNECTIONS = 32  # served at once; one more is answered 503 and closed
READ_TIMEOUT_S = 5.0  # a connection silent this long is closed (a scrape asks at once)
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 33\r\nConnection: close\r\n\r\ntoo many connections; retry later")


class _QuietHandler(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds: no access log line each."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64  # the listen backlog (socketserver's 5 refused bursts of scrapes)

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass(frozen=True, slots=True)
class Exporter:
    """A running /metrics HTTP endpoint; `stop()` closes it and waits for its thread."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> Exporter:
    """Serve `registry` at http://host:port/metrics on a thread (port 0 picks a free one)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_Server", (_ThreadingServer,), {"address_family": family})
    server: WSGIServer = make_server(host, port, only_metrics_path(make_wsgi_app(registry)),
                         server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return Exporter(host, int(server.server_port), server, thread)


def start_exporter(settings: Settings, metrics: Metrics | None) -> Exporter | None:
    """Serve /metrics on settings.metrics_host:metrics_port (0 picks a free port).

    Returns None when metrics are disabled, and in a worker whose supervisor already exports
    for every worker (multiprocess mode). There `metrics` may be None: the supervisor records
    nothing itself and serves the workers' summed values.
    """
    if not settings.metrics_enabled:
        return None
    multi = multiprocess_dir() is not None
    owner = os.environ.get(EXPORTER_PID_ENV)
    if multi and owner and owner != str(os.getpid()):
        return None
    exporter = serve_metrics(settings.metrics_host, settings.metrics_port,
                             exposition_registry(metrics))
    if multi:
        os.environ[EXPORTER_PID_ENV] = str(os.getpid())  # before the workers start
    log.info("metrics on http://%s:%d%s", exporter.host, exporter.port, METRICS_PATH)
    return exporter
