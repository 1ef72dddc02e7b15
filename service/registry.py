"""Versions on disk -> loaded, validated, immutable versions; the hot swap.

The repository is `<model_dir>/<name>/<integer version>/`; any other name (the trainer's
`.tmp-*` directories, editor droppings) is ignored. A scan decides, per model, which versions
should be loaded (the version policy, plus versions pinned by a label, an admin LoadVersion or
an admin SetCurrentVersion), loads the missing ones off the event loop, validates them fully,
and only then swaps one reference (`_Snapshot`) that every request reads. A batch that already
holds a `ServableVersion` keeps using it; it is freed when the last holder drops it.

A version that fails to load, whatever raised, is FAILED with a reason from the fixed set in
`service.model.REASONS` and fails alone: the scan goes on with every other version and model.
A permanent failure (the files are wrong) is not retried until its files change; a transient
one is retried with backoff (`service.loading`, which also bounds how long a scan waits for
one load). A loaded version whose directory disappears stays servable until the scan
has loaded whatever replaces it (availability first, like TF Serving's
availability-preserving policy), then it is released.

Every mutation happens under one asyncio lock (scans and admin calls queue behind each
other); the request path (`resolve`) reads one reference and never awaits or locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from service import repository
from service.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from service.loading import Loader, Loads
from service.metrics import Metrics
from service.model import Model
from service.repository import Signature
from service.version_policy import (
    Policies,
    check_label,
    parse_labels,
    parse_policies,
    wanted_by_policy,
)

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
    """`reason` is the short slug of a failure (a metric label); `detail` the full message.

    `detail` may name filesystem paths: log and admin API only, never an unauthenticated
    answer. `retries` counts the failed attempts of a transient failure.
    """

    version: int
    state: VersionState
    reason: str = ""
    detail: str = ""
    labels: tuple[str, ...] = ()
    retries: int = 0


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    current_version: int | None
    versions: tuple[VersionStatus, ...]
    labels: Mapping[str, int] = field(default_factory=dict)
    policy: str = "latest"
    # True while an admin SetCurrentVersion overrides the policy's choice.
    current_pinned: bool = False


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything requests read, swapped as one reference."""

    servable: Mapping[str, Mapping[int, ServableVersion]]
    current: Mapping[str, int]
    labels: Mapping[str, Mapping[str, int]]


@dataclass(frozen=True, slots=True)
class _Override:
    """An admin SetCurrentVersion: holds until cleared or a version newer than `newest` loads."""

    version: int
    newest: int


