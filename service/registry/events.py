"""What the registry tells the rest of the service: version events and who listens.

The registry publishes; metrics and health subscribe (`ModelRegistry.subscribe`). The
registry imports neither, so a new observer (an audit log, a canary controller) is a new
listener, not an edit of the registry. Listeners run synchronously on the event loop, in
subscription order, right after the change they describe; one that raises is logged and
skipped, never allowed to break a scan or the listeners after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("service.registry")


@dataclass(frozen=True, slots=True)
class VersionLoaded:
    """A version was read and validated (`load_s`: how long); it serves after the swap."""

    model: str
    version: int
    load_s: float


@dataclass(frozen=True, slots=True)
class VersionFailed:
    """A load failed; `reason` is a slug of `service.model.REASONS` (a metric label)."""

    model: str
    version: int
    reason: str
    detail: str
    load_s: float


@dataclass(frozen=True, slots=True)
class VersionRejected:
    """A version loaded but failed its model's quality gate (`reason` "gate", or
    "gate_invalid" when the gate itself is unusable); `detail` holds the measured figures."""

    model: str
    version: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class VersionUnloaded:
    """A version left the served set (its references drain with the last batch holding it)."""

    model: str
    version: int


@dataclass(frozen=True, slots=True)
class CurrentChanged:
    """The version a model serves by default changed; `current` None: the model serves no more."""

    model: str
    previous: int | None
    current: int | None


@dataclass(frozen=True, slots=True)
class TrafficChanged:
    """A model's canary or shadow changed (0: none): metrics show the share being steered."""

    model: str
    canary_version: int
    canary_percent: float
    shadow_version: int


@dataclass(frozen=True, slots=True)
class NameRefused:
    """A repository entry that cannot be a version ('version_name') or a model ('model_name').

    `model` is 'unknown' for a refused model directory: never a caller-chosen string.
    """

    model: str
    reason: str


RegistryEvent = (
    VersionLoaded | VersionFailed | VersionRejected | VersionUnloaded | CurrentChanged
    | NameRefused | TrafficChanged
)
Listener = Callable[[RegistryEvent], None]


class EventBus:
    """Ordered listeners; `publish` calls each in turn and contains their failures."""

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns the call that removes it again."""
        self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    def publish(self, event: RegistryEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # an observer's bug must not stop serving or other observers
                log.exception("registry listener %r failed on %r", listener, event)
