"""The canary choice as a pure function: stable per key, proportional, monotonic in the share."""

from __future__ import annotations

from service.promotion.routing import BUCKETS, MAX_KEY_BYTES, Canary, bucket, to_canary


def test_a_key_always_lands_in_the_same_bucket() -> None:
    for key in ("user-1", "ü-ñ", "x" * 1000, b"\x00\xff"):
        assert len({bucket(key) for _ in range(5)}) == 1
        assert 0 <= bucket(key) < BUCKETS


def test_only_the_first_bytes_of_a_long_key_count() -> None:
    head = "a" * MAX_KEY_BYTES
    assert bucket(head + "tail-1") == bucket(head + "tail-2")


def test_shares_are_proportional_and_raising_one_only_moves_keys_to_the_canary() -> None:
    keys = [f"user-{i}" for i in range(20_000)]
    ten, twenty = Canary(7, 10.0, 6), Canary(7, 20.0, 6)
    at_ten = {k for k in keys if to_canary(ten, k)}
    at_twenty = {k for k in keys if to_canary(twenty, k)}
    assert 0.09 < len(at_ten) / len(keys) < 0.11
    assert 0.19 < len(at_twenty) / len(keys) < 0.21
    assert at_ten <= at_twenty
    assert all(to_canary(Canary(7, 100.0, 6), k) for k in keys[:100])


def test_no_key_draws_at_random() -> None:
    ten = Canary(7, 10.0, 6)
    share = sum(to_canary(ten, "") for _ in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
