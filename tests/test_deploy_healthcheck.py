"""service/healthcheck.py, the container HEALTHCHECK, against a real gRPC health service.

Run as the container runs it (`python -m service.healthcheck`, a subprocess with MNIST_*
variables), so the exit code Docker sees is what is tested.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.healthcheck import default_target

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServer:
    """A real grpc.aio server with only the standard health service, on 127.0.0.1:0."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = 0

        async def start() -> None:  # aio objects belong to the loop that creates them
            self.servicer = health.aio.HealthServicer()
            self.server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()

        self.run(start())

    def run(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)  # type: ignore[arg-type]

    def set(self, status: int) -> None:
        self.run(self.servicer.set("", status))

    def close(self) -> None:
        self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = HealthServer()
    try:
        yield server
    finally:
        server.close()


def run_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
    return subprocess.run(
        [sys.executable, "-m", "service.healthcheck", "--timeout-s", "3", *args],
        env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )


def test_exit_code_follows_the_serving_status(health_server: HealthServer) -> None:
    env = {"MNIST_HOST": "0.0.0.0", "MNIST_PORT": str(health_server.port)}
    health_server.set(SERVING)
    ok = run_check(env)
    assert ok.returncode == 0, ok.stderr
    assert f"127.0.0.1:{health_server.port}: SERVING" in ok.stdout

    health_server.set(NOT_SERVING)  # e.g. no model loaded yet, or draining after SIGTERM
    draining = run_check(env)
    assert draining.returncode == 1
    assert "NOT_SERVING" in draining.stdout


def test_no_server_is_unhealthy_and_says_why() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_check({}, "--target", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_bad_environment_names_the_variable() -> None:
    result = run_check({"MNIST_PORT": "fifty"})
    assert result.returncode == 2
    assert "MNIST_PORT='fifty'" in result.stderr


def test_target_follows_the_server_environment() -> None:
    assert default_target({}) == "127.0.0.1:50051"
    assert default_target({"MNIST_HOST": "[::]", "MNIST_PORT": "7000"}) == "127.0.0.1:7000"
    assert default_target({"MNIST_HOST": "10.1.2.3", "MNIST_PORT": "7000"}) == "10.1.2.3:7000"
