"""Shared fixtures: a temp model repository with small real models and a real gRPC server
(tests/support/servers.py has the server thread and the builders)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from support.servers import ServerThread, make_model, test_settings, write_version
from support.triton import triton_python  # noqa: F401  (a fixture for the Triton client tests)

from service.metrics import Metrics
from service.model import Model
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """A repository with model 'mnist' version 1 (seed 1)."""
    repo = tmp_path / "models"
    repo.mkdir()
    write_version(repo, "mnist", 1, make_model(seed=1))
    return repo


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Factory: start(model_dir, **setting_overrides) -> ServerThread; all stopped at teardown."""
    servers: list[ServerThread] = []

    def factory(model_dir: Path, **overrides: Any) -> ServerThread:
        server = ServerThread(test_settings(model_dir, **overrides), Metrics(CollectorRegistry()))
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def models() -> dict[int, Model]:
    """Two versions of 'mnist' that answer differently (test modules may override)."""
    return {1: make_model(seed=1), 2: make_model(seed=2)}


@pytest.fixture
def repo(tmp_path: Path, models: dict[int, Model]) -> Path:
    """A repository holding `models` as 'mnist' versions."""
    repo = tmp_path / "models"
    for v, m in models.items():
        write_version(repo, "mnist", v, m)
    return repo


@pytest.fixture
def server(model_repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start(model_repo)


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


