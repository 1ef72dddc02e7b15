"""`mnist-client` admin subcommands against a real server: the operator's rollback loop."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from support.servers import ServerThread, make_model, write_version

from mnist_client.cli import main

TOKEN = "cli-token"


@pytest.fixture
def server(tmp_path: Path, start: Callable[..., ServerThread]) -> ServerThread:
    repo = tmp_path / "models"
    for v in (1, 2):
        write_version(repo, "mnist", v, make_model(seed=v))
    return start(repo, admin_enabled=True, admin_token=TOKEN, rescan_interval_s=0)


def cli(server: ServerThread, *argv: str) -> int:
    return main(["--target", server.target, *argv])


def current(server: ServerThread) -> int:
    return server.run(lambda: server.running.registry.resolve().version)


def test_operator_loop(
    server: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_ADMIN_TOKEN", TOKEN)
    repo = server.settings.model_dir
    write_version(repo, "mnist", 3, make_model(seed=3))
    assert cli(server, "rescan") == 0
    assert "mnist  current 3  policy latest" in capsys.readouterr().out
    assert current(server) == 3

    assert cli(server, "set-current", "mnist", "2") == 0
    out = capsys.readouterr().out
    assert "current 2 (pinned by admin)" in out
    assert current(server) == 2

    assert cli(server, "set-label", "mnist", "canary", "3") == 0
    assert "labels canary=3" in capsys.readouterr().out
    assert cli(server, "--json", "set-current", "mnist", "0") == 0
    (status,) = json.loads(capsys.readouterr().out)
    assert status["currentVersion"] == "3"
    assert current(server) == 3

    assert cli(server, "load", "mnist", "1") == 0
    assert "version 1  AVAILABLE" in capsys.readouterr().out
    assert cli(server, "unload", "mnist", "1") == 0
    assert "version 1  UNLOADED  (admin_unloaded" in capsys.readouterr().out

    # Roll back by deleting the newest version: the label must move first.
    assert cli(server, "set-label", "mnist", "canary", "0") == 0
    shutil.rmtree(repo / "mnist" / "3")
    assert cli(server, "rescan") == 0
    assert "current 2" in capsys.readouterr().out
    assert current(server) == 2


def test_errors_are_one_line(
    server: ServerThread, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MNIST_ADMIN_TOKEN", raising=False)
    assert cli(server, "rescan") == 1
    assert "need --admin-token or MNIST_ADMIN_TOKEN" in capsys.readouterr().err
    assert cli(server, "rescan", "--admin-token", "nope") == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err
    assert len(err.strip().splitlines()) == 1
    assert cli(server, "set-current", "mnist", "7", "--admin-token", TOKEN) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert current(server) == 2
