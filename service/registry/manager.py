"""The manager: scan the repository, load what the plan wants, validate, swap, publish.

Per scan: list the disk (`service.storage.repository`), then per model ask the pure planner
(`service.registry.plan`) what to load, load it off the event loop (`service.registry.loading`: a
thread per load, timeout, retry backoff), tell the planner what loaded or failed, and repeat
until it is settled. Only then is one reference (`_Snapshot`) replaced: the swap. A batch that
holds a `ServableVersion` keeps computing with it; it is freed with the last holder.

What happened is published as events (`service.registry.events`): a load's outcome when it
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

from service.model import Model
from service.promotion import gate as gates
from service.promotion.routing import Canary
from service.registry.events import (
    CurrentChanged,
    EventBus,
    Listener,
    NameRefused,
    TrafficChanged,
    VersionLoaded,
    VersionRejected,
    VersionUnloaded,
)
from service.registry.loading import Key, Loader, LoadPolicy, Loads
from service.registry.plan import ModelView, Override, plan
from service.registry.types import ServableVersion
from service.registry.version_policy import Policies, parse_labels, parse_policies
from service.storage import repository
from service.storage.repository import Signature

log = logging.getLogger("service.registry")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """Everything requests read, swapped as one reference."""

    servable: Mapping[str, Mapping[int, ServableVersion]]
    current: Mapping[str, int]
    labels: Mapping[str, Mapping[str, int]]
    # Canaries and shadows whose version is in `servable` (service.promotion.routing).
    canaries: Mapping[str, Canary]
    shadows: Mapping[str, ServableVersion]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A version that loaded but may not serve: its gate said no (`reason` "gate") or its
    gate is unusable ("gate_invalid"). Held until its files or the gate's files change, or
    an admin forces it; it stays on disk."""

    signature: Signature
    gate: gates.GateSignature | None
    reason: str
    detail: str


# A model's gate as last read: its files' identity and the gate, the error, or None (none).
_GateEntry = tuple[gates.GateSignature | None, gates.Gate | gates.GateError | None]

