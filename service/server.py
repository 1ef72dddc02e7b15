"""Wiring in one place: Settings -> Metrics -> ModelRegistry -> Batcher -> servicers + health.

`start_server` is what tests and other modules use (returns once listening); `serve` is the
process entry point (runs until SIGTERM/SIGINT, drains, exits 0). With `--workers N > 1`,
`serve` becomes a small supervisor of N single-worker processes that share the port through
SO_REUSEPORT; the kernel spreads connections between them.

Server model (docs/serving.md, "The core front end"): by default a `transport.CoreServer`,
which answers Classify on one thread polling gRPC core's completion queue (batched when the
queue of completions runs dry) and runs every other RPC as a grpc.aio-style handler on the
event loop; `--frontend aio` serves everything through grpc.aio instead, at ~0.6 of the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service import admin, oip, transport
from service import servicer as classifier
from service.batcher import Batcher
from service.config import Settings
from service.metrics import (
    Metrics,
    multiprocess_dir,
    prepare_multiprocess,
    start_exporter,
    worker_exited,
)
from service.registry import ModelRegistry
from service.transport import CoreServer

log = logging.getLogger("service.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Young-generation gc threshold while serving (CPython's default is 700); see _tune_gc.
GC_THRESHOLD = 10_000


@dataclass(eq=False)
class RunningServer:
    """A started server and its parts; `await stop()` undoes `start_server`."""

    grpc_server: grpc.aio.Server
    port: int
    registry: ModelRegistry
    batcher: Batcher
    metrics: Metrics
    health: health.aio.HealthServicer
    metrics_port: int | None = None
    admin: admin.AdminEndpoint | None = None
    _stopping: bool = False
    _closers: list[Any] = field(default_factory=list)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace_s`."""
        if self._stopping:
            return
        self._stopping = True
        log.info("event=stopping grace_s=%s", grace_s)
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(grace_s)
        if self.admin is not None:
            await self.admin.stop(grace_s)
        await self.batcher.close()
        await self.registry.close()
        for close in self._closers:
            close()
        log.info("event=stopped")


def _server_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Port sharing only when asked: otherwise a second server on the port is an error.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        # Small HTTP/2 stream windows (no bandwidth-delay probing, 8 KiB ahead): a caller may
        # send only that much before the server reads its message, so a call refused at the
        # door costs ~8 KiB of reading, not the whole message, and N waiting callers hold
        # ~N x 8 KiB in gRPC core, not N messages (docs/serving.md, "Overload").
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 8192),
    ]


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


