"""The README's non-Python client: grpcurl sends an image file, the server classifies it.

The command is taken from README.md as written (only the address changes to the test
server's) and run by bash with the real grpcurl binary (scripts/install-test-tools.sh puts
it in .tools/bin), so the README example cannot rot. Its answer must be the one the Python CLI
gets for the same file: the same preprocessing on the server as in `mnist-client`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerThread, skip_or_fail

from mnist_client.images import load_image
from service.model import load_model, pixels_to_input

ROOT = Path(__file__).resolve().parents[1]
GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


def readme_command() -> str:
    """The README's grpcurl call with an image (a shell command over two lines)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^(grpcurl -plaintext -d .*?images.*?\\\n.*?Classify)", text, re.M | re.S)
    assert match, "README.md lost its grpcurl image example"
    return match.group(1)


def test_readme_grpcurl_classifies_an_image_file(start: Callable[..., ServerThread],
                                                  tmp_path: Path) -> None:
    if not GRPCURL.exists() and shutil.which("grpcurl") is None:
        skip_or_fail("grpcurl not installed: run scripts/install-test-tools.sh")
    grpcurl = str(GRPCURL) if GRPCURL.exists() else "grpcurl"
    repo = tmp_path / "models"
    shutil.copytree(ROOT / "models", repo)
    server = start(repo)
    command = readme_command().replace("localhost:50051", server.target)
    assert command.startswith("grpcurl ")
    done = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{Path(grpcurl).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    (prediction,) = reply["predictions"]
    pixels = load_image(ROOT / "docs" / "examples" / "digit-7.png")
    model = load_model(repo / "mnist" / "1")
    expected = model.predict(pixels_to_input(pixels[None]))[0]
    assert prediction["label"] == int(expected.argmax()) == 7
    assert prediction["probabilities"] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
