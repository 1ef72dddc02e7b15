"""One model's status row set, from what the last scan saw (no I/O, no lock).

What ListModels, the v2 metadata and the admin API report: every version on disk or in
memory, in one of LOADING / AVAILABLE / FAILED (with the reason) / REJECTED (by its gate,
the measured figures as the reason) / UNLOADED.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from types import MappingProxyType

from service.registry.loading import Failure, Key
from service.registry.manager import Rejection
from service.registry.types import ModelStatus, VersionState, VersionStatus


def model_status(
    name: str,
    *,
    on_disk: Collection[int],
    loaded: Collection[int],
    current: int | None,
    served_labels: Mapping[str, int],
    wanted_labels: Mapping[str, int],
    failed: Mapping[Key, Failure],
    loading: Collection[Key],
    admin_unloaded: Collection[Key],
    policy: str,
    current_pinned: bool,
    rejected: Mapping[Key, Rejection] = MappingProxyType({}),
    forced: Mapping[Key, str] = MappingProxyType({}),
) -> ModelStatus:
    """`served_labels`: labels whose version is loaded; `wanted_labels`: every label set."""
    rows = []
    for v in sorted(set(on_disk) | set(loaded)):
        names = tuple(sorted(k for k, t in wanted_labels.items() if t == v))
        failure = failed.get((name, v))
        rejection = rejected.get((name, v))
        if (name, v) in loading:
            rows.append(VersionStatus(v, VersionState.LOADING, labels=names))
        elif v in loaded and (name, v) in forced:
            rows.append(VersionStatus(
                v, VersionState.AVAILABLE, "forced",
                f"promoted past its gate by an admin: {forced[(name, v)]}", names,
            ))
        elif v in loaded:
            rows.append(VersionStatus(v, VersionState.AVAILABLE, labels=names))
        elif rejection is not None and v not in loaded:
            # The figures (no paths) are the reason itself: what every view shows.
            reason = (f"gate: {rejection.detail}" if rejection.reason == "gate"
                      else "gate_invalid")
            rows.append(VersionStatus(v, VersionState.REJECTED, reason, rejection.detail,
                                      names))
        elif failure is not None:
            rows.append(
                VersionStatus(
                    v, VersionState.FAILED, failure.reason, failure.detail, names,
                    failure.attempts if failure.transient else 0,
                )
            )
        elif (name, v) in admin_unloaded:
            rows.append(
                VersionStatus(
                    v, VersionState.UNLOADED, "admin_unloaded",
                    "unloaded by an admin call; LoadVersion brings it back", names,
                )
            )
        else:
            rows.append(VersionStatus(v, VersionState.UNLOADED, labels=names))
    return ModelStatus(
        name, current, tuple(rows), MappingProxyType(dict(served_labels)), policy,
        current_pinned,
    )
