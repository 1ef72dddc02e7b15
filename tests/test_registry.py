"""The registry against a real model repository on disk: policies, labels, rollback, pins.

Every test drives the real scan/load/swap path with real files; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from support.versions_util import publish_tiny, tiny_model

from service.config import load_settings
from service.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from service.metrics import Metrics
from service.registry import CurrentChanged, ModelRegistry
from service.registry.version_policy import parse_labels, parse_policies, parse_policy

X = np.random.default_rng(7).random((3, 784), dtype=np.float32)


def run(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def make(tmp_path: Path, **kw: Any) -> tuple[ModelRegistry, CollectorRegistry]:
    prom = CollectorRegistry()
    kw.setdefault("rescan_interval_s", 0)
    return ModelRegistry(tmp_path, Metrics(prom), **kw), prom


def states(reg: ModelRegistry, name: str = "mnist") -> dict[int, str]:
    (st,) = [s for s in reg.status() if s.name == name]
    return {v.version: v.state.value for v in st.versions}


# --- syntax of the settings ----------------------------------------------------------------


def test_policy_syntax() -> None:
    assert str(parse_policy("latest")) == "latest"
    assert parse_policy("latest:3").count == 3
    assert parse_policy("specific:3,1").versions == frozenset({1, 3})
    p = parse_policies("latest:2;fashion=specific:4")
    assert str(p.for_model("mnist")) == "latest:2"
    assert str(p.for_model("fashion")) == "specific:4"
    for bad, needle in [
        ("newest", "'latest', 'latest:N' or 'specific:1,3'"),
        ("latest:0", "positive integer"),
        ("latest:x", "positive integer"),
        ("specific:", "needs versions"),
        ("a=latest;a=latest", "twice"),
        ("latest;latest:2", "two default"),
        ("mnist=specific:1,b", "'b'"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_policies(bad)


def test_label_syntax() -> None:
    assert parse_labels("mnist:stable=1,canary=2;f:stable=4") == {
        "mnist": {"stable": 1, "canary": 2},
        "f": {"stable": 4},
    }
    for bad, needle in [
        ("stable=1", "look like"),
        ("mnist:stable", "label=version"),
        ("mnist:3=1", "lowercase word"),
        ("mnist:stable=0", "positive integer"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_labels(bad)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MNIST_VERSION_POLICY": "latest:x"}, "--version-policy: latest:N must be a positive"),
        ({"MNIST_VERSION_LABELS": "mnist:Stable=1"}, "--version-labels, model 'mnist'"),
    ],
)
def test_bad_syntax_rejected_by_settings(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        load_settings(None, env)
    assert load_settings(None, {"MNIST_VERSION_POLICY": "latest:2;f=specific:1,3"})


def test_bad_policy_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version policy"):
        make(tmp_path, version_policy="oldest")


# --- policies --------------------------------------------------------------------------------


def test_latest_serves_newest_and_ignores_non_integer_names(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)
    for junk in (".tmp-abc", "latest", "0", "-1", "٣"):  # the last is an Arabic-Indic 3
        (tmp_path / "mnist" / junk).mkdir()
    shutil.copytree(tmp_path / "mnist" / "2", tmp_path / "mnist" / ".tmp-xyz", dirs_exist_ok=True)

    async def go() -> None:
        reg, prom = make(tmp_path)
        await reg.start()
        assert reg.ready
        sv = reg.resolve()
        assert (sv.name, sv.version) == ("mnist", 2)
        assert states(reg) == {1: "UNLOADED", 2: "AVAILABLE"}
        with pytest.raises(NotFound, match="no loaded version 1"):
            reg.resolve(version=1)
        np.testing.assert_allclose(sv.model.predict(X), tiny_model(2).predict(X))
        assert prom.get_sample_value("mnist_model_current_version", {"model": "mnist"}) == 2
        await reg.close()

    run(go)


def test_latest_n_keeps_n_newest_addressable(tmp_path: Path) -> None:
    for seed in range(4):
        publish_tiny(tmp_path, seed=seed)

    async def go() -> None:
        reg, _ = make(tmp_path, version_policy="latest:2")
        await reg.start()
        assert reg.resolve().version == 4
        assert reg.resolve(version=3).version == 3
        assert states(reg) == {1: "UNLOADED", 2: "UNLOADED", 3: "AVAILABLE", 4: "AVAILABLE"}
        publish_tiny(tmp_path, seed=9)
        await reg.rescan()
        assert states(reg) == {
            1: "UNLOADED", 2: "UNLOADED", 3: "UNLOADED", 4: "AVAILABLE", 5: "AVAILABLE"
        }
        assert reg.resolve().version == 5

    run(go)


def test_specific_pins_versions_even_when_newer_exist(tmp_path: Path) -> None:
    for seed in range(4):
        publish_tiny(tmp_path, seed=seed)

    async def go() -> None:
        reg, _ = make(tmp_path, version_policy="other=latest;mnist=specific:1,3")
        await reg.start()
        assert reg.resolve().version == 3
        assert reg.resolve(version=1).version == 1
        assert states(reg) == {1: "AVAILABLE", 2: "UNLOADED", 3: "AVAILABLE", 4: "UNLOADED"}
        assert reg.status()[0].policy == "specific:1,3"

    run(go)


def test_several_models_and_default(tmp_path: Path) -> None:
    publish_tiny(tmp_path, "mnist", 1)
    publish_tiny(tmp_path, "fashion", 2)

    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        assert reg.default_model() == "mnist"
        assert reg.resolve("fashion").name == "fashion"
        with pytest.raises(NotFound, match="unknown model 'digits'"):
            reg.resolve("digits")

    run(go)


def test_empty_repository_is_not_ready(tmp_path: Path) -> None:
    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        assert not reg.ready
        with pytest.raises(Unavailable, match="no model"):
            reg.resolve()
        publish_tiny(tmp_path)
        await reg.rescan()
        assert reg.ready
        assert reg.resolve().version == 1

    run(go)


# --- swap, rollback ---------------------------------------------------------------------------


def test_swap_keeps_old_reference_usable_and_rollback_on_delete(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)
    changes: list[int] = []

    async def go() -> None:
        reg, prom = make(tmp_path)
        reg.subscribe(lambda e: changes.append(1) if isinstance(e, CurrentChanged) else None)
        await reg.start()
        held = reg.resolve()  # what a running batch holds
        publish_tiny(tmp_path, seed=2)
        await reg.rescan()
        assert reg.resolve().version == 2
        # The batch that took version 1 before the swap still computes with it.
        np.testing.assert_allclose(held.model.predict(X), tiny_model(1).predict(X))
        assert states(reg) == {1: "UNLOADED", 2: "AVAILABLE"}
        loaded = {"model": "mnist", "version": "1"}
        assert prom.get_sample_value("mnist_model_version_loaded", loaded) is None

        shutil.rmtree(tmp_path / "mnist" / "2")
        await reg.rescan()
        assert reg.resolve().version == 1, "deleting the newest version rolls back"
        np.testing.assert_allclose(reg.resolve().model.predict(X), tiny_model(1).predict(X))
        assert states(reg) == {1: "AVAILABLE"}
        assert len(changes) == 3

    run(go)


def test_republished_number_is_reloaded(tmp_path: Path) -> None:
    """A version directory replaced under the same number (by hand: the trainer never reuses
    a number) is the new files."""
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)

    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        shutil.rmtree(tmp_path / "mnist" / "2")
        assert publish_tiny(tmp_path, seed=3) == 3  # the high-water mark: never 2 again
        os.rename(tmp_path / "mnist" / "3", tmp_path / "mnist" / "2")
        await reg.rescan()
        np.testing.assert_allclose(reg.resolve().model.predict(X), tiny_model(3).predict(X))

    run(go)


def test_interval_rescan_picks_up_new_version(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)

    async def go() -> None:
        reg, _ = make(tmp_path, rescan_interval_s=0.05)
        await reg.start()
        try:
            publish_tiny(tmp_path, seed=2)
            for _ in range(200):
                if reg.resolve().version == 2:
                    break
                await asyncio.sleep(0.02)
            assert reg.resolve().version == 2
        finally:
            await reg.close()

    run(go)


def test_sighup_triggers_rescan(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)

    async def go() -> None:
        reg, _ = make(tmp_path)  # no interval: only the signal can bring version 2 in
        await reg.start()
        reg.install_sighup_handler()
        try:
            publish_tiny(tmp_path, seed=2)
            await asyncio.sleep(0.1)
            assert reg.resolve().version == 1
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(200):
                if reg.resolve().version == 2:
                    break
                await asyncio.sleep(0.02)
            assert reg.resolve().version == 2
        finally:
            await reg.close()

    run(go)


# --- labels ------------------------------------------------------------------------------------


def test_labels_from_settings_keep_their_versions_loaded(tmp_path: Path) -> None:
    for seed in range(3):
        publish_tiny(tmp_path, seed=seed)

    async def go() -> None:
        reg, _ = make(tmp_path, version_labels="mnist:stable=1,canary=3")
        await reg.start()
        assert reg.resolve(label="stable").version == 1
        assert reg.resolve(label="canary").version == 3
        assert reg.resolve().version == 3
        assert reg.resolve(version=1, label="canary").version == 1, "a number wins"
        with pytest.raises(NotFound, match="no label 'beta'"):
            reg.resolve(label="beta")
        (st,) = reg.status()
        assert dict(st.labels) == {"stable": 1, "canary": 3}
        assert states(reg) == {1: "AVAILABLE", 2: "UNLOADED", 3: "AVAILABLE"}

    run(go)


def test_set_label_moves_removes_and_rejects(tmp_path: Path) -> None:
    for seed in range(3):
        publish_tiny(tmp_path, seed=seed)

    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        await reg.set_label("mnist", "stable", 2)  # loads 2, which 'latest' alone would not
        assert reg.resolve(label="stable").version == 2
        await reg.set_label("mnist", "stable", 1)
        assert reg.resolve(label="stable").version == 1
        assert states(reg) == {1: "AVAILABLE", 2: "UNLOADED", 3: "AVAILABLE"}
        with pytest.raises(NotFound, match="no version 9 on disk"):
            await reg.set_label("mnist", "stable", 9)
        assert reg.resolve(label="stable").version == 1, "a failed move leaves the label"
        with pytest.raises(InvalidInput, match="lowercase word"):
            await reg.set_label("mnist", "7", 1)
        await reg.set_label("mnist", "stable", 0)
        with pytest.raises(NotFound, match="no label 'stable'"):
            reg.resolve(label="stable")
        assert states(reg) == {1: "UNLOADED", 2: "UNLOADED", 3: "AVAILABLE"}

    run(go)


# --- admin actions ------------------------------------------------------------------------------


def test_set_current_pins_until_newer_version_published(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)

    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        st = await reg.set_current_version("mnist", 1)  # roll back: 2 is bad
        assert st.current_version == 1
        assert st.current_pinned
        await reg.rescan()
        assert reg.resolve().version == 1, "the pin survives rescans while 2 stays on disk"
        assert reg.resolve(version=2).version == 2, "2 stays loaded by the 'latest' policy"
        publish_tiny(tmp_path, seed=3)
        await reg.rescan()
        assert reg.resolve().version == 3, "a newer publish moves everyone forward again"
        assert not reg.status()[0].current_pinned
        await reg.set_current_version("mnist", 2)
        assert reg.resolve().version == 2
        await reg.set_current_version("mnist", 0)
        assert reg.resolve().version == 3, "0 clears the pin"

    run(go)


def test_load_and_unload_version(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)

    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        with pytest.raises(FailedPrecondition, match="only loaded version"):
            await reg.unload_version("mnist", 2)
        with pytest.raises(FailedPrecondition, match="not loaded"):
            await reg.unload_version("mnist", 1)
        await reg.load_version("mnist", 1)
        assert reg.resolve(version=1).version == 1
        await reg.rescan()
        assert states(reg) == {1: "AVAILABLE", 2: "AVAILABLE"}, "a loaded version stays"
        # Unloading the current version falls back to the next one the policy allows.
        st = await reg.unload_version("mnist", 2)
        assert st.current_version == 1
        assert states(reg) == {1: "AVAILABLE", 2: "UNLOADED"}
        await reg.rescan()
        assert reg.resolve().version == 1, "the policy does not bring 2 back on its own"
        await reg.load_version("mnist", 2)
        assert reg.resolve().version == 2
        with pytest.raises(NotFound, match="unknown model"):
            await reg.load_version("nope", 1)

    run(go)


def test_unload_refuses_labelled_version(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)
    publish_tiny(tmp_path, seed=2)

    async def go() -> None:
        reg, _ = make(tmp_path, version_labels="mnist:stable=1")
        await reg.start()
        with pytest.raises(FailedPrecondition, match=r"labels \['stable'\]"):
            await reg.unload_version("mnist", 1)

    run(go)


def test_loading_state_is_visible_while_a_version_loads(tmp_path: Path) -> None:
    publish_tiny(tmp_path, seed=1)

    async def go() -> None:
        reg, _ = make(tmp_path)
        await reg.start()
        publish_tiny(tmp_path, seed=2, hidden=2048)  # ~6 MB: the load takes a while
        scan = asyncio.create_task(reg.rescan())
        seen: set[str] = set()
        while not scan.done():
            seen.add(states(reg).get(2, ""))
            assert reg.resolve().version in (1, 2), "requests keep being answered"
            await asyncio.sleep(0)
        await scan
        assert "LOADING" in seen
        assert states(reg)[2] == "AVAILABLE"

    run(go)


def test_files_broken_in_place_keep_the_loaded_copy(tmp_path: Path) -> None:
    """Someone overwrites the only version's weights: the validated copy in memory serves on."""
    publish_tiny(tmp_path, seed=1)

    async def go() -> None:
        reg, prom = make(tmp_path)
        await reg.start()
        (tmp_path / "mnist" / "1" / "model.npz").write_bytes(b"garbage")
        await reg.rescan()
        np.testing.assert_allclose(reg.resolve().model.predict(X), tiny_model(1).predict(X))
        labels = {"model": "mnist", "reason": "checksum"}
        assert prom.get_sample_value("mnist_model_rejected_versions_total", labels) == 1
        await reg.rescan()
        assert prom.get_sample_value("mnist_model_rejected_versions_total", labels) == 1

    run(go)
