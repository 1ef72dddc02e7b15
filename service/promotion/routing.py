"""Which version a request naming none gets while a model has a canary: a pure choice.

A request with a routing key is hashed (BLAKE2b of at most its first 256 bytes) to one of
10,000 buckets, and the first `percent` x 100 buckets go to the canary: the same key always
reaches the same version while the canary's share stays the same, and raising the share only
moves keys towards the canary. A request without a key draws a bucket at random.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

BUCKETS = 10_000
MAX_KEY_BYTES = 256


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary `version` taking `percent` (0, 100] of traffic; `baseline` is the version held
    current meanwhile (what a rollback returns everyone to)."""

    version: int
    percent: float
    baseline: int

    @property
    def threshold(self) -> int:
        return round(self.percent * BUCKETS / 100)


def bucket(key: str | bytes) -> int:
    """The bucket of a routing key; a random one for an empty key."""
    if not key:
        return random.randrange(BUCKETS)
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    digest = hashlib.blake2b(raw[:MAX_KEY_BYTES], digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def to_canary(canary: Canary, key: str | bytes) -> bool:
    """Whether this request goes to the canary."""
    return bucket(key) < canary.threshold
