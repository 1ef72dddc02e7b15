"""The registry's values: a loaded version, and the status rows ListModels and admin show.

Kept apart so the planner, the status view and the manager share them without importing
each other; `service.registry` re-exports them (the names other modules import).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.model import Model


class VersionState(enum.Enum):
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"
    # Loaded and validated, but its model's quality gate said no: never served unless an
    # admin promotes it anyway (then AVAILABLE with reason "forced").
    REJECTED = "REJECTED"


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
    # Traffic steering (service.promotion.routing): 0 / 0.0 when there is none.
    canary_version: int = 0
    canary_percent: float = 0.0
    shadow_version: int = 0
    # The last promotion event worth an operator's eye (a rollback and why).
    rollout_note: str = ""
