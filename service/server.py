"""Wiring in one place: Settings -> Metrics -> ModelRegistry -> Batcher -> servicers + health.

`start_server` is what tests and other modules use (returns once listening); `serve` is the
process entry point (runs until SIGTERM/SIGINT, drains, exits 0; exits 70 with `event=fatal`
if the gRPC server ends without having been asked to, see service/fatal.py). With
`--workers N > 1`, `serve` becomes a small supervisor (service/supervisor.py) of N
single-worker processes that share the port through SO_REUSEPORT.

Server model (docs/serving.md, "The core front end"): by default a `transport.CoreServer`,
which answers Classify on one thread polling gRPC core's completion queue (batched when the
queue of completions runs dry) and runs every other RPC as a grpc.aio-style handler on the
event loop, once service/selftest.py has proven it on the installed grpcio; `--frontend aio`
(or a failed self-test) serves everything through grpc.aio instead, at ~0.6 of the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service import admin, oip, selftest
from service import servicer as classifier
from service.batching import Batcher
from service.config import Settings
from service.fatal import die
from service.malformed import Registrar, enable_reflection
from service.metrics import Metrics, start_exporter
from service.registry import CurrentChanged, ModelRegistry, RegistryEvent
from service.supervisor import die_with_supervisor, supervise
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
    frontend: str = "aio"  # what serves: "core" or "aio" (after the self-test's verdict)
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

    async def died(self) -> str:
        """Return (why) when a gRPC server of ours ends without `stop()` having asked it to;
        never returns otherwise. `serve` exits the process on it (service/fatal.py)."""
        servers = [("grpc", self.grpc_server)]
        if self.admin is not None and self.admin.server is not None:
            servers.append(("admin", self.admin.server))
        # Shielded: cancelling grpc.aio's wait_for_termination cancels the future its own
        # shutdown awaits later (stop() then raises CancelledError).
        waits = {asyncio.shield(s.wait_for_termination()): name for name, s in servers}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        if self._stopping:
            await asyncio.Future()  # asked for: not a death; wait to be cancelled
        names = sorted(waits[task] for task in done)
        what = "polling thread ended" if self.frontend == "core" else "server stopped"
        return f"{'+'.join(names)}_server_terminated frontend={self.frontend} ({what})"


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


async def _choose_frontend(settings: Settings, registry: ModelRegistry) -> str:
    """'core' only when asked for and proven on this grpcio by service/selftest.py."""
    if settings.frontend != "core":
        return settings.frontend
    problem = await selftest.core_frontend_problem(
        settings, registry, options=_server_options(settings)
    )
    if problem is not None:
        log.warning("event=frontend_fallback frontend=aio grpcio=%s reason=%r",
                    grpc.__version__, problem)
        return "aio"
    log.info("event=frontend_selftest result=ok frontend=core grpcio=%s", grpc.__version__)
    return "core"


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

    def on_registry_event(event: RegistryEvent) -> None:
        if not isinstance(event, CurrentChanged):  # readiness moves only with a current version
            return
        task = asyncio.get_running_loop().create_task(update_health())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    registry = ModelRegistry(
        settings.model_dir,
        metrics,
        rescan_interval_s=settings.rescan_interval_s,
        default_model=settings.default_model,
        version_policy=settings.version_policy,
        version_labels=settings.version_labels,
    )
    registry.subscribe(on_registry_event)  # health follows the registry's events
    batcher = Batcher(
        registry,
        metrics,
        max_batch_rows=settings.max_batch_rows,
        max_batch_wait_s=settings.max_batch_wait_s,
        max_queue_rows=settings.max_queue_rows,
        max_queue_bytes=settings.max_queue_bytes,
        max_door_wait_s=settings.max_door_wait_s,
        enabled=settings.batching,
        inline_max_rows=settings.inline_forward_max_rows,
    )
    await update_health()  # NOT_SERVING until a model is loaded
    await registry.start()
    await update_health()
    frontend = await _choose_frontend(settings, registry)
    metrics.set_frontend(frontend)
    server: grpc.aio.Server
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
    # Health and reflection parse requests with grpcio's deserializers; through the
    # Registrar a malformed one is INVALID_ARGUMENT on either front end (service/malformed.py).
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, Registrar(server))
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
    enable_reflection(services, server)
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
                            metrics_port, admin_endpoint, frontend, _closers=closers)

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
    if settings.fault_injection == "frontend-death":
        loop.add_signal_handler(signal.SIGUSR2, _kill_frontend, running)
        log.warning("event=fault_injection_armed fault=frontend-death signal=SIGUSR2 "
                    "(tests only)")
    # A server that can no longer serve ends the process (non-zero, so it is restarted)
    # instead of answering UNAVAILABLE for ever while its health and metrics ports live on.
    death = asyncio.ensure_future(running.died())
    asked = asyncio.ensure_future(stop.wait())
    await asyncio.wait({death, asked}, return_when=asyncio.FIRST_COMPLETED)
    if death.done():
        die(death.result())
    death.cancel()
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


class InjectedFault(BaseException):
    """--fault-injection frontend-death: raised in gRPC core's polling thread. A
    BaseException, as an interpreter-level failure would be: no `except Exception` stops it."""


def _kill_frontend(running: RunningServer) -> None:
    """TESTS ONLY (--fault-injection frontend-death, on SIGUSR2): end the gRPC front end
    behind the server's back, as a crash would -- not through RunningServer.stop."""
    log.warning("event=fault_injected fault=frontend-death frontend=%s", running.frontend)
    if running.frontend == "core":
        import ctypes

        for thread in threading.enumerate():
            if thread.name == "grpc-core" and thread.ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread.ident), ctypes.py_object(InjectedFault)
                )
        return
    asyncio.get_running_loop().create_task(running.grpc_server.stop(0))


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
    die_with_supervisor()
    asyncio.run(_serve_async(settings))


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain within settings.grace_period_s and return."""
    _configure_logging(settings.log_level)
    if settings.workers <= 1:
        asyncio.run(_serve_async(settings))
        return
    sys.exit(supervise(settings, _run_worker))
