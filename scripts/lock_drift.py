#!/usr/bin/env python3
"""Print how the running environment differs from a lock file (used by `./dev test --latest`).

    python scripts/lock_drift.py requirements/dev.lock

One line per package whose installed version is not the locked one, plus packages only one
side has. Exits 0 whatever it finds: drift is information for whoever updates the lock
(`python3 scripts/lock.py --upgrade`), not a failure of main.
"""

from __future__ import annotations

import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

IGNORED = {"pip", "setuptools", "wheel", "mnist-serving"}


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    found = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    return {name: v for name, v in found.items() if name not in IGNORED}


def drift(locked: dict[str, str], have: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(locked) | set(have)):
        old, new = locked.get(name, "-"), have.get(name, "-")
        if old != new:
            lines.append(f"{name:28} {old:>14} -> {new}")
    return lines


def main() -> int:
    lines = drift(read_lock(Path(sys.argv[1])), installed())
    print("\n".join(lines) if lines else "none: the newest versions are the locked ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
