"""The server's lifecycle as an object: build its parts, start them, stop them, in that order.

`Server(settings)` builds (no I/O); `await start()` loads the repository and listens;
`await stop(grace_s)` undoes it in reverse. `start_server` is what tests and other modules
use (returns once listening); `serve` is the process entry point (runs until SIGTERM/SIGINT,
drains, exits 0; exits 70 with `event=fatal` if the gRPC server ends without having been asked
to, see service/fatal.py). With `--workers N > 1`, `serve` becomes a small supervisor
(service/supervisor.py) of N single-worker processes that share the port through SO_REUSEPORT.

Front ends (docs/architecture.md): the servicers and the data plane import none; this module
picks one (service/frontends/grpc_frontend.py) and plugs the data plane's fast lanes into it.
By default the completion-queue front end (service/frontends/core.py), which answers Classify
and ModelInfer on one thread polling gRPC core's completion queue and every other RPC on the
event loop, once service/frontends/selftest.py has proven it on the installed grpcio;
`--frontend aio` (or a failed self-test) serves everything through grpc.aio, at ~0.6 the rate.
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
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from service.api import admin, oip
from service.api import servicer as classifier
from service.api.malformed import Registrar, enable_reflection
from service.batching import Batcher
from service.config import Settings
from service.dataplane.images import ImageDecoder, ImageSettings
from service.fatal import die
from service.frontends import grpc_frontend, selftest
from service.frontends.http import server as http_frontend
from service.metrics import Metrics, start_exporter
from service.promotion.monitor import PromotionMonitor, promotion_monitor
from service.registry import CurrentChanged, ModelRegistry, RegistryEvent
from service.supervisor import die_with_supervisor, supervise

log = logging.getLogger("service.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Young-generation gc threshold while serving (CPython's default is 700); see _tune_gc.
GC_THRESHOLD = 10_000


class _Health:
    """The standard health service, following the registry: NOT_SERVING until a version is
    current, SERVING after; frozen once the server starts stopping."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.servicer = health.aio.HealthServicer()
        self._registry = registry
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def update(self) -> None:
        if self._stopping:
            return
        status = SERVING if self._registry.ready else NOT_SERVING
        for name in ("", classifier.SERVICE_NAME):
            await self.servicer.set(name, status)

    def on_registry_event(self, event: RegistryEvent) -> None:
        if not isinstance(event, CurrentChanged):  # readiness moves only with a current version
            return
        task = asyncio.get_running_loop().create_task(self.update())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def enter_graceful_shutdown(self) -> None:
        self._stopping = True
        await self.servicer.enter_graceful_shutdown()


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """The options both front ends give gRPC core (bench/floor_bench.py uses them too)."""
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
        # Calls that arrived and that neither front end has taken yet wait in gRPC core's
        # pending list; past its defaults (1,000, hard 3,000) gRPC core ends them CANCELLED,
        # which a burst of small requests that all fit the queue reached (tests/
        # test_overload.py). One configured bound instead (docs/serving.md, "Overload").
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_calls),
    ]


async def _choose_frontend(settings: Settings, registry: ModelRegistry) -> str:
    """'core' only when asked for and proven on this grpcio by the self-test."""
    if settings.frontend != grpc_frontend.CORE:
        return settings.frontend
    problem = await selftest.core_frontend_problem(
        registry, options=server_options(settings), max_batch_rows=settings.max_batch_rows,
        max_queue_rows=settings.max_queue_rows, broken=settings.fault_injection == "selftest",
    )
    if problem is not None:
        log.warning("event=frontend_fallback frontend=aio grpcio=%s reason=%r",
                    grpc.__version__, problem)
        return grpc_frontend.AIO
    log.info("event=frontend_selftest result=ok frontend=core grpcio=%s", grpc.__version__)
    return grpc_frontend.CORE


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


