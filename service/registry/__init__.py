"""The model registry: versions on disk -> loaded, validated, immutable versions; the hot swap.

The facade other modules import. Its parts, along TF Serving's seams:
- `service.storage.repository`: the disk (`<model_dir>/<name>/<integer version>/`; other names
  such as the trainer's `.tmp-*` are ignored), file identity, loading inside the repository only;
- `service.registry.plan`: a pure function from disk, policy, labels, pins and load outcomes
  to the versions wanted (availability-preserving: load the new before releasing the old);
- `service.registry.loading`: one load on its own thread, timeout, failure reasons, retry backoff;
- `service.registry.manager`: scan -> plan -> load -> swap one reference -> publish events;
- `service.registry.events`: the events metrics and health subscribe to;
- `service.registry.admin`: the status view and the admin operations (pins, labels);
- `service.registry.status` / `service.registry.types`: the status rows and the values.

This module adds the lifecycle (start, periodic rescan, SIGHUP) and the request path
(`resolve` reads one reference and never awaits or locks).

A version that fails to load, whatever raised, is FAILED with a reason from the fixed set in
`service.model.REASONS` and fails alone: the scan goes on with every other version and model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

from service.errors import InvalidInput, NotFound, Unavailable
from service.metrics import Metrics
from service.promotion import routing
from service.promotion.metrics import promotion_metrics
from service.registry.admin import AdminOps
from service.registry.events import (
    CurrentChanged,
    Listener,
    NameRefused,
    RegistryEvent,
    VersionFailed,
    VersionLoaded,
    VersionUnloaded,
)
from service.registry.loading import DEFAULT_LOAD_POLICY, Loader, LoadPolicy
from service.registry.subscribers import RegistryMetrics
from service.registry.types import ModelStatus, ServableVersion, VersionState, VersionStatus
from service.storage import repository

__all__ = [
    "CurrentChanged",
    "Listener",
    "ModelRegistry",
    "ModelStatus",
    "NameRefused",
    "RegistryEvent",
    "ServableVersion",
    "VersionFailed",
    "VersionLoaded",
    "VersionState",
    "VersionStatus",
    "VersionUnloaded",
]

log = logging.getLogger(__name__)


class ModelRegistry(AdminOps):
    """Scans the repository, loads versions, answers which version serves a request."""

    def __init__(
        self,
        model_dir: Path,
        metrics: Metrics | None = None,
        *,
        rescan_interval_s: float = 2.0,
        default_model: str | None = None,
        version_policy: str = "latest",
        version_labels: str = "",
        loader: Loader = repository.load_inside,
        load_policy: LoadPolicy = DEFAULT_LOAD_POLICY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`metrics`, when given, is subscribed first (`RegistryMetrics`): the registry never
        calls it, it only publishes events. `loader(root, version_dir)` reads and validates one
        version (injectable, so tests can make reads fail or block); the other load arguments
        (`LoadPolicy`) go to `service.registry.loading`."""
        super().__init__(
            model_dir, version_policy=version_policy, version_labels=version_labels,
            loader=loader, load_policy=load_policy, clock=clock,
        )
        if metrics is not None:
            self.subscribe(RegistryMetrics(metrics))
            self.subscribe(promotion_metrics(metrics.registry).on_event)
        self._interval = rescan_interval_s
        self._default_model = default_model
        self._task: asyncio.Task[None] | None = None
        self._hup_task: asyncio.Task[None] | None = None
        self._hup_loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle

    async def start(self) -> None:
        """Load what is there now, then keep rescanning on the interval.

        Never raises for anything in the repository: a server with nothing loadable starts
        NOT_SERVING and picks models up as they appear.
        """
        await self._rescan_logged()
        if self._interval > 0:
            self._task = asyncio.create_task(self._rescan_forever(), name="registry-rescan")

    async def close(self) -> None:
        if self._hup_loop is not None:
            with contextlib.suppress(Exception):
                self._hup_loop.remove_signal_handler(signal.SIGHUP)
            self._hup_loop = None
        for task in (self._task, self._hup_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._hup_task = None

    def install_sighup_handler(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Rescan when the process gets SIGHUP (`kill -HUP`, `docker kill -s HUP`)."""
        loop = loop or asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self._hup_loop = loop

    def _on_sighup(self) -> None:
        log.info("SIGHUP: rescanning the model repository")
        if self._hup_task is None or self._hup_task.done():
            self._hup_task = asyncio.create_task(self._rescan_logged(), name="registry-sighup")

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._rescan_logged()

    async def _rescan_logged(self) -> None:
        try:
            await self.rescan()
        except Exception:  # a scan must never kill the loop that keeps serving
            log.exception("repository rescan failed; will retry")

    # --- the request path (no awaits, no locks: one reference read)

    @property
    def ready(self) -> bool:
        return bool(self._snapshot.current)

    def default_model(self) -> str:
        snap = self._snapshot
        if self._default_model:
            return self._default_model
        if len(snap.current) == 1:
            return next(iter(snap.current))
        if "mnist" in snap.current:
            return "mnist"
        if not snap.current:
            raise Unavailable("no model is loaded yet")
        raise NotFound(f"several models are served ({sorted(snap.current)}): name one")

    def route(self, model: str = "", version: int = 0, label: str = "", key: str = "") -> int:
        """The version number to queue a request under, chosen once at admission: `version`
        when it names one (or a label: resolved at batch time), the canary's number when the
        model has a canary and the routing key (or, without one, a random draw) picks it,
        else 0 (the current version at batch time). Never raises: resolve() validates."""
        if version or label:
            return version
        snap = self._snapshot
        if not snap.canaries:
            return 0
        try:
            name = model or self.default_model()
        except Exception:
            return 0
        canary = snap.canaries.get(name)
        if canary is None or not routing.to_canary(canary, key):
            return 0
        return canary.version

    def shadow_of(self, model: str) -> ServableVersion | None:
        """The version getting a copy of `model`'s live traffic, if any (one reference read)."""
        return self._snapshot.shadows.get(model)

    def canary_of(self, model: str) -> routing.Canary | None:
        return self._snapshot.canaries.get(model)

    def current_of(self, model: str) -> ServableVersion | None:
        snap = self._snapshot
        v = snap.current.get(model)
        return snap.servable[model][v] if v is not None else None

    def resolve(self, model: str = "", version: int = 0, label: str = "",
                key: str | None = None) -> ServableVersion:
        """The version that answers a request: a number, else a label, else the current one.

        With a routing `key` ("" for a random draw) a request naming neither may get the
        canary instead (`route`). Without one (None: the batcher's re-resolve at batch time)
        no canary is drawn: the choice is made once, at admission, by `route`.
        """
        if key is not None:
            version = self.route(model, version, label, key)
        snap = self._snapshot
        name = model or self.default_model()
        versions = snap.servable.get(name)
        if versions is None:
            raise NotFound(f"unknown model {name!r}; served models: {sorted(snap.servable)}")
        if version < 0:
            raise InvalidInput(f"version must be a positive number or 0 (current), got {version}")
        if label and not version:  # a number is exact, so it wins when both are given
            v = snap.labels[name].get(label)
            if v is None:
                wanted = self._labels.get(name, {}).get(label)
                if wanted is not None:
                    raise Unavailable(
                        f"label {label!r} of model {name!r} points at version {wanted}, "
                        "which is not loaded"
                    )
                raise NotFound(
                    f"model {name!r} has no label {label!r}; labels: {sorted(snap.labels[name])}"
                )
            return versions[v]
        v = version or snap.current[name]
        sv = versions.get(v)
        if sv is None:
            raise NotFound(
                f"model {name!r} has no loaded version {v}; loaded: {sorted(versions)}"
            )
        return sv
