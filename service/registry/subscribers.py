"""The registry's events -> metrics: the subscriber `ModelRegistry` attaches when it is given a
`Metrics` (the registry imports metrics, a leaf; metrics imports nothing of the registry)."""

from __future__ import annotations

from service.metrics import Metrics
from service.registry.events import (
    CurrentChanged,
    NameRefused,
    RegistryEvent,
    VersionFailed,
    VersionLoaded,
    VersionUnloaded,
)


class RegistryMetrics:
    """Registry events -> the model metrics: the registry's subscriber (it never calls Metrics).

    `ModelRegistry(model_dir, metrics)` subscribes one; the metric names, labels and values
    are those the registry used to set directly.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, event: RegistryEvent) -> None:
        m = self._metrics
        if isinstance(event, VersionLoaded):
            m.version_available(event.model, event.version, event.load_s)
        elif isinstance(event, VersionFailed):
            m.version_failed(event.model, event.version, event.reason, event.load_s)
        elif isinstance(event, VersionUnloaded):
            m.version_unloaded(event.model, event.version)
        elif isinstance(event, CurrentChanged):
            m.set_current_version(event.model, event.current)
        elif isinstance(event, NameRefused):
            m.name_refused(event.model, event.reason)
