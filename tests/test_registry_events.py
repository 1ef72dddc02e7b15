"""Registry events: the bus (order, unsubscribe, a raising listener is contained) and the
events a real registry publishes over real files for a load, a failure, a swap, a rollback."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.versions_util import publish_tiny

from service.metrics import Metrics
from service.model import Model, ModelFormatError
from service.registry import (
    CurrentChanged,
    ModelRegistry,
    NameRefused,
    RegistryEvent,
    VersionFailed,
    VersionLoaded,
    VersionUnloaded,
)
from service.registry.events import EventBus
from service.storage.repository import load_inside

# --- the bus, with plain data


def test_listeners_are_called_in_subscription_order() -> None:
    bus = EventBus()
    seen: list[tuple[str, RegistryEvent]] = []
    bus.subscribe(lambda e: seen.append(("a", e)))
    bus.subscribe(lambda e: seen.append(("b", e)))
    first, second = VersionUnloaded("m", 1), CurrentChanged("m", 1, 2)
    bus.publish(first)
    bus.publish(second)
    assert seen == [("a", first), ("b", first), ("a", second), ("b", second)]


def test_unsubscribe_stops_delivery_to_that_listener_only() -> None:
    bus = EventBus()
    a: list[RegistryEvent] = []
    b: list[RegistryEvent] = []
    stop_a = bus.subscribe(a.append)
    bus.subscribe(b.append)
    stop_a()
    bus.publish(VersionUnloaded("m", 1))
    assert (a, b) == ([], [VersionUnloaded("m", 1)])


def test_a_raising_listener_is_logged_and_the_next_one_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    after: list[RegistryEvent] = []

    def broken(event: RegistryEvent) -> None:
        raise RuntimeError("observer bug")

    bus.subscribe(broken)
    bus.subscribe(after.append)
    with caplog.at_level(logging.ERROR, logger="service.registry"):
        bus.publish(VersionUnloaded("m", 3))
    assert after == [VersionUnloaded("m", 3)]
    assert "observer bug" in caplog.text


# --- a real registry over real files


def _strip(events: list[RegistryEvent]) -> list[RegistryEvent]:
    """Events with load durations zeroed (they are measured, not chosen)."""
    out: list[RegistryEvent] = []
    for e in events:
        if isinstance(e, VersionLoaded):
            e = VersionLoaded(e.model, e.version, 0.0)
        elif isinstance(e, VersionFailed):
            e = VersionFailed(e.model, e.version, e.reason, "", 0.0)
        out.append(e)
    return out


def test_swap_and_rollback_publish_load_unload_and_current_in_order(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)

    async def go() -> list[RegistryEvent]:
        reg = ModelRegistry(tmp_path, rescan_interval_s=0)
        events: list[RegistryEvent] = []
        reg.subscribe(events.append)
        await reg.start()
        publish_tiny(tmp_path, seed=2)
        await reg.rescan()
        shutil.rmtree(tmp_path / "mnist" / "2")
        await reg.rescan()
        return events

    assert _strip(asyncio.run(go())) == [
        VersionLoaded("mnist", 1, 0.0),
        CurrentChanged("mnist", None, 1),
        VersionLoaded("mnist", 2, 0.0),  # the new one is in before the old one goes
        VersionUnloaded("mnist", 1),
        CurrentChanged("mnist", 1, 2),
        VersionLoaded("mnist", 1, 0.0),  # rollback: 1 is loaded again, then 2 goes
        VersionUnloaded("mnist", 2),
        CurrentChanged("mnist", 2, 1),
    ]


def test_failed_load_and_refused_name_are_published(tmp_path: Path) -> None:
    good = publish_tiny(tmp_path, seed=1)
    (tmp_path / "mnist" / "007").mkdir()  # a number, but not a version name

    def loader(root: Path, directory: Path) -> Model:
        if directory.name != str(good):
            raise ModelFormatError("corrupt", f"version {directory.name} is broken")
        return load_inside(root, directory)

    async def go() -> tuple[int, list[RegistryEvent]]:
        reg = ModelRegistry(tmp_path, rescan_interval_s=0, loader=loader)
        events: list[RegistryEvent] = []
        reg.subscribe(events.append)
        await reg.start()
        bad = publish_tiny(tmp_path, seed=2)
        await reg.rescan()
        assert reg.resolve().version == good
        return bad, events

    bad, events = asyncio.run(go())
    assert _strip(events) == [
        NameRefused("mnist", "version_name"),
        VersionLoaded("mnist", good, 0.0),
        CurrentChanged("mnist", None, good),
        VersionFailed("mnist", bad, "corrupt", "", 0.0),
    ]


def test_a_raising_listener_does_not_break_scans_or_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish_tiny(tmp_path, seed=1)
    prom = CollectorRegistry()

    def broken(event: RegistryEvent) -> None:
        raise RuntimeError("observer bug")

    async def go() -> int:
        reg = ModelRegistry(tmp_path, Metrics(prom), rescan_interval_s=0)
        reg.subscribe(broken)
        await reg.start()
        publish_tiny(tmp_path, seed=2)
        await reg.rescan()
        return reg.resolve().version

    with caplog.at_level(logging.ERROR, logger="service.registry"):
        assert asyncio.run(go()) == 2
    assert "observer bug" in caplog.text
    assert prom.get_sample_value("mnist_model_current_version", {"model": "mnist"}) == 2
