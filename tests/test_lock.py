"""The locked dependency set (requirements/*.lock) is what the suite runs on and the image ships.

pyproject.toml keeps ranges for people installing the package into their own environment; the
locks pin one tested set that ./dev, the Dockerfile and CI install with --no-deps
(scripts/lock.py writes them). These tests fail when the files drift from each other or from
the venv the suite is running in, so "green here" always means "green on that set".
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import distribution, distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
BUILD_TOOLS = {"pip", "setuptools", "wheel"}
sys.path.insert(0, str(ROOT / "scripts"))
from lock_drift import drift, read_lock  # noqa: E402


def _project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def _runtime_closure() -> dict[str, str]:
    """{name: installed version} of everything `mnist-serving[image]` needs at run time: the
    image serves encoded images, so it ships the `image` extra (Pillow) and no other."""
    closure: dict[str, str] = {}
    todo = ["mnist-serving"]
    while todo:
        name = todo.pop()
        extra = "image" if name == "mnist-serving" else ""
        for raw in distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in {"", extra}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in closure:
                closure[dep] = distribution(dep).version
                todo.append(dep)
    return closure


def test_every_lock_pins_exact_versions_only() -> None:
    for lock in LOCKS.glob("*.lock"):
        for line in lock.read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", line), (lock, line)


@pytest.mark.locked_env
def test_this_venv_is_exactly_the_dev_lock() -> None:
    """What the suite runs on is the locked set: nothing newer, nothing unlocked."""
    locked = read_lock(LOCKS / "dev.lock")
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    installed = {n: v for n, v in installed.items() if n not in BUILD_TOOLS | {"mnist-serving"}}
    assert drift(locked, installed) == [], (
        "the venv differs from requirements/dev.lock; run ./dev test (it reinstalls the lock) "
        "or update the lock with `python3 scripts/lock.py`"
    )


@pytest.mark.locked_env
def test_build_tools_are_the_build_lock() -> None:
    for name, version in read_lock(LOCKS / "build.lock").items():
        assert distribution(name).version == version, name


@pytest.mark.locked_env
def test_runtime_lock_is_the_runtime_closure_at_the_tested_versions() -> None:
    """The image installs runtime.lock with --no-deps: it must hold every runtime dependency,
    at the version the tests ran on, and nothing the server does not need."""
    assert read_lock(LOCKS / "runtime.lock") == _runtime_closure()


def test_locked_versions_satisfy_pyproject_ranges() -> None:
    """The ranges pyproject publishes are honest: the tested versions lie inside them."""
    project = _project()
    locked = read_lock(LOCKS / "dev.lock")
    requirements = list(project["dependencies"])  # type: ignore[call-overload]
    requirements += project["optional-dependencies"]["dev"]  # type: ignore[index]
    for raw in requirements:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name == "mnist-serving":
            continue
        assert name in locked, f"{name} is a dependency but not locked"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"{name}=={locked[name]} is locked but pyproject says {req.specifier}")


def test_dockerfile_installs_the_locks_without_resolving() -> None:
    text = (ROOT / "Dockerfile").read_text()
    installs = [ln for ln in text.replace("\\\n", " ").splitlines() if "pip install" in ln]
    joined = " ".join(installs)
    assert "-r requirements/build.lock" in joined
    assert re.search(r"--no-deps\s+-r requirements/runtime\.lock", joined), installs
    for command in re.split(r"&&|RUN ", joined):
        if "pip install" in command:
            assert "-r requirements/" in command or "--no-deps" in command, command
    kept = (ROOT / ".dockerignore").read_text().splitlines()
    assert {"!requirements/build.lock", "!requirements/runtime.lock"} <= set(kept)


@pytest.mark.locked_env
def test_triton_client_venv_is_its_lock() -> None:
    venv = ROOT / ".tools" / "triton-venv" / "bin" / "python"
    if not venv.exists():
        pytest.fail(f"{venv} missing: scripts/install-test-tools.sh installs it")
    freeze = subprocess.run([str(venv), "-m", "pip", "freeze", "--all"], capture_output=True,
                            text=True, check=True, timeout=60).stdout
    installed = {canonicalize_name(n): v for n, _, v in
                 (ln.partition("==") for ln in freeze.splitlines() if "==" in ln)}
    installed = {n: v for n, v in installed.items() if n not in BUILD_TOOLS}
    assert drift(read_lock(LOCKS / "triton-client.lock"), installed) == []


def test_drift_names_every_difference() -> None:
    locked = {"grpcio": "1.85.1", "numpy": "2.4.6", "gone": "1.0"}
    latest = {"grpcio": "1.85.3", "numpy": "2.4.6", "new": "0.1"}
    lines = drift(locked, latest)
    assert [ln.split()[0] for ln in lines] == ["gone", "grpcio", "new"]
    assert "1.85.1 -> 1.85.3" in " ".join(lines[1].split())
