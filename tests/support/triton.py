"""The unmodified Triton client, run in its own venv (.tools/triton-venv, made by
scripts/install-test-tools.sh from requirements/triton-client.lock): a fixture that finds its
interpreter and a runner for the client scripts beside this module."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support.servers import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".tools" / "triton-venv" / "bin" / "python"


@pytest.fixture(scope="module")
def triton_python() -> Path:
    if not TRITON_PYTHON.exists():
        skip_or_fail(f"{TRITON_PYTHON} missing: run scripts/install-test-tools.sh")
    return TRITON_PYTHON


def run_client(python: Path, script: str, *args: str) -> None:
    """Run tests/support/<script> with the Triton venv's `python`; it must exit 0."""
    done = subprocess.run(
        [str(python), str(Path(__file__).resolve().parent / script), *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"triton client failed:\n{done.stdout}\n{done.stderr}"
