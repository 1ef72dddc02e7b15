"""docs/oip.md's and the README's curl examples, run as written against a real server on the
committed model.

Every `sh` block of their curl sections is run with bash (localhost:8000 pointed at the
test server's HTTP port) and must succeed; when a `text` block follows it, the output must be
that text. A doc example that drifts from what the server does fails here. docs/oip.md's run
in a temp directory (they write files) that sees the repository's docs/examples/ where a
reader at the repository's root does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.procs import free_port
from support.servers import ServerThread

ROOT = Path(__file__).resolve().parent.parent
# (document, the section whose `sh` blocks run, the directory they run in)
DOCS = ((ROOT / "docs" / "oip.md", "### With curl", None),
        (ROOT / "README.md", "### Over HTTP with curl", ROOT))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def examples() -> list[tuple[str, str | None, Path | None]]:
    """(command, expected output or None, where it runs) for each `sh` block of the curl
    sections."""
    found: list[tuple[str, str | None, Path | None]] = []
    for doc, heading, cwd in DOCS:
        text = doc.read_text()
        section = text.split(heading, 1)[1].split("\n#", 1)[0]
        blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in FENCE.finditer(section)]
        for i, (info, body, _, end) in enumerate(blocks):
            if info != "sh":
                continue
            after = blocks[i + 1] if i + 1 < len(blocks) else None
            expected = (after[1] if after is not None and after[0] == "text"
                        and section[end:after[2]].strip() == "" else None)
            found.append((body, expected, cwd))
    return found


def test_the_docs_have_curl_examples() -> None:
    commands = [command for command, _, _ in examples()]
    assert len(commands) >= 6
    assert all("localhost:8000" in c for c in commands)


@pytest.mark.parametrize("index", range(len(examples())))
def test_curl_example(index: int, tmp_path: Path, start: Callable[..., ServerThread]) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl missing: apt-get install curl")
    command, expected, cwd = examples()[index]
    server = start(ROOT / "models", http_port=free_port())
    script = command.replace("localhost:8000", f"127.0.0.1:{server.settings.http_port}")
    if cwd is None:  # as if at the repository's root, e.g. docs/examples/digit-7.png
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "examples").symlink_to(ROOT / "docs" / "examples")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script],
                          capture_output=True, text=True, timeout=60, cwd=cwd or tmp_path)
    assert done.returncode == 0, (script, done.stdout, done.stderr)
    if expected is not None:
        assert done.stdout.strip() == expected.strip(), script