_EMPTY = _Snapshot(*(MappingProxyType({}) for _ in range(5)))


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
        self._gates: dict[str, _GateEntry] = {}
        self._rejected: dict[Key, Rejection] = {}
        self._forced: dict[Key, str] = {}  # promoted past the gate by an admin: why it failed
        self._canaries: dict[str, Canary] = {}
        self._shadows: dict[str, int] = {}
        self._notes: dict[str, str] = {}  # the last rollout event per model, for status
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
                if name in disk:
                    await self._refresh_gate(name)
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
        for key in [k for k in self._rejected if k[1] not in disk.get(k[0], {})]:
            del self._rejected[key]
        for key in [k for k in self._forced if k[1] not in disk.get(k[0], {})]:
            del self._forced[key]
        canaries = {
            name: c for name, c in self._canaries.items()
            if c.version in servable.get(name, {}) and c.version != current.get(name)
        }
        shadows = {
            name: servable[name][v] for name, v in self._shadows.items()
            if v in servable.get(name, {}) and v != current.get(name)
        }
        new = _Snapshot(
            MappingProxyType(servable), MappingProxyType(current), MappingProxyType(labels),
            MappingProxyType(canaries), MappingProxyType(shadows),
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
            steered=frozenset(
                v for v in (
                    self._canaries[name].version if name in self._canaries else 0,
                    self._shadows.get(name, 0),
                ) if v
            ),
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
                and (v in tried or not self._loads.due((name, v), sigs[(name, v)])
                     or self._held((name, v), sigs[(name, v)]))
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
                sv = await self._load(name, v, on_disk[v], sig, loaded)
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
        self, name: str, version: int, path: Path, sig: Signature,
        loaded: Mapping[int, ServableVersion],
    ) -> ServableVersion | None:
        key = (name, version)
        start = time.perf_counter()
        model = await self._loads.load(key, path, sig)
        if model is None:
            return None
        current = self._snapshot.current.get(name)
        baseline = loaded.get(current) if current is not None else None
        if not await self._passes_gate(key, model, sig, baseline):
            return None
        elapsed = time.perf_counter() - start
        self._signatures[key] = sig
        self._events.publish(VersionLoaded(name, version, elapsed))
        log.info("model %s version %d loaded in %.3f s", name, version, elapsed)
        return ServableVersion(name, version, model, path, time.time())

    # --- the quality gate (service.promotion.gate)

    async def _refresh_gate(self, name: str) -> None:
        """Read the model's gate again if its files changed (hot reload, off the loop)."""
        sig = await asyncio.to_thread(gates.signature, self._dir / name)
        entry = self._gates.get(name)
        if entry is not None and entry[0] == sig:
            return
        gate: gates.Gate | gates.GateError | None = None
        if sig is not None:
            try:
                gate = await asyncio.to_thread(gates.load_gate, self._dir / name)
                log.info("model %s: quality gate loaded (%d images, min_accuracy %.4f, "
                         "max_drop %s)", name, gate.images.shape[0], gate.min_accuracy,
                         gate.max_drop)
            except gates.GateError as e:
                gate = e
                log.error("model %s: quality gate unusable, new versions are held until it "
                          "is fixed: %s", name, e)
        elif entry is not None:
            log.info("model %s: quality gate removed", name)
        self._gates[name] = (sig, gate)

    def _gate_sig(self, name: str) -> gates.GateSignature | None:
        entry = self._gates.get(name)
        return entry[0] if entry is not None else None

    def _held(self, key: Key, sig: Signature) -> bool:
        """Rejected by the gate, and neither its files nor the gate's changed since."""
        r = self._rejected.get(key)
        return r is not None and r.signature == sig and r.gate == self._gate_sig(key[0])

    async def _passes_gate(
        self, key: Key, model: Model, sig: Signature, baseline: ServableVersion | None
    ) -> bool:
        """Evaluate a freshly loaded version off the event loop; record a rejection.

        A broken gate holds every new version while the model serves one (fail closed, keep
        serving); with nothing serving yet (a cold start) the version loads, loudly, rather
        than the model staying down because of its gate.
        """
        name, version = key
        entry = self._gates.get(name)
        gate = entry[1] if entry is not None else None
        self._rejected.pop(key, None)
        if gate is None:
            return True
        if key in self._forced:
            log.warning("model %s version %d: gate skipped, promoted by an admin (forced): %s",
                        name, version, self._forced[key])
            return True
        if isinstance(gate, gates.GateError):
            if baseline is None:
                log.error("model %s version %d loaded without its gate (nothing serves yet "
                          "and the gate is unusable: %s)", name, version, gate)
                return True
            self._reject(key, sig, "gate_invalid",
                         f"the model's gate is unusable, new versions are held: {gate}")
            return False
        try:
            verdict = await asyncio.to_thread(
                gates.judge, model, gate, baseline.model if baseline else None,
                baseline.version if baseline else 0,
            )
        except Exception as e:  # a forward that fails on the gate fails the version alone
            log.exception("model %s version %d: gate evaluation failed", name, version)
            self._reject(key, sig, "gate", f"evaluation failed: {type(e).__name__}")
            return False
        if verdict.passed:
            log.info("model %s version %d passed its gate: %s", name, version, verdict.detail)
            return True
        self._reject(key, sig, "gate", verdict.detail)
        return False

    def _reject(self, key: Key, sig: Signature, reason: str, detail: str) -> None:
        name, version = key
        self._rejected[key] = Rejection(sig, self._gate_sig(name), reason, detail)
        log.warning("model %s version %d REJECTED by its gate (%s): %s; it stays on disk, "
                    "the current version keeps serving", name, version, reason, detail)
        self._events.publish(VersionRejected(name, version, reason, detail))

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
        for name in sorted(set(old.canaries) | set(new.canaries) | set(old.shadows)
                           | set(new.shadows)):
            c, sh = new.canaries.get(name), new.shadows.get(name)
            if (old.canaries.get(name), old.shadows.get(name)) != (c, sh):
                self._events.publish(TrafficChanged(
                    name, c.version if c else 0, c.percent if c else 0.0,
                    sh.version if sh else 0,
                ))
        for name in sorted(set(old.current) | set(new.current)):
            before, after = old.current.get(name), new.current.get(name)
            if before != after:
                log.info("model %s now serves version %s", name, after)
                self._events.publish(CurrentChanged(name, before, after))

