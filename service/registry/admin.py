"""The registry's status view and admin operations (ListModels, the Admin service).

Reads (`status`, `model_status`) see what the last scan saw, with no I/O and no lock. Each
admin change runs under the manager's scan lock, rescans so it sees the disk as it is now,
and is undone if the version it needs did not load (FAILED_PRECONDITION says why).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace

from service.errors import FailedPrecondition, InvalidInput, NotFound
from service.promotion.routing import Canary
from service.registry.manager import VersionManager
from service.registry.plan import Override
from service.registry.status import model_status
from service.registry.types import ModelStatus
from service.registry.version_policy import check_label
from service.storage.repository import MAX_VERSION

log = logging.getLogger("service.registry")


class AdminOps(VersionManager):
    """Status and admin changes (pins, labels, overrides) on top of the manager's state."""

    # --- status (no I/O: what the last scan saw)

    def status(self) -> list[ModelStatus]:
        """What is on disk and in memory, for ListModels and the admin API."""
        snap = self._snapshot
        return [
            self._steering(name, model_status(
                name,
                on_disk=self._disk.get(name, {}),
                loaded=snap.servable.get(name, {}),
                current=snap.current.get(name),
                served_labels=snap.labels.get(name, {}),
                wanted_labels=self._labels.get(name, {}),
                failed=self._failed,
                loading=self._loading,
                admin_unloaded=self._admin_unloaded,
                policy=str(self._policies.for_model(name)),
                current_pinned=name in self._overrides,
                rejected=self._rejected,
                forced=self._forced,
            ))
            for name in sorted(set(self._disk) | set(snap.servable))
        ]

    def _steering(self, name: str, status: ModelStatus) -> ModelStatus:
        canary = self._snapshot.canaries.get(name)
        shadow = self._snapshot.shadows.get(name)
        return replace(
            status,
            canary_version=canary.version if canary else 0,
            canary_percent=canary.percent if canary else 0.0,
            shadow_version=shadow.version if shadow else 0,
            rollout_note=self._notes.get(name, ""),
        )

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
        rejection = self._rejected.get((name, version))
        undo()
        await self._rescan_locked()
        failure = failure or self._failed.get((name, version))
        rejection = rejection or self._rejected.get((name, version))
        why = (
            f"{failure.reason}: {failure.detail}" if failure
            else f"rejected by its gate ({rejection.reason}): {rejection.detail}; "
            "PromoteVersion with force=true serves it anyway" if rejection
            else "it is not on disk"
        )
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

    async def set_current_version(self, name: str, version: int, *, hold: bool = False
                                  ) -> ModelStatus:
        """Pin the current version (0 clears the pin and returns to the policy).

        The pin holds until it is cleared, its version disappears, or a version newer than
        every version on disk at pin time loads: a rollback survives the bad version staying
        on disk, and the next publish moves everyone forward again. With `hold` newer
        versions do not lift it (they load and wait for a canary or a promotion).
        """
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            if version == 0:
                if self._overrides.pop(name, None) is None and name not in self._disk:
                    raise NotFound(f"unknown model {name!r}; models: {sorted(self._disk)}")
                self._canaries.pop(name, None)  # a canary holds a pin: it ends with it
                await self._rescan_locked()
                return self.model_status(name)
            await self._pin_locked(name, version, MAX_VERSION if hold else 0)
        return self.model_status(name)

    async def _pin_locked(self, name: str, version: int, newest: int = 0) -> None:
        """Make `version` current by an override (loading it); undone if it cannot serve."""
        self._version_on_disk(name, version)
        key = (name, version)
        self._admin_unloaded.discard(key)
        self._failed.pop(key, None)
        previous = self._overrides.get(name)
        self._overrides[name] = Override(version, newest or max(self._disk[name]))
        await self._rescan_locked()

        def undo() -> None:
            if previous is None:
                self._overrides.pop(name, None)
            else:
                self._overrides[name] = previous

        await self._require_available(name, version, undo)

    # --- promotion: canary, shadow, promote (service.promotion)

    async def promote_version(self, name: str, version: int, *, force: bool = False
                              ) -> ModelStatus:
        """Make `version` current (a pin, lifted like SetCurrentVersion's), ending its canary
        and shadow. A version its gate rejected needs `force`, which is recorded."""
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            self._version_on_disk(name, version)
            key = (name, version)
            rejection = self._rejected.get(key)
            if force and rejection is not None:
                self._forced[key] = rejection.detail
                del self._rejected[key]
                log.warning("model %s version %d promoted past its gate by an admin (forced): "
                            "%s", name, version, rejection.detail)
            elif force and version not in self._snapshot.servable.get(name, {}):
                # Not judged yet (or held by a broken gate): skip the gate for it.
                self._forced[key] = "promoted before its gate judged it"
            canary = self._canaries.pop(name, None)
            if self._shadows.get(name) == version:
                del self._shadows[name]
            try:
                await self._pin_locked(name, version)
            except Exception:
                if canary is not None:
                    self._canaries[name] = canary
                raise
            self._notes[name] = f"version {version} promoted" + (" (forced)" if force else "")
            log.info("model %s: version %d promoted to current%s", name, version,
                     " (forced)" if force else "")
        return self.model_status(name)

    async def set_canary(self, name: str, version: int, percent: float) -> ModelStatus:
        """Send `percent` of the requests naming no version to `version`; 0 ends the canary
        (the current version stays, pinned, so the canary does not become current)."""
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            if version == 0:
                self._end_canary(name, "canary ended by an admin")
                await self._rescan_locked()
                return self.model_status(name)
            if not (math.isfinite(percent) and 0 < percent <= 100):
                raise InvalidInput(f"percent must be in (0, 100], got {percent:g}")
            self._version_on_disk(name, version)
            baseline = self._snapshot.current.get(name)
            if baseline is None:
                raise FailedPrecondition(f"model {name!r} serves no version to compare with")
            if version == baseline:
                raise FailedPrecondition(
                    f"version {version} is already the current version of {name!r}"
                )
            previous = self._canaries.get(name)
            if previous is not None:
                baseline = previous.baseline
            previous_override = self._overrides.get(name)
            key = (name, version)
            self._admin_unloaded.discard(key)
            self._failed.pop(key, None)
            self._canaries[name] = Canary(version, float(percent), baseline)
            # Hold the baseline current while the canary runs: a newer publish loads (and is
            # gated) but does not take the traffic from under the experiment.
            self._overrides[name] = Override(baseline, MAX_VERSION)
            await self._rescan_locked()

            def undo() -> None:
                if previous is None:
                    self._canaries.pop(name, None)
                else:
                    self._canaries[name] = previous
                if previous_override is None:
                    self._overrides.pop(name, None)
                else:
                    self._overrides[name] = previous_override

            await self._require_available(name, version, undo)
            self._notes[name] = f"canary version {version} at {percent:g}%"
            log.info("model %s: canary version %d takes %g%% of traffic (current %d held)",
                     name, version, percent, baseline)
        return self.model_status(name)

    def _end_canary(self, name: str, why: str) -> Canary | None:
        """Take the canary out of traffic; the baseline stays current as an ordinary pin (a
        newer publish lifts it). Under the scan lock."""
        canary = self._canaries.pop(name, None)
        if canary is None:
            return None
        disk = self._disk.get(name, {})
        self._overrides[name] = Override(canary.baseline, max(disk) if disk else canary.version)
        self._notes[name] = f"canary version {canary.version} ended: {why}"
        return canary

    async def roll_back_canary(self, name: str, version: int, why: str) -> bool:
        """The automatic rollback (service.promotion.monitor): end the canary of `name` if it
        is still `version`; False when it already ended."""
        async with self._scan_lock:
            canary = self._canaries.get(name)
            if canary is None or canary.version != version:
                return False
            self._end_canary(name, f"rolled back automatically: {why}")
            log.error("model %s: canary version %d ROLLED BACK: %s; version %d serves all "
                      "traffic", name, version, why, canary.baseline)
            await self._rescan_locked()
        return True

    async def set_shadow(self, name: str, version: int) -> ModelStatus:
        """Copy live traffic of `name` to `version` (answers compared, never returned)."""
        async with self._scan_lock:
            self._disk = await self._scan_disk()
            if version == 0:
                self._shadows.pop(name, None)
                await self._rescan_locked()
                return self.model_status(name)
            self._version_on_disk(name, version)
            previous = self._shadows.get(name)
            self._shadows[name] = version
            self._admin_unloaded.discard((name, version))
            self._failed.pop((name, version), None)
            await self._rescan_locked()

            def undo() -> None:
                if previous is None:
                    self._shadows.pop(name, None)
                else:
                    self._shadows[name] = previous

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

