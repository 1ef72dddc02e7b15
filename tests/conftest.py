"""Shared fixtures: a temp model repository with small real models and a real gRPC server.

The server runs `service.server.start_server` on its own event loop in a background thread,
listening on 127.0.0.1 port 0; tests talk to it with real channels and stubs. Models are
built with `service.model.build_model` + `save_model` (tiny random MLPs, fast to load), and
every server gets a fresh Prometheus CollectorRegistry.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.metrics import Metrics
from service.model import INPUT_SIZE, NUM_CLASSES, Model, build_model, save_model
from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc
from service.server import RunningServer, start_server

T = TypeVar("T")
# Servers the tests start as subprocesses inherit this: no HTTP port unless a test asks for one
# (the default, 8000, would collide between tests and with anything else on the machine).
os.environ.setdefault("MNIST_HTTP_PORT", "0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def make_model(seed: int = 0, hidden: int = 32, test_accuracy: float = 0.5) -> Model:
    """A small random MLP with complete metadata; different seeds give different answers."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0, 0.1, (INPUT_SIZE, hidden)).astype(np.float32)
    w1 = rng.normal(0, 0.5, (hidden, NUM_CLASSES)).astype(np.float32)
    metadata = {
        "cost": "cross_entropy",
        "input": {"shape": [28, 28], "scale": "pixels / 255"},
        "labels": [str(i) for i in range(NUM_CLASSES)],
        "training": {"seed": seed},
        "data": {"name": "synthetic"},
        "metrics": {"test_accuracy": test_accuracy, "nested": {"loss": 0.25}},
        "created_at": "2026-01-01T00:00:00Z",
        "trainer_version": "test",
    }
    probes = rng.random((4, INPUT_SIZE), dtype=np.float32)
    return build_model(
        [w0, w1], [np.zeros(hidden), np.zeros(NUM_CLASSES)], ["relu"], "softmax", metadata, probes
    )


def write_version(repo: Path, name: str, version: int, model: Model) -> Path:
    """Publish like the trainer does: write a hidden temp dir, then rename it into place."""
    tmp = repo / name / f".tmp-{version}"
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    target = repo / name / str(version)
    tmp.rename(target)
    return target


def test_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server: loopback, port 0, no metrics HTTP port, fast rescans."""
    base = Settings(
        model_dir=model_dir, host="127.0.0.1", port=0, metrics_enabled=False, http_port=0,
        rescan_interval_s=0.1, grace_period_s=2.0,
    )
    return replace(base, **overrides)


class ServerThread:
    """A real server on its own event loop in a daemon thread."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(settings, metrics=metrics))
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run a plain function on the server's loop (to touch loop-owned state safely)."""

        async def wrapper() -> T:
            return fn()

        return self.call(wrapper(), timeout)

    def stop(self, grace_s: float = 1.0) -> None:
        try:
            self.call(self.running.stop(grace_s))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


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
def server(model_repo: Path, start: Callable[..., ServerThread]) -> ServerThread:
    return start(model_repo)


@pytest.fixture
def stub(server: ServerThread) -> Iterator[pb_grpc.ClassifierStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.ClassifierStub(channel)


def uint8_request(images: np.ndarray, **fields: Any) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        pixels=np.ascontiguousarray(images, dtype=np.uint8).tobytes(),
        encoding=pb.ENCODING_UINT8, **fields,
    )


def float_request(x: np.ndarray, **fields: Any) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        pixels=np.ascontiguousarray(x, dtype="<f4").tobytes(),
        encoding=pb.ENCODING_FLOAT32_LE, **fields,
    )


def probabilities(response: pb.ClassifyResponse) -> np.ndarray:
    return np.array([list(p.probabilities) for p in response.predictions], dtype=np.float32)


def skip_or_fail(message: str) -> None:
    """Missing optional inputs skip locally but fail in CI, where nothing may skip."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: nothing may skip)")
    pytest.skip(message)