class Server:
    """One serving process's parts and their order.

    Built in the constructor (no I/O): metrics -> registry -> batcher -> health.
    `start()`: the metrics exporter, health NOT_SERVING, load the repository, choose and build
    the front end, register the servicers and plug their fast lanes, the batcher, listen.
    `stop()`: health NOT_SERVING, the front end drains, the admin endpoint, the batcher
    finishes what is queued, the registry, the exporter: the reverse, each part stopping
    only once nothing above it can hand it more work."""

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self._settings = settings
        if metrics is None:
            metrics = (Metrics(CollectorRegistry()) if settings.metrics_enabled
                       else Metrics.disabled())
        self.metrics = metrics
        self.registry = ModelRegistry(
            settings.model_dir,
            metrics,
            rescan_interval_s=settings.rescan_interval_s,
            default_model=settings.default_model,
            version_policy=settings.version_policy,
            version_labels=settings.version_labels,
        )
        self.batcher = Batcher(
            self.registry,
            metrics,
            max_batch_rows=settings.max_batch_rows,
            max_batch_wait_s=settings.max_batch_wait_s,
            max_queue_rows=settings.max_queue_rows,
            max_queue_bytes=settings.max_queue_bytes,
            max_door_wait_s=settings.max_door_wait_s,
            enabled=settings.batching,
            inline_max_rows=settings.inline_forward_max_rows,
        )
        self._health = _Health(self.registry)
        self.registry.subscribe(self._health.on_registry_event)  # health follows the registry
        self.health = self._health.servicer
        self.port = 0
        self.metrics_port: int | None = None
        self.admin: admin.AdminEndpoint | None = None
        self.frontend = ""  # what serves once started: "core" or "aio" (after the self-test)
        self._grpc_server: grpc.aio.Server | None = None
        self.http: http_frontend.HttpFrontend | None = None  # the REST front end, if any
        self._v2: oip.InferenceServicer | None = None
        self.images: ImageDecoder | None = None  # built by start(): it needs the loop
        self._monitor: PromotionMonitor | None = None  # likewise
        self._stop_exporter: Any = None
        self._stopping = False

    @property
    def grpc_server(self) -> grpc.aio.Server:
        if self._grpc_server is None:
            raise RuntimeError("the server is not started")
        return self._grpc_server

    async def start(self) -> None:
        settings, metrics, registry = self._settings, self.metrics, self.registry
        # None under --workers: the supervisor exports every worker's values (metrics.py).
        if metrics.enabled:
            exporter = start_exporter(settings, metrics)
            if exporter is not None:
                self.metrics_port = exporter.port
                self._stop_exporter = exporter.stop
        self._monitor = promotion_monitor(registry, metrics, settings)  # canary, shadow
        self.batcher.add_forward_observer(self._monitor.observe)
        self.images = ImageDecoder(ImageSettings.from_settings(settings), metrics)  # decoders
        self.images.bind(asyncio.get_running_loop())
        await self._health.update()  # NOT_SERVING until a model is loaded
        await registry.start()
        await self._health.update()
        self.frontend = await _choose_frontend(settings, registry)
        metrics.set_frontend(self.frontend)
        server = self._grpc_server = grpc_frontend.build(self.frontend,
                                                         server_options(settings))
        credentials = _credentials(settings)
        services = self._register(server, credentials)
        services.append(reflection.SERVICE_NAME)
        enable_reflection(services, server)
        await self.batcher.start()
        if settings.http_port:  # the KServe v2 REST front end, on the same loop and batcher
            self.http = await http_frontend.start(
                settings, registry=registry, batcher=self.batcher, metrics=metrics,
                servicer=self._v2,
            )

        address = f"{settings.host}:{settings.port}"
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
        if port == 0:
            raise OSError(f"cannot listen on {address}")
        self.port = port
        await server.start()
        if self.admin is not None:
            await self.admin.start()
        log.info("event=listening address=%s port=%d tls=%s frontend=%s batching=%s "
                 "models=%s pid=%d", settings.host, port, credentials is not None,
                 self.frontend, settings.batching, [s.name for s in registry.status()],
                 os.getpid())

    def _register(self, server: grpc.aio.Server,
                  credentials: grpc.ServerCredentials | None) -> list[str]:
        """The servicers on `server`, their fast lanes plugged into it; the service names."""
        settings, metrics, registry, batcher = (self._settings, self.metrics, self.registry,
                                                self.batcher)
        native = classifier.ClassifierServicer(
            registry, batcher, metrics, max_images=settings.max_images_per_request,
            images=self.images,
        )
        classifier.add_to_server(native, server)
        # Health and reflection parse requests with grpcio's deserializers; through the
        # Registrar a malformed one is INVALID_ARGUMENT on either front end (malformed.py).
        health_pb2_grpc.add_HealthServicer_to_server(self.health, Registrar(server))
        services = [classifier.SERVICE_NAME, health.SERVICE_NAME]
        # --- other servicers register here (each helper adds its own line):
        self.admin = admin.add_to_server(
            server, registry, settings, metrics=metrics, credentials=credentials
        )
        if self.admin is not None and self.admin.server is None:
            services.append(admin.SERVICE_NAME)
        v2 = self._v2 = oip.add_to_server(
            server, registry=registry, batcher=batcher, metrics=metrics,
            settings=oip.V2Settings.from_settings(settings), images=self.images,
        )
        services.append(oip.SERVICE_NAME)
        # --- end of servicer registrations
        grpc_frontend.plug_fast_lanes(server, {**native.fast_methods(), **v2.fast_methods()},
                                      [batcher.run_queued])
        return services

    async def unready(self) -> None:
        """Health NOT_SERVING for good (draining starts): checkers move traffic away."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace_s`."""
        if self._stopping:
            return
        self._stopping = True
        log.info("event=stopping grace_s=%s", grace_s)
        await self.unready()
        draining = [] if self._grpc_server is None else [self._grpc_server.stop(grace_s)]
        if self.http is not None:  # HTTP drains alongside gRPC: both end within grace_s
            draining.append(self.http.stop(grace_s))
        await asyncio.gather(*draining)
        if self.admin is not None:
            await self.admin.stop(grace_s)
        await self.batcher.close()
        if self.images is not None:
            self.images.close()
        if self._monitor is not None:
            self._monitor.close()
        await self.registry.close()
        if self._stop_exporter is not None:
            self._stop_exporter()
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


# What start_server returns; tests and tools name it so.
RunningServer = Server


async def start_server(settings: Settings, *, metrics: Metrics | None = None) -> Server:
    """Build everything from `settings`, load what the repository holds, listen; return."""
    server = Server(settings, metrics=metrics)
    await server.start()
    return server


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
        await running.unready()
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
        level=getattr(logging, level.upper()),  # one of config.LOG_LEVELS
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
