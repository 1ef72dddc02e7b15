"""The registry's status view and admin operations (ListModels, the Admin service).

Reads (`status`, `model_status`) see what the last scan saw, with no I/O and no lock. Each
admin change runs under the manager's scan lock, rescans so it sees the disk as it is now,
and is undone if the version it needs did not load (FAILED_PRECONDITION says why).
"""

from __future__ import annotations

from collections.abc import Callable

from service.errors import FailedPrecondition, InvalidInput, NotFound
from service.registry_manager import VersionManager
from service.registry_plan import Override
from service.registry_status import model_status
from service.registry_types import ModelStatus
from service.version_policy import check_label


class AdminOps(VersionManager):
    """Status and admin changes (pins, labels, overrides) on top of the manager's state."""

    # --- status (no I/O: what the last scan saw)

    def status(self) -> list[ModelStatus]:
        """What is on disk and in memory, for ListModels and the admin API."""
        snap = self._snapshot
        return [
            model_status(
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
            )
            for name in sorted(set(self._disk) | set(snap.servable))
        ]

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
            self._overrides[name] = Override(version, max(self._disk[name]))
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

