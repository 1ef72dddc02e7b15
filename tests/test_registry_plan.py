"""The pure planner: which versions to load, keep, unload and serve, from plain data.

No files, no clock, no asyncio: each case is a `ModelView` literal. `settle` plays the
manager's loop (load what the plan asks, mark outcomes, plan again) with a fixed set of
versions that fail, so the multi-step cases (a newest version that fails makes room for the
next one down) are checked end to end.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import replace

from service.registry.plan import ModelView, Override, Plan, plan
from service.registry.version_policy import parse_policy


def view(on_disk: AbstractSet[int], loaded: AbstractSet[int] = frozenset(), policy: str = "latest",
         **kw: object) -> ModelView:
    """A view where every loaded version's files are unchanged (ready)."""
    base = ModelView(
        on_disk=frozenset(on_disk), loaded=frozenset(loaded), ready=frozenset(loaded),
        policy=parse_policy(policy),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def settle(v: ModelView, failing: AbstractSet[int] = frozenset()) -> tuple[Plan, list[int]]:
    """Run plan -> load -> plan until settled; returns the final plan and the load order."""
    order: list[int] = []
    while not (p := plan(v)).settled:
        assert not p.unload, "nothing is released while a load is pending"
        for n in p.to_load:
            assert n not in order, f"version {n} tried twice in one scan"
            order.append(n)
        ok = {n for n in p.to_load if n not in failing}
        v = replace(
            v, loaded=v.loaded | ok, ready=v.ready | ok,
            blocked=v.blocked | (set(p.to_load) - ok),
        )
    return p, order


# --- policies


def test_latest_loads_newest_and_serves_it() -> None:
    p, order = settle(view({1, 2, 3}))
    assert order == [3]
    assert (p.keep, p.current, p.unload) == ({3}, 3, set())


def test_latest_n_keeps_n_newest() -> None:
    p, order = settle(view({1, 2, 3, 4}, policy="latest:2"))
    assert order == [4, 3]
    assert (p.keep, p.current) == ({3, 4}, 4)


def test_latest_failing_newest_makes_room_for_next_down() -> None:
    p, order = settle(view({1, 2, 3}, loaded={2}), failing={3})
    assert order == [3]
    assert (p.keep, p.current) == ({2}, 2)
    p, order = settle(view({1, 2, 3, 4}, policy="latest:2"), failing={4, 3})
    assert order == [4, 3, 2, 1]
    assert (p.keep, p.current) == ({1, 2}, 2)


def test_blocked_version_is_not_retried_and_old_keeps_serving() -> None:
    p = plan(view({1, 2}, loaded={1}, blocked=frozenset({2})))
    assert p.settled
    assert (p.keep, p.current) == ({1}, 1)


def test_specific_pins_versions_even_when_newer_exist() -> None:
    p, order = settle(view({1, 2, 3, 4}, policy="specific:1,3"))
    assert sorted(order) == [1, 3]
    assert (p.keep, p.current) == ({1, 3}, 3)


def test_specific_version_missing_from_disk_is_not_wanted() -> None:
    p, order = settle(view({1, 2}, policy="specific:1,5"))
    assert (order, p.keep, p.current) == ([1], {1}, 1)


def test_admin_unloaded_version_is_skipped_by_the_policy() -> None:
    p, _ = settle(view({1, 2, 3}, loaded={3}, admin_unloaded=frozenset({3})))
    assert (p.keep, p.current, p.unload) == ({2}, 2, {3})


# --- availability first


def test_loaded_version_stays_until_its_replacement_is_loaded() -> None:
    # Version 1 is served; 2 is published. The first plan loads 2 and releases nothing.
    first = plan(view({1, 2}, loaded={1}))
    assert (first.to_load, first.unload) == ((2,), set())
    assert 1 in first.keep
    # Once 2 is in, 1 goes and 2 serves.
    after = plan(view({1, 2}, loaded={1, 2}))
    assert (after.keep, after.unload, after.current) == ({2}, {1}, 2)


def test_deleted_directory_stays_until_replacement_loads() -> None:
    # 2 is served, its directory was deleted; 1 is on disk but not loaded.
    first = plan(view({1}, loaded={2}))
    assert (first.to_load, first.unload, first.keep) == ((1,), set(), {2})
    p, _ = settle(view({1}, loaded={2}))
    assert (p.keep, p.unload, p.current) == ({1}, {2}, 1)


def test_nothing_loadable_keeps_what_is_served_while_on_disk() -> None:
    # Files of 2 changed in place and no longer load: keep serving the loaded copy.
    v = replace(view({2}, loaded={2}), ready=frozenset())
    p, order = settle(v, failing={2})
    assert order == [2]
    assert (p.keep, p.current) == ({2}, 2)


def test_nothing_loadable_and_served_directory_gone_serves_nothing() -> None:
    p, _ = settle(view({3}, loaded={2}), failing={3})
    assert (p.keep, p.current, p.unload) == (set(), None, {2})


def test_changed_files_of_a_loaded_version_are_reloaded() -> None:
    v = replace(view({1, 2}, loaded={1, 2}, policy="latest:2"), ready=frozenset({1}))
    assert plan(v).to_load == (2,)


def test_empty_repository_serves_nothing() -> None:
    p = plan(view(set()))
    assert p.settled
    assert (p.keep, p.current) == (set(), None)


# --- labels, admin pins, overrides


def test_label_keeps_its_version_loaded_beside_the_policy() -> None:
    p, order = settle(view({1, 2, 3}, labels={"stable": 1}))
    assert order == [3, 1]
    assert (p.keep, p.current) == ({1, 3}, 3)


def test_label_on_a_version_that_fails_is_not_kept() -> None:
    p, _ = settle(view({1, 2, 3}, labels={"canary": 2}), failing={2})
    assert (p.keep, p.current) == ({3}, 3)


def test_admin_load_keeps_a_version_whatever_the_policy() -> None:
    p, _ = settle(view({1, 2, 3}, loaded={3}, admin_loaded=frozenset({1})))
    assert (p.keep, p.current) == ({1, 3}, 3)


def test_specific_current_prefers_a_policy_version_over_a_pinned_one() -> None:
    p, _ = settle(view({1, 2, 3}, policy="specific:1", labels={"next": 3}))
    assert (p.keep, p.current) == ({1, 3}, 1)


def test_override_serves_its_version_until_a_newer_one_loads() -> None:
    pinned = Override(version=1, newest=2)
    p, _ = settle(view({1, 2}, loaded={2}, override=pinned))
    assert (p.keep, p.current, p.override_dropped) == ({1, 2}, 1, "")
    p, _ = settle(view({1, 2, 3}, loaded={1, 2}, override=pinned))
    assert (p.current, p.override_dropped) == (3, "newer")
    # The pin still held when this scan chose what to keep; it releases 1 on the next scan.
    assert (p.keep, p.unload) == ({1, 3}, {2})
    p, _ = settle(view({1, 2, 3}, loaded={1, 3}))
    assert (p.keep, p.unload, p.current) == ({3}, {1}, 3)


def test_override_whose_version_fails_or_vanishes_falls_back_to_the_policy() -> None:
    p, _ = settle(view({2}, loaded={1, 2}, override=Override(1, 2)))
    assert (p.current, p.override_dropped) == (2, "gone")
    p, _ = settle(view({1, 2}, loaded={2}, override=Override(1, 2)), failing={1})
    assert (p.current, p.override_dropped) == (2, "gone")


def test_override_survives_a_model_with_nothing_to_serve() -> None:
    p, _ = settle(view({1}, override=Override(1, 1)), failing={1})
    assert (p.current, p.override_dropped) == (None, "")


def test_plan_is_deterministic_and_does_not_mutate_its_input() -> None:
    v = view({1, 2, 3}, loaded={1}, labels={"a": 1}, policy="latest:2")
    assert plan(v) == plan(v)
    assert v == view({1, 2, 3}, loaded={1}, labels={"a": 1}, policy="latest:2")