async def start_server(settings: Settings, *, metrics: Metrics | None = None) -> RunningServer:
    """Build everything from `settings`, load what the repository holds, listen; return."""
    closers: list[Any] = []
    metrics_port: int | None = None
    if metrics is None:
        metrics = Metrics(CollectorRegistry()) if settings.metrics_enabled else Metrics.disabled()
    # None under --workers: the supervisor exports every worker's values (service/metrics.py).
    if metrics.enabled:
        exporter = start_exporter(settings, metrics)
        if exporter is not None:
            metrics_port = exporter.port
            closers.append(exporter.stop)

    health_servicer = health.aio.HealthServicer()
    state = {"stopping": False}
    tasks: set[asyncio.Task[None]] = set()

    async def update_health() -> None:
        if state["stopping"]:
            return
        status = SERVING if registry.ready else NOT_SERVING
        for name in ("", classifier.SERVICE_NAME):
            await health_servicer.set(name, status)

    def on_change() -> None:
        task = asyncio.get_running_loop().create_task(update_health())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    registry = ModelRegistry(
        settings.model_dir,
        metrics,
        rescan_interval_s=settings.rescan_interval_s,
        default_model=settings.default_model,
        on_change=on_change,
        version_policy=settings.version_policy,
        version_labels=settings.version_labels,
    )
    batcher = Batcher(
        registry,
        metrics,
        max_batch_rows=settings.max_batch_rows,
        max_batch_wait_s=settings.max_batch_wait_s,
        max_queue_rows=settings.max_queue_rows,
        max_queue_bytes=settings.max_queue_bytes,
        enabled=settings.batching,
        inline_max_rows=settings.inline_forward_max_rows,
    )
    server: grpc.aio.Server
    frontend = settings.frontend
    if frontend == "core" and (reason := transport.unavailable_reason()) is not None:
        log.warning("event=frontend_fallback frontend=aio reason=%r", reason)
        frontend = "aio"
    if frontend == "core":
        core = CoreServer(_server_options(settings))
        core.add_idle_hook(batcher.run_queued)
        server = core
    else:
        server = grpc.aio.server(options=_server_options(settings))
    classifier.add_to_server(
        classifier.ClassifierServicer(
            registry, batcher, metrics, max_images=settings.max_images_per_request
        ),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = [classifier.SERVICE_NAME, health.SERVICE_NAME]
    # --- other servicers register here (each helper adds its own line):
    admin_endpoint = admin.add_to_server(
        server, registry, settings, metrics=metrics, credentials=_credentials(settings)
    )
    if admin_endpoint is not None and admin_endpoint.server is None:
        services.append(admin.SERVICE_NAME)
    oip.add_to_server(
        server, registry=registry, batcher=batcher, metrics=metrics, settings=settings
    )
    services.append(oip.SERVICE_NAME)
    # --- end of servicer registrations
    services.append(reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)

    await update_health()  # NOT_SERVING until a model is loaded
    await registry.start()
    await update_health()
    await batcher.start()

    address = f"{settings.host}:{settings.port}"
    creds = _credentials(settings)
    port = (server.add_secure_port(address, creds) if creds is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    if admin_endpoint is not None:
        await admin_endpoint.start()
    log.info("event=listening address=%s port=%d tls=%s frontend=%s batching=%s models=%s "
             "pid=%d", settings.host, port, creds is not None, frontend, settings.batching,
             [s.name for s in registry.status()], os.getpid())
    running = RunningServer(server, port, registry, batcher, metrics, health_servicer,
                            metrics_port, admin_endpoint, _closers=closers)

    original_stop = running.stop

    async def stop(grace_s: float | None = 5.0) -> None:
        state["stopping"] = True
        await original_stop(grace_s)

    running.stop = stop  # type: ignore[method-assign]
    return running


def _tune_gc() -> None:
    """Fewer young-generation collections on the request path.

    Every RPC allocates several container objects (grpc.aio's tasks and contexts, our
    futures), so the default threshold (700) ran a young collection every few hundred
    requests (`gc_collect_main` ~2% of the loop's samples in a native py-spy profile).
    Objects alive after startup (modules, the model) are frozen out of collection, and the
    young threshold is raised so a collection runs ~14x less often. Reference cycles are
    still collected, just later.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, gen1, gen2)


async def _serve_async(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Catch SIGTERM before starting: one that arrives while the server starts (a supervisor
    # stopping a worker it has just restarted, an orchestrator scaling down) still means
    # "drain and exit 0", not death by the default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(settings)
    _tune_gc()
    running.registry.install_sighup_handler(loop)  # `kill -HUP` rescans the repository
    await stop.wait()
    if settings.drain_delay_s > 0:
        # Unready first: health checkers (Envoy, a readiness probe) move traffic away while
        # requests are still answered; then drain. A second signal cuts the wait short.
        log.info("event=signal action=unready delay_s=%s", settings.drain_delay_s)
        await running.health.enter_graceful_shutdown()
        stop.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.drain_delay_s)
    log.info("event=signal action=drain grace_s=%s", settings.grace_period_s)
    await running.stop(settings.grace_period_s)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s",
    )


def _run_worker(settings: Settings) -> None:
    # A SIGHUP the supervisor forwards before this worker's rescan handler exists must not
    # kill it (the default action); it loads what is on disk at startup anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _configure_logging(settings.log_level)
    asyncio.run(_serve_async(settings))


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain within settings.grace_period_s and return."""
    _configure_logging(settings.log_level)
    if settings.workers <= 1:
        asyncio.run(_serve_async(settings))
        return
    sys.exit(_supervise(settings))


def _supervise(settings: Settings) -> int:
    """N worker processes on one port; restart crashed ones; forward SIGTERM and SIGHUP;
    exit 0 if clean."""
    if settings.port == 0:
        log.error("event=config_error message='--workers > 1 needs a fixed --port'")
        return 2
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    # Metrics: spawned workers import prometheus_client after prepare_multiprocess, so they
    # record into shared files; this process serves the sum on --metrics-port.
    exporter = None
    own_dir: Path | None = None
    if settings.metrics_enabled:
        directory = multiprocess_dir()
        if directory is None:
            directory = own_dir = Path(tempfile.mkdtemp(prefix="mnist-metrics-"))
        prepare_multiprocess(directory)
        exporter = start_exporter(settings, None)

    def spawn(i: int) -> multiprocessing.process.BaseProcess:
        p = ctx.Process(target=_run_worker, args=(settings,), name=f"worker-{i}")
        p.start()
        log.info("event=worker_started worker=%d pid=%s", i, p.pid)
        return p

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    def on_hangup(signum: int, _frame: Any) -> None:  # `kill -HUP`: every worker rescans
        log.info("event=signal signal=SIGHUP action=forward workers=%d", len(procs))
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGHUP)

    procs = [spawn(i) for i in range(settings.workers)]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    while True:
        for i, p in enumerate(procs):
            if not p.is_alive() and not stopping:
                log.error("event=worker_died worker=%d pid=%s exitcode=%s action=restart",
                          i, p.pid, p.exitcode)
                if p.pid is not None:
                    worker_exited(p.pid)  # no stale in-flight/queue/version gauges
                time.sleep(1.0)
                procs[i] = spawn(i)
        if stopping and not any(p.is_alive() for p in procs):
            break
        time.sleep(0.2)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.pid is not None:
            worker_exited(p.pid)
    if exporter is not None:
        exporter.stop()
    if own_dir is not None:
        shutil.rmtree(own_dir, ignore_errors=True)
    log.info("event=workers_stopped exitcodes=%s", codes)
    # -SIGTERM: a worker stopped by our SIGTERM before its interpreter had installed the drain
    # handler (still importing); it was not serving yet, so that is a clean stop too.
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
