"""Which versions of one model to load, keep, unload and serve: a pure function.

`plan(view)` sees plain data (what is on disk, the version policy, labels, admin pins and
overrides, what is loaded and what cannot load now) and answers what is wanted. No files, no
clock, no asyncio: tests drive every case with literals. The manager (`service.registry`)
calls it, loads what `to_load` asks for, tells it what loaded or failed, and calls it again
until it is settled; only then does it swap (TF Serving's aspired-versions manager, with the
availability-preserving policy: load the new before letting go of the old).

Rules, kept exactly as the registry applied them before this module existed:
- policy 'latest:N': the N newest versions on disk that are not admin-unloaded and can load
  (a newest version that fails makes room for the next one down);
  'specific:a,b': those of a, b that are on disk, not admin-unloaded and can load;
- pinned (loaded whatever the policy): admin LoadVersion, a label's target, the version of an
  admin SetCurrentVersion override, a canary or shadow version, when on disk and loadable;
- while anything is left to load, every loaded version stays (nothing is unloaded);
- settled with nothing wanted loadable: keep serving the loaded versions whose directory is
  still there (they were valid when loaded) rather than nothing;
- current: the override while it holds (its version kept, nothing newer than it was pinned
  against); else the newest kept version the policy asks for; else the newest kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from service.registry.version_policy import LATEST, VersionPolicy, wanted_by_policy


@dataclass(frozen=True, slots=True)
class Override:
    """An admin SetCurrentVersion: holds until cleared or a version newer than `newest` loads."""

    version: int
    newest: int


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model as the manager sees it at one step of a scan.

    `loaded`: versions in the served set (files maybe changed since); `ready`: those of them
    whose files are unchanged (usable without a load); `blocked`: versions that cannot load
    now (failed and waiting for new files or a retry backoff, or already tried this scan).
    """

    on_disk: frozenset[int] = frozenset()
    loaded: frozenset[int] = frozenset()
    ready: frozenset[int] = frozenset()
    blocked: frozenset[int] = frozenset()
    policy: VersionPolicy = LATEST
    labels: Mapping[str, int] = field(default_factory=dict)
    admin_loaded: frozenset[int] = frozenset()
    admin_unloaded: frozenset[int] = frozenset()
    override: Override | None = None
    # Kept loaded whatever the policy while traffic is steered to them: a canary, a shadow.
    steered: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Plan:
    """`to_load` best first; `keep`/`unload` partition `loaded` (plus what is ready);
    `current` and `override_dropped` mean something once `settled`."""

    to_load: tuple[int, ...]
    keep: frozenset[int]
    unload: frozenset[int]
    current: int | None
    # Why an admin override stops holding: "gone" (its version is not kept) or "newer"
    # (a version newer than the pin's newest loaded); "" while it holds or there is none.
    override_dropped: str = ""

    @property
    def settled(self) -> bool:
        return not self.to_load


def aspired(view: ModelView) -> list[int]:
    """The versions wanted now, in load order: the policy's (best first), then the pinned."""
    usable = (view.on_disk - view.blocked) | (view.ready & view.on_disk)
    by_policy: list[int] = []
    for v in wanted_by_policy(view.policy, set(view.on_disk), set(view.admin_unloaded)):
        if view.policy.kind == "latest" and len(by_policy) >= view.policy.count:
            break
        if v in usable:
            by_policy.append(v)
    pinned = set(view.admin_loaded) | set(view.labels.values()) | set(view.steered)
    if view.override is not None:
        pinned.add(view.override.version)
    return by_policy + sorted(pinned & usable - set(by_policy))


def plan(view: ModelView) -> Plan:
    """What to do next for one model (see the module docstring for the rules)."""
    wanted = aspired(view)
    to_load = tuple(v for v in wanted if v not in view.ready)
    if to_load:  # availability first: nothing leaves until the new versions are in
        return Plan(to_load, view.loaded | (view.ready & set(wanted)), frozenset(), None)
    keep = frozenset(wanted)
    if not keep and view.loaded:
        keep = view.loaded & view.on_disk
    current, dropped = choose_current(view, keep)
    return Plan((), keep, (view.loaded | view.ready) - keep, current, dropped)


def choose_current(view: ModelView, keep: frozenset[int]) -> tuple[int | None, str]:
    """(current version or None when nothing is kept, why the override stopped holding)."""
    if not keep:  # the model leaves the served set; an override waits for it to return
        return None, ""
    dropped = ""
    override = view.override
    if override is not None:
        if override.version not in keep:
            dropped = "gone"
        elif max(keep) > override.newest:
            dropped = "newer"
        else:
            return override.version, ""
    policy = view.policy
    by_policy = [v for v in keep if policy.kind == "latest" or v in policy.versions]
    return max(by_policy or keep), dropped
