"""Versions on disk -> loaded, validated, immutable versions; the hot swap.

The repository is `<model_dir>/<name>/<integer version>/`; any other name (the trainer's
`.tmp-*` directories, editor droppings) is ignored. A scan loads new versions off the event
loop, validates them fully, and only then swaps one reference to make them servable. A batch
that already holds a `ServableVersion` keeps using it; it is freed when the last holder drops
it. A version that fails validation is remembered with its file signature and not retried
until its files change.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from service.errors import NotFound, Unavailable
from service.metrics import Metrics
from service.model import CHECKSUM_FILE, WEIGHTS_FILE, Model, ModelFormatError, load_model

log = logging.getLogger(__name__)


class VersionState(enum.Enum):
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


@dataclass(frozen=True, slots=True, eq=False)
class ServableVersion:
    """One loaded version: immutable, shared by batches without locks."""

    name: str
    version: int
    model: Model
    path: Path
    loaded_at: float


@dataclass(frozen=True, slots=True)
class VersionStatus:
    version: int
    state: VersionState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    current_version: int | None
    versions: tuple[VersionStatus, ...]
    labels: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything requests read, swapped as one reference."""

    servable: Mapping[str, Mapping[int, ServableVersion]]
    current: Mapping[str, int]


_Signature = tuple[tuple[str, int, int], ...]


def _signature(directory: Path) -> _Signature:
    """What identifies the files of a version: names, sizes, mtimes."""
    out = []
    for name in (WEIGHTS_FILE, CHECKSUM_FILE):
        try:
            st = (directory / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, -1, -1))
    return tuple(out)


class ModelRegistry:
    """Scans the repository, loads versions, answers which version serves a request."""

    def __init__(
        self,
        model_dir: Path,
        metrics: Metrics,
        *,
        rescan_interval_s: float = 2.0,
        default_model: str | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._dir = model_dir
        self._metrics = metrics
        self._interval = rescan_interval_s
        self._default_model = default_model
        self._on_change = on_change
        self._snapshot = _Snapshot(MappingProxyType({}), MappingProxyType({}))
        self._failed: dict[tuple[str, int], tuple[_Signature, str]] = {}
        self._scan_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle

    async def start(self) -> None:
        """Load what is there now, then keep rescanning on the interval."""
        await self.rescan()
        if self._interval > 0:
            self._task = asyncio.create_task(self._rescan_forever(), name="registry-rescan")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.rescan()
            except Exception:  # a scan must never kill the loop that keeps serving
                log.exception("repository rescan failed; will retry")

    # --- scanning and loading

    def _on_disk(self) -> dict[str, dict[int, Path]]:
        found: dict[str, dict[int, Path]] = {}
        try:
            model_dirs = [p for p in self._dir.iterdir() if p.is_dir()]
        except OSError as e:
            log.warning("cannot read model repository %s: %s", self._dir, e)
            return found
        for model_dir in model_dirs:
            if model_dir.name.startswith("."):
                continue
            versions: dict[int, Path] = {}
            with contextlib.suppress(OSError):
                for v in model_dir.iterdir():
                    if v.name.isdigit() and v.is_dir() and int(v.name) > 0:
                        versions[int(v.name)] = v
            if versions:
                found[model_dir.name] = versions
        return found

    async def rescan(self) -> None:
        """Bring the loaded set in line with the disk; serving continues throughout."""
        async with self._scan_lock:
            disk = self._on_disk()
            old = self._snapshot
            servable: dict[str, Mapping[int, ServableVersion]] = {}
            current: dict[str, int] = {}
            for name, versions in disk.items():
                loaded = old.servable.get(name, {})
                kept: dict[int, ServableVersion] = {
                    v: sv for v, sv in loaded.items() if v in versions
                }
                # Policy 'latest': the newest version that validates serves.
                for v in sorted(versions, reverse=True):
                    if v in kept:
                        break
                    fresh = await self._load(name, v, versions[v])
                    if fresh is not None:
                        kept = {v: fresh}
                        break
                if kept:
                    servable[name] = MappingProxyType(kept)
                    current[name] = max(kept)
            self._snapshot = _Snapshot(MappingProxyType(servable), MappingProxyType(current))
            self._publish_changes(old, self._snapshot)

    async def _load(self, name: str, version: int, path: Path) -> ServableVersion | None:
        sig = _signature(path)
        failed = self._failed.get((name, version))
        if failed is not None and failed[0] == sig:
            return None
        start = time.perf_counter()
        try:
            model = await asyncio.to_thread(load_model, path)
        except ModelFormatError as e:
            elapsed = time.perf_counter() - start
            self._failed[(name, version)] = (sig, str(e))
            self._metrics.version_failed(name, version, e.reason, elapsed)
            log.error("model %s version %d rejected (%s): %s", name, version, e.reason, e)
            return None
        elapsed = time.perf_counter() - start
        self._failed.pop((name, version), None)
        self._metrics.version_available(name, version, elapsed)
        log.info("model %s version %d loaded in %.3f s", name, version, elapsed)
        return ServableVersion(name, version, model, path, time.time())

    def _publish_changes(self, old: _Snapshot, new: _Snapshot) -> None:
        for name, versions in old.servable.items():
            for v in versions:
                if v not in new.servable.get(name, {}):
                    self._metrics.version_unloaded(name, v)
                    log.info("model %s version %d unloaded", name, v)
        for name in set(old.current) | set(new.current):
            if old.current.get(name) != new.current.get(name):
                self._metrics.set_current_version(name, new.current.get(name))
                log.info("model %s now serves version %s", name, new.current.get(name))
        if old != new and self._on_change is not None:
            self._on_change()

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

    def resolve(self, model: str = "", version: int = 0) -> ServableVersion:
        """The version that answers a request; '' and 0 mean the default model and current."""
        snap = self._snapshot
        name = model or self.default_model()
        versions = snap.servable.get(name)
        if versions is None:
            raise NotFound(f"unknown model {name!r}; served models: {sorted(snap.servable)}")
        v = version or snap.current[name]
        sv = versions.get(v)
        if sv is None:
            raise NotFound(
                f"model {name!r} has no loaded version {v}; loaded: {sorted(versions)}"
            )
        return sv

    def status(self) -> list[ModelStatus]:
        """What is on disk and in memory, for ListModels and the admin API."""
        snap = self._snapshot
        out = []
        for name, versions in sorted(self._on_disk().items()):
            rows = []
            for v in sorted(versions):
                if v in snap.servable.get(name, {}):
                    rows.append(VersionStatus(v, VersionState.AVAILABLE))
                elif (name, v) in self._failed:
                    rows.append(VersionStatus(v, VersionState.FAILED, self._failed[(name, v)][1]))
                else:
                    rows.append(VersionStatus(v, VersionState.UNLOADED))
            out.append(ModelStatus(name, snap.current.get(name), tuple(rows)))
        return out