_EMPTY = _Snapshot(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))


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
        version_policy: str = "latest",
        version_labels: str = "",
        loader: Loader = repository.load_inside,
        load_timeout_s: float = 60.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`loader(root, version_dir)` reads and validates one version (injectable, so tests
        can make reads fail or block); the other load arguments go to `service.loading`."""
        self._dir = model_dir
        self._loads = Loads(
            model_dir, metrics, loader, timeout_s=load_timeout_s,
            retry_initial_s=retry_initial_s, retry_max_s=retry_max_s, clock=clock,
        )
        self._refused: set[tuple[str, str]] = set()
        self._metrics = metrics
        self._interval = rescan_interval_s
        self._default_model = default_model
        self._on_change = on_change
        # Bad syntax fails here, at startup, with a ValueError naming the flag.
        self._policies: Policies = parse_policies(version_policy)
        self._labels: dict[str, dict[str, int]] = parse_labels(version_labels)
        self._snapshot = _EMPTY
        self._disk: dict[str, dict[int, Path]] = {}
        self._signatures: dict[tuple[str, int], Signature] = {}
        self._failed = self._loads.failed  # read and (admin retries) cleared here
        self._loading = self._loads.loading
        self._admin_loaded: set[tuple[str, int]] = set()
        self._admin_unloaded: set[tuple[str, int]] = set()
        self._overrides: dict[str, _Override] = {}
        self._scan_lock = asyncio.Lock()
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

    # --- scanning and loading

    async def rescan(self) -> None:
        """Bring the loaded set in line with the disk; serving continues throughout."""
        async with self._scan_lock:
            await self._rescan_locked()

    async def _scan_disk(self) -> dict[str, dict[int, Path]]:
        found = await asyncio.to_thread(repository.scan, self._dir)
        for model, name in found.refused.keys() - self._refused:
            why = found.refused[(model, name)]
            if name:
                log.warning("model %s: ignoring directory %r: %s", model, name, why)
                self._metrics.name_refused(model, "version_name")
            else:
                log.warning("ignoring model directory %r: %s", model, why)
                self._metrics.name_refused("unknown", "model_name")
        self._refused = set(found.refused)
        return found.versions

    async def _rescan_locked(self) -> None:
        disk = await self._scan_disk()
        self._disk = disk
        old = self._snapshot
        servable: dict[str, Mapping[int, ServableVersion]] = {}
        current: dict[str, int] = {}
        labels: dict[str, Mapping[str, int]] = {}
        for name in sorted(set(disk) | set(old.servable)):
            on_disk = disk.get(name, {})
            try:
                kept = await self._scan_model(name, on_disk, old.servable.get(name, {}))
            except Exception:  # a bug met by one model must not stop the others
                log.exception("model %s: scan failed; keeping what it served", name)
                kept = dict(old.servable.get(name, {}))
            if not kept:
                continue
            servable[name] = MappingProxyType(kept)
            current[name] = self._choose_current(name, on_disk, kept)
            labels[name] = MappingProxyType(
                {k: v for k, v in self._labels.get(name, {}).items() if v in kept}
            )
        # Forget failures of directories that are gone: a new one with that number is new.
        self._loads.forget(lambda key: key[1] in disk.get(key[0], {}))
        new = _Snapshot(
            MappingProxyType(servable), MappingProxyType(current), MappingProxyType(labels)
        )
        self._snapshot = new  # the swap: one reference assignment
        self._publish_changes(old, new)

    async def _scan_model(
        self, name: str, on_disk: Mapping[int, Path], loaded: Mapping[int, ServableVersion]
    ) -> dict[int, ServableVersion]:
        """The versions of one model to keep or load now, by policy and pins."""
        policy = self._policies.for_model(name)
        excluded = {v for (n, v) in self._admin_unloaded if n == name}
        kept: dict[int, ServableVersion] = {}
        for v in wanted_by_policy(policy, set(on_disk), excluded):
            if policy.kind == "latest" and len(kept) >= policy.count:
                break
            sv = await self._get(name, v, on_disk[v], loaded)
            if sv is not None:
                kept[v] = sv
        pinned = {v for (n, v) in self._admin_loaded if n == name}
        pinned |= set(self._labels.get(name, {}).values())
        if name in self._overrides:
            pinned.add(self._overrides[name].version)
        for v in sorted(pinned & set(on_disk) - set(kept)):
            sv = await self._get(name, v, on_disk[v], loaded)
            if sv is not None:
                kept[v] = sv
        if not kept and loaded:
            # Nothing on disk validates any more: keep serving what we have rather than
            # nothing, as long as its directory still exists (it was valid when loaded).
            kept = {v: sv for v, sv in loaded.items() if v in on_disk}
        return kept

    async def _get(
        self, name: str, version: int, path: Path, loaded: Mapping[int, ServableVersion]
    ) -> ServableVersion | None:
        """The loaded version if its files are unchanged, else a fresh load (None: failed)."""
        sig = await asyncio.to_thread(repository.signature, path)
        sv = loaded.get(version)
        if sv is not None and self._signatures.get((name, version)) == sig:
            return sv
        if not self._loads.due((name, version), sig):
            return None
        return await self._load(name, version, path, sig)

    async def _load(
        self, name: str, version: int, path: Path, sig: Signature
    ) -> ServableVersion | None:
        key = (name, version)
        start = time.perf_counter()
        model = await self._loads.load(key, path, sig)
        if model is None:
            return None
        elapsed = time.perf_counter() - start
        self._signatures[key] = sig
        self._metrics.version_available(name, version, elapsed)
        log.info("model %s version %d loaded in %.3f s", name, version, elapsed)
        return ServableVersion(name, version, model, path, time.time())

    def _choose_current(
        self, name: str, on_disk: Mapping[int, Path], kept: Mapping[int, ServableVersion]
    ) -> int:
        """The admin override while it holds, else the policy's newest loaded version."""
        override = self._overrides.get(name)
        if override is not None:
            if override.version not in kept:
                log.warning(
                    "model %s: pinned current version %d is gone; back to the policy",
                    name, override.version,
                )
                del self._overrides[name]
            elif max(kept) > override.newest:
                log.info(
                    "model %s: version %d was published after the pin to %d; serving it",
                    name, max(kept), override.version,
                )
                del self._overrides[name]
            else:
                return override.version
        policy = self._policies.for_model(name)
        by_policy = [v for v in kept if policy.kind == "latest" or v in policy.versions]
        return max(by_policy or kept)

    def _publish_changes(self, old: _Snapshot, new: _Snapshot) -> None:
        for name, versions in old.servable.items():
            for v, sv in versions.items():
                if new.servable.get(name, {}).get(v) is not sv:
                    if v in new.servable.get(name, {}):
                        log.info("model %s version %d replaced: its files changed", name, v)
                        continue
                    self._signatures.pop((name, v), None)
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

    def resolve(self, model: str = "", version: int = 0, label: str = "") -> ServableVersion:
        """The version that answers a request: a number, else a label, else the current one."""
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

    # --- status (no I/O: what the last scan saw)

    def status(self) -> list[ModelStatus]:
        """What is on disk and in memory, for ListModels and the admin API."""
        snap = self._snapshot
        out = []
        for name in sorted(set(self._disk) | set(snap.servable)):
            loaded = snap.servable.get(name, {})
            label_map = dict(snap.labels.get(name, {}))
            wanted_labels = self._labels.get(name, {})
            rows = []
            for v in sorted(set(self._disk.get(name, {})) | set(loaded)):
                names = tuple(sorted(k for k, t in wanted_labels.items() if t == v))
                failure = self._failed.get((name, v))
                if (name, v) in self._loading:
                    rows.append(VersionStatus(v, VersionState.LOADING, labels=names))
                elif v in loaded:
                    rows.append(VersionStatus(v, VersionState.AVAILABLE, labels=names))
                elif failure is not None:
                    rows.append(
                        VersionStatus(
                            v, VersionState.FAILED, failure.reason, failure.detail, names,
                            failure.attempts if failure.transient else 0,
                        )
                    )
                elif (name, v) in self._admin_unloaded:
                    rows.append(
                        VersionStatus(
                            v, VersionState.UNLOADED, "admin_unloaded",
                            "unloaded by an admin call; LoadVersion brings it back", names,
                        )
                    )
                else:
                    rows.append(VersionStatus(v, VersionState.UNLOADED, labels=names))
            out.append(
                ModelStatus(
                    name,
                    snap.current.get(name),
                    tuple(rows),
                    MappingProxyType(label_map),
                    str(self._policies.for_model(name)),
                    name in self._overrides,
                )
            )
        return out

    def model_status(self, name: str) -> ModelStatus:
        for s in self.status():
            if s.name == name:
                return s
        raise NotFound(f"unknown model {name!r}; models: {[s.name for s in self.status()]}")

    # --- admin actions (each rescans under the lock, so it sees the disk as it is now)

    def _version_on_disk(self, name: str, version: int) -> None:
        if version < 1:
            raise InvalidInput(f"version must be a positive integer, got {version}")
        if name not in self._disk:
            raise NotFound(f"unknown model {name!r}; models: {sorted(self._disk)}")
        if version not in self._disk[name]:
            raise NotFound(
                f"model {name!r} has no version {version} on disk; "
                f"versions: {sorted(self._disk[name])}"
            )

    async def _require_available(
        self, name: str, version: int, undo: Callable[[], None]
    ) -> None:
        """After an admin change that needs `version` loaded: undo it if the load failed."""
        if version in self._snapshot.servable.get(name, {}):
            return
        failure = self._failed.get((name, version))
        undo()
        await self._rescan_locked()
        failure = failure or self._failed.get((name, version))
        why = f"{failure.reason}: {failure.detail}" if failure else "it is not on disk"
        raise FailedPrecondition(f"model {name!r} version {version} did not load ({why})")

    async def load_version(self, name: str, version: int) -> ModelStatus:
        """Load a version and keep it loaded, whatever the policy, until UnloadVersion.

        An explicit load retries a version that failed before, even if its files did not
        change: the operator asked.
        """
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            self._version_on_disk(name, version)
            key = (name, version)
            self._admin_unloaded.discard(key)
            self._admin_loaded.add(key)
            self._failed.pop(key, None)
            await self._rescan_locked()
            await self._require_available(name, version, lambda: self._admin_loaded.discard(key))
        return self.model_status(name)

    async def unload_version(self, name: str, version: int) -> ModelStatus:
        """Release a version and keep the policy from loading it again until LoadVersion."""
        async with self._scan_lock:
            loaded = self._snapshot.servable.get(name, {})
            if version not in loaded:
                raise FailedPrecondition(
                    f"model {name!r} version {version} is not loaded; loaded: {sorted(loaded)}"
                )
            if len(loaded) == 1:
                raise FailedPrecondition(
                    f"version {version} is the only loaded version of {name!r}; unloading it "
                    "would leave nothing to serve (load another first)"
                )
            pointing = sorted(k for k, v in self._labels.get(name, {}).items() if v == version)
            if pointing:
                raise FailedPrecondition(
                    f"labels {pointing} point at {name!r} version {version}; move them first"
                )
            override = self._overrides.get(name)
            if override is not None and override.version == version:
                raise FailedPrecondition(
                    f"{name!r} version {version} is pinned as current; SetCurrentVersion "
                    "to another version (or 0 to clear the pin) first"
                )
            key = (name, version)
            self._admin_loaded.discard(key)
            self._admin_unloaded.add(key)
            await self._rescan_locked()
        return self.model_status(name)

    async def set_current_version(self, name: str, version: int) -> ModelStatus:
        """Pin the current version (0 clears the pin and returns to the policy).

        The pin holds until it is cleared, its version disappears, or a version newer than
        every version on disk at pin time loads: a rollback survives the bad version staying
        on disk, and the next publish moves everyone forward again.
        """
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            if version == 0:
                if self._overrides.pop(name, None) is None and name not in self._disk:
                    raise NotFound(f"unknown model {name!r}; models: {sorted(self._disk)}")
                await self._rescan_locked()
                return self.model_status(name)
            self._version_on_disk(name, version)
            key = (name, version)
            self._admin_unloaded.discard(key)
            self._failed.pop(key, None)
            previous = self._overrides.get(name)
            self._overrides[name] = _Override(version, max(self._disk[name]))
            await self._rescan_locked()

            def undo() -> None:
                if previous is None:
                    self._overrides.pop(name, None)
                else:
                    self._overrides[name] = previous

            await self._require_available(name, version, undo)
        return self.model_status(name)

    async def set_label(self, name: str, label: str, version: int) -> ModelStatus:
        """Point a label at a version (loading it if needed); version 0 removes the label."""
        try:
            check_label(label)
        except ValueError as e:
            raise InvalidInput(str(e)) from None
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            labels = self._labels.setdefault(name, {})
            previous = labels.get(label)
            if version == 0:
                if previous is None:
                    raise NotFound(f"model {name!r} has no label {label!r}; labels: {labels}")
                del labels[label]
                await self._rescan_locked()
                return self.model_status(name)
            self._version_on_disk(name, version)
            self._admin_unloaded.discard((name, version))
            self._failed.pop((name, version), None)
            labels[label] = version
            await self._rescan_locked()

            def undo() -> None:
                if previous is None:
                    labels.pop(label, None)
                else:
                    labels[label] = previous

            await self._require_available(name, version, undo)
        return self.model_status(name)

