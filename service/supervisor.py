"""`--workers N`: a supervisor of N single-worker processes sharing one port.

The workers share the port through SO_REUSEPORT (the kernel spreads connections between
them). The supervisor restarts a worker that dies, forwards SIGTERM (drain) and SIGHUP
(rescan), exports every worker's metrics, and sleeps on its workers' process sentinels. A
worker ends itself when its supervisor is gone (`die_with_supervisor`), so a SIGKILLed
supervisor leaves no unsupervised workers holding the port.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.config import Settings
from service.fatal import die
from service.metrics import (
    multiprocess_dir,
    prepare_multiprocess,
    start_exporter,
    worker_exited,
)

log = logging.getLogger("service.server")  # the name operators grep the supervisor's lines by


def die_with_supervisor() -> None:
    """A worker whose supervisor is gone (SIGKILL, OOM killer) ends too.

    Left alone it would keep serving the port, unsupervised and unexported, and a restarted
    supervisor's workers would share the port with it. A thread waits on the supervisor's
    process sentinel (readable when it exits), logs why and exits. (Linux's PR_SET_PDEATHSIG
    would add nothing: SIGTERM needs the same interpreter to act on it and races the log
    line; SIGKILL would end the worker without saying why.)
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel

    def watch() -> None:
        multiprocessing.connection.wait([sentinel])
        die(f"supervisor_gone supervisor_pid={parent.pid}")

    # A supervisor that died already leaves the sentinel readable: the thread ends us at once.
    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def supervise(settings: Settings, worker: Callable[[Settings], None]) -> int:
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
        p = ctx.Process(target=worker, args=(settings,), name=f"worker-{i}")
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

    # Signal handlers only set flags and write here, waking the wait below at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def wake() -> None:
        with contextlib.suppress(OSError):
            os.write(wake_w, b"x")

    def on_stop(signum: int, frame: Any) -> None:
        on_signal(signum, frame)
        wake()

    procs = [spawn(i) for i in range(settings.workers)]
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)
    while True:
        for i, p in enumerate(procs):
            if not p.is_alive() and not stopping:
                log.error("event=worker_died worker=%d pid=%s exitcode=%s action=restart",
                          i, p.pid, p.exitcode)
                if p.pid is not None:
                    worker_exited(p.pid)  # no stale in-flight/queue/version gauges
                time.sleep(1.0)  # a worker that dies at once is not restarted in a tight loop
                if not stopping:  # a SIGTERM during the pause: no worker it did not reach
                    procs[i] = spawn(i)
        if stopping and not any(p.is_alive() for p in procs):
            break
        # Sleep until a worker exits or a signal arrives (each process's sentinel becomes
        # readable when it ends).
        live = [p.sentinel for p in procs if p.is_alive()]  # an ended one's stays readable
        if not live or (len(live) < len(procs) and not stopping):
            continue  # one ended since the check above: handle it first
        ready = multiprocessing.connection.wait([*live, wake_r])
        if wake_r in ready:
            os.read(wake_r, 4096)
    os.close(wake_r)
    os.close(wake_w)
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
