"""Which versions of a model stay loaded, and what labels point at: parsing and selection.

Kept apart from the registry so the syntax of `--version-policy` / `--version-labels` is
checked once at startup (a ValueError naming the bad part) and the choice of versions is a
pure function that tests can drive without files.

Policies (TF Serving's `ServableVersionPolicy`, spelled for a flag):

    latest        the newest valid version is loaded and current (default)
    latest:N      the N newest valid versions are loaded; the newest is current
    specific:1,3  exactly these versions are loaded; the highest valid one is current

A flag value may hold one policy for every model (`latest:2`) or per-model entries
(`mnist=latest:2;fashion=specific:4`); an entry without a name sets the default for the rest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# A label is a word that cannot be mistaken for a version number.
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """`kind` 'latest' keeps the `count` newest valid versions; 'specific' keeps `versions`."""

    kind: str = "latest"
    count: int = 1
    versions: frozenset[int] = frozenset()

    def __str__(self) -> str:
        if self.kind == "specific":
            return "specific:" + ",".join(str(v) for v in sorted(self.versions))
        return "latest" if self.count == 1 else f"latest:{self.count}"


LATEST = VersionPolicy()


@dataclass(frozen=True, slots=True)
class Policies:
    """The default policy and the per-model exceptions."""

    default: VersionPolicy = LATEST
    per_model: Mapping[str, VersionPolicy] = field(default_factory=dict)

    def for_model(self, name: str) -> VersionPolicy:
        return self.per_model.get(name, self.default)


def _positive_int(text: str, what: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def parse_policy(text: str) -> VersionPolicy:
    """'latest', 'latest:N' or 'specific:1,3' -> VersionPolicy; ValueError says what was wrong."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.strip()
    if kind == "latest":
        return VersionPolicy("latest", _positive_int(arg, "latest:N") if arg else 1)
    if kind == "specific":
        parts = [p for p in arg.split(",") if p.strip()]
        if not parts:
            raise ValueError(f"specific needs versions, e.g. 'specific:1,3', got {text!r}")
        return VersionPolicy(
            "specific", versions=frozenset(_positive_int(p, "a specific version") for p in parts)
        )
    raise ValueError(
        f"version policy must be 'latest', 'latest:N' or 'specific:1,3', got {text!r}"
    )


def parse_policies(text: str) -> Policies:
    """The --version-policy flag: one policy, or 'name=policy;...' with an optional default."""
    default = LATEST
    per_model: dict[str, VersionPolicy] = {}
    seen_default = False
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        name, eq, policy = entry.partition("=")
        if not eq:
            if seen_default:
                raise ValueError(f"--version-policy has two default policies: {text!r}")
            try:
                default, seen_default = parse_policy(entry), True
            except ValueError as e:
                raise ValueError(f"--version-policy: {e}") from None
            continue
        name = name.strip()
        if not _MODEL_NAME.match(name):
            raise ValueError(f"--version-policy: {name!r} is not a model name (in {entry!r})")
        if name in per_model:
            raise ValueError(f"--version-policy names model {name!r} twice")
        try:
            per_model[name] = parse_policy(policy)
        except ValueError as e:
            raise ValueError(f"--version-policy, model {name!r}: {e}") from None
    return Policies(default, MappingProxyType(per_model))


def check_label(label: str) -> str:
    """A label name, or ValueError: lowercase word, so '3' is always a version and never a label."""
    if not _LABEL.match(label):
        raise ValueError(
            "a label must be a lowercase word (a-z, then a-z, 0-9, '_' or '-', at most 64), "
            f"got {label!r}"
        )
    return label


def parse_labels(text: str) -> dict[str, dict[str, int]]:
    """The --version-labels flag: 'mnist:stable=1,canary=2;fashion:stable=4' -> {model: {..}}."""
    out: dict[str, dict[str, int]] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        name, colon, pairs = entry.partition(":")
        name = name.strip()
        if not colon or not _MODEL_NAME.match(name):
            raise ValueError(
                f"--version-labels entries look like 'mnist:stable=1,canary=2', got {entry!r}"
            )
        labels = out.setdefault(name, {})
        for pair in (p.strip() for p in pairs.split(",")):
            label, eq, version = pair.partition("=")
            if not eq:
                raise ValueError(f"--version-labels: expected label=version, got {pair!r}")
            try:
                label = check_label(label.strip())
                labels[label] = _positive_int(version, f"the version of label {label!r}")
            except ValueError as e:
                raise ValueError(f"--version-labels, model {name!r}: {e}") from None
    return out


def wanted_by_policy(
    policy: VersionPolicy, on_disk: set[int], excluded: set[int]
) -> list[int]:
    """Versions the policy asks for, best first; 'latest' callers stop once `count` loaded.

    For 'latest' this is every candidate newest first, because a newest version that fails to
    load must make room for the next one down; for 'specific' it is exactly the pinned ones.
    """
    candidates = on_disk - excluded
    if policy.kind == "specific":
        return sorted(candidates & policy.versions, reverse=True)
    return sorted(candidates, reverse=True)
