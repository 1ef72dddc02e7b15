"""`--workers N`: how each worker's counts reach the supervisor's /metrics, with public APIs only.

Each worker keeps its hot counts in memory (service/metrics/counts.py) and a `SnapshotWriter`
thread writes them every SNAPSHOT_INTERVAL_S as one JSON document, `mnist_counts_<pid>.json`,
into the shared directory (write to a temporary name, then rename: a reader sees the old or
the new document, never half of one). The supervisor's collector sums every worker's document
at scrape time (`read_counts`). The few model-lifecycle metrics are ordinary prometheus_client
metrics in its multiprocess mode (memory-mapped `*.db` files, `MultiProcessCollector`).

Why files of counts rather than prometheus_client's multiprocess metrics for the hot families:
those record each observation into a memory-mapped file through `Histogram.observe()`, one
value at a time (a 256-row batch is 256 observes per histogram), and bulk recording them would
need the private fields this package no longer touches; a snapshot costs the worker one JSON
dump of a few hundred numbers per interval, off the request path (docs/metrics.md, "Several
workers", has the figures). The price: a scrape sees a worker's counts up to
SNAPSHOT_INTERVAL_S old, and a worker killed with SIGKILL loses what it counted since its last
snapshot (a clean exit writes a final one).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

from service.metrics.counts import Store

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
SNAPSHOT_PREFIX = "mnist_counts_"
SNAPSHOT_INTERVAL_S = 0.5


def multiprocess_dir() -> Path | None:
    """The shared directory when this process records in multiprocess mode, else None."""
    value = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return Path(value) if value else None


def prepare_multiprocess(directory: Path) -> None:
    """In the parent, before starting workers: a shared directory without old values, in the env.

    prometheus_client picks its value storage when it is first imported, so workers must be
    fresh interpreters (spawned, or exec'd) that inherit this environment variable; files left
    by a previous run are removed so old counts do not leak into the new one (only ours:
    `*.db`, `mnist_counts_*.json` and their temporary files; the directory may be an
    operator's volume).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ours = ("*.db", f"{SNAPSHOT_PREFIX}*.json", f".{SNAPSHOT_PREFIX}*.json.tmp")
    for stale in [p for pattern in ours for p in directory.glob(pattern)]:
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def snapshot_path(directory: Path, pid: int) -> Path:
    return directory / f"{SNAPSHOT_PREFIX}{pid}.json"


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)


def worker_exited(pid: int) -> None:
    """In the parent, when a worker exits: forget its live gauges (in-flight, queue, versions).

    Its counters and histograms stay, so totals never go backwards.
    """
    directory = multiprocess_dir()
    if directory is None:
        return
    multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
    path = snapshot_path(directory, pid)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # it never wrote one
    doc["live"] = {}
    _write_atomically(path, doc)


def read_counts(directory: Path) -> Store:
    """Every worker's snapshot summed: the supervisor's collector reads this at each scrape."""
    store = Store()
    for path in sorted(directory.glob(f"{SNAPSHOT_PREFIX}*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # (renamed over atomically: only a removed file)
            log.warning("event=metrics_snapshot_unreadable path=%s error=%r", path, e)
            continue
        store.merge_json(doc)
    return store


class SnapshotWriter:
    """A worker's thread writing its counts to the shared directory every `interval_s`.

    `read()` returns the JSON document (it records what waits first). `stop()` writes a last
    one; it also runs at interpreter exit, so a worker that stops cleanly loses nothing.
    """

    def __init__(self, directory: Path, read: Callable[[], dict[str, Any]],
                 interval_s: float = SNAPSHOT_INTERVAL_S) -> None:
        self._path = snapshot_path(directory, os.getpid())
        self._read = read
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def write(self) -> None:
        try:
            _write_atomically(self._path, self._read())
        except OSError as e:  # a full disk: the next interval tries again, serving goes on
            log.warning("event=metrics_snapshot_failed path=%s error=%r", self._path, e)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.write()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(RuntimeError):  # called from the thread itself
            self._thread.join(timeout=5)
        self.write()
        atexit.unregister(self.stop)
