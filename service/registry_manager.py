"""The manager: scan the repository, load what the plan wants, validate, swap, publish.

Per scan: list the disk (`service.repository`), then per model ask the pure planner
(`service.registry_plan`) what to load, load it off the event loop (`service.loading`: a
thread per load, timeout, retry backoff), tell the planner what loaded or failed, and repeat
until it is settled. Only then is one reference (`_Snapshot`) replaced: the swap. A batch that
holds a `ServableVersion` keeps computing with it; it is freed with the last holder.

What happened is published as events (`service.registry_events`): a load's outcome when it
ends, unloads and current-version changes right after the swap. Metrics and health subscribe;
the manager imports neither. Every mutation runs under one asyncio lock
(scans and admin calls queue behind each other); requests read `_snapshot` without it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from service import repository
from service.loading import Loader, LoadPolicy, Loads
from service.registry_events import (
    CurrentChanged,
    EventBus,
    Listener,
    NameRefused,
    VersionLoaded,
    VersionUnloaded,
)
from service.registry_plan import ModelView, Override, plan
from service.registry_types import ServableVersion
from service.repository import Signature
from service.version_policy import Policies, parse_labels, parse_policies

log = logging.getLogger("service.registry")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything requests read, swapped as one reference."""

    servable: Mapping[str, Mapping[int, ServableVersion]]
    current: Mapping[str, int]
    labels: Mapping[str, Mapping[str, int]]


_EMPTY = _Snapshot(MappingProxyType({}), MappingProxyType({}), MappingProxyType({}))


def _signatures(name: str, on_disk: Mapping[int, Path]) -> dict[tuple[str, int], Signature]:
    """The files' identity of every version of one model on disk (blocking: in a thread)."""
    return {(name, v): repository.signature(p) for v, p in on_disk.items()}


class VersionManager:
    """Keeps the served set in line with the disk, the policy, labels and admin pins."""

    def __init__(
        self,
        model_dir: Path,
        *,
        version_policy: str,
        version_labels: str,
        loader: Loader,
        load_policy: LoadPolicy,
        clock: Callable[[], float],
    ) -> None:
        self._dir = model_dir
        self._events = EventBus()
        self._loads = Loads(
            model_dir, self._events.publish, loader, policy=load_policy, clock=clock,
        )
        self._refused: set[tuple[str, str]] = set()
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
        self._overrides: dict[str, Override] = {}
        self._scan_lock = asyncio.Lock()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` for every registry event from now on; returns unsubscribe.

        Listeners run on the event loop in subscription order; one that raises is logged.
        """
        return self._events.subscribe(listener)

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
                self._events.publish(NameRefused(model, "version_name"))
            else:
                log.warning("ignoring model directory %r: %s", model, why)
                self._events.publish(NameRefused("unknown", "model_name"))
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
            loaded = old.servable.get(name, {})
            try:
                kept, chosen = await self._settle(name, disk.get(name, {}), loaded)
            except Exception:  # a bug met by one model must not stop the others
                log.exception("model %s: scan failed; keeping what it served", name)
                kept, chosen = dict(loaded), old.current.get(name)
            if not kept or chosen is None:
                continue
            servable[name] = MappingProxyType(kept)
            current[name] = chosen
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

    def _view(self, name: str, on_disk: Mapping[int, Path]) -> ModelView:
        """The planner's inputs that do not change while one model settles."""
        return ModelView(
            on_disk=frozenset(on_disk),
            policy=self._policies.for_model(name),
            labels=MappingProxyType(dict(self._labels.get(name, {}))),
            admin_loaded=frozenset(v for (n, v) in self._admin_loaded if n == name),
            admin_unloaded=frozenset(v for (n, v) in self._admin_unloaded if n == name),
            override=self._overrides.get(name),
        )

    async def _settle(
        self,
        name: str,
        on_disk: Mapping[int, Path],
        loaded: Mapping[int, ServableVersion],
    ) -> tuple[dict[int, ServableVersion], int | None]:
        """Plan, load, plan again until settled: the versions kept and the current one."""
        sigs = await asyncio.to_thread(_signatures, name, on_disk)
        base = self._view(name, on_disk)
        work = dict(loaded)
        ready = {
            v for v in loaded
            if v in on_disk and self._signatures.get((name, v)) == sigs.get((name, v))
        }
        tried: set[int] = set()
        while True:
            blocked = {
                v for v in on_disk
                if v not in ready
                and (v in tried or not self._loads.due((name, v), sigs[(name, v)]))
            }
            step = plan(replace(
                base, loaded=frozenset(work), ready=frozenset(ready), blocked=frozenset(blocked)
            ))
            if step.settled:
                break
            for v in step.to_load:
                tried.add(v)
                # The files' identity right before reading them, as a load compares it with
                # the identity after to tell files that changed mid-read.
                sig = await asyncio.to_thread(repository.signature, on_disk[v])
                sv = await self._load(name, v, on_disk[v], sig)
                if sv is not None:
                    work[v], ready = sv, ready | {v}
        if step.override_dropped == "gone":
            log.warning("model %s: pinned current version %d is gone; back to the policy",
                        name, self._overrides[name].version)
            del self._overrides[name]
        elif step.override_dropped == "newer":
            log.info("model %s: version %d was published after the pin to %d; serving it",
                     name, max(step.keep), self._overrides[name].version)
            del self._overrides[name]
        return {v: work[v] for v in step.keep}, step.current

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
        self._events.publish(VersionLoaded(name, version, elapsed))
        log.info("model %s version %d loaded in %.3f s", name, version, elapsed)
        return ServableVersion(name, version, model, path, time.time())

    def _publish_changes(self, old: _Snapshot, new: _Snapshot) -> None:
        for name, versions in old.servable.items():
            for v, sv in versions.items():
                if new.servable.get(name, {}).get(v) is not sv:
                    if v in new.servable.get(name, {}):
                        log.info("model %s version %d replaced: its files changed", name, v)
                        continue
                    self._signatures.pop((name, v), None)
                    self._events.publish(VersionUnloaded(name, v))
                    log.info("model %s version %d unloaded", name, v)
        for name in sorted(set(old.current) | set(new.current)):
            before, after = old.current.get(name), new.current.get(name)
            if before != after:
                log.info("model %s now serves version %s", name, after)
                self._events.publish(CurrentChanged(name, before, after))

