"""The compose stack's wiring, run natively: server and trainer started with exactly the command,
entrypoint and environment docker-compose.yml gives them, the trainer publishes a new version
into the shared models volume, and the running server hot-swaps to it.

Only what cannot hold outside a container is substituted, and only here: named volumes become
temp directories (the models volume seeded with what the image copies into /models), published
and listening addresses become 127.0.0.1 with free ports, and the trainer's default command
(`--download`, which needs the internet) becomes a small local run — the same way a user
overrides it with `docker compose run --rm trainer <args>`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from support.deploy import ROOT, RestClient, docker_compose
from support.procs import free_port
from support.servers import make_model, uint8_request, write_version
from support.synthetic import synthetic_mnist

from service.pb.mnist.v1 import classifier_pb2 as pb
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent  # the image puts its venv's bin first on PATH the same way


class Stack:
    """The compose model plus the native stand-ins for its volumes and ports."""

    def __init__(self, compose: dict[str, Any], tmp: Path) -> None:
        self.compose = compose
        self.volumes = {name: tmp / "volumes" / name for name in compose["volumes"]}
        for path in self.volumes.values():
            path.mkdir(parents=True)
        self.ports: dict[str, str] = {}

    def mounts(self, service: str) -> dict[str, Path]:
        """Container path -> host directory, for the service's named volumes."""
        out = {}
        for v in self.compose["services"][service].get("volumes", []):
            assert v["type"] == "volume", f"{service}: only named volumes run natively: {v}"
            out[v["target"]] = self.volumes[v["source"]]
        return out

    def path(self, service: str, value: str) -> str:
        for target, host in self.mounts(service).items():
            if value == target or value.startswith(target + "/"):
                return str(host) + value[len(target):]
        return value

    def environment(self, service: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_")}
        for key, value in self.compose["services"][service].get("environment", {}).items():
            value = self.path(service, str(value))
            if key.endswith("_HOST") and value == "0.0.0.0":
                value = "127.0.0.1"  # tests listen on loopback only
            if key.endswith("_PORT"):
                value = self.ports.setdefault(key, str(free_port()))
            env[key] = value
        return env

    def argv(self, service: str, *, command: list[str] | None = None) -> list[str]:
        spec = self.compose["services"][service]
        args = [*(spec.get("entrypoint") or []), *(command or spec.get("command") or [])]
        assert args, f"{service}: no command"
        exe = BIN / args[0]
        assert exe.exists(), f"{service}: {args[0]} is not an installed console script"
        return [str(exe), *(self.path(service, a) for a in args[1:])]


def wait_for(predicate: Any, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")


def test_trainer_publishes_into_the_volume_and_the_server_hot_swaps(tmp_path: Path) -> None:
    result = docker_compose("--profile", "train", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    stack = Stack(json.loads(result.stdout), tmp_path)

    # The image's `COPY models /models` seeds the volume on first mount.
    models = stack.mounts("server")["/models"]
    default = ROOT / "models" / "mnist" / "1"
    if default.is_dir():
        shutil.copytree(default, models / "mnist" / "1")
    else:  # the trainer's committed default model has not landed yet
        write_version(models, "mnist", 1, make_model(seed=3))
    data = stack.mounts("trainer")["/data"]
    synthetic_mnist(data)

    server_env = stack.environment("server")
    server_log = tmp_path / "server.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen(
            stack.argv("server"), env=server_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        probe = stack.compose["services"]["server"]["healthcheck"]["test"]
        assert probe[0] == "CMD"
        probe_argv = [sys.executable if probe[1] == "python" else probe[1], *probe[2:]]

        def healthy() -> bool:
            assert server.poll() is None, server_log.read_text()
            check = subprocess.run(probe_argv, env=server_env, capture_output=True, timeout=30,
                                   check=False)
            return check.returncode == 0

        wait_for(healthy, 60, "the compose healthcheck to pass", server_log)

        channel = grpc.insecure_channel(f"127.0.0.1:{server_env['MNIST_PORT']}")
        stub = pb_grpc.ClassifierStub(channel)
        images = np.zeros((2, 28, 28), dtype=np.uint8)
        assert stub.Classify(uint8_request(images), timeout=10).version == 1
        # The KServe v2 REST port compose exposes to the balancer answers as well.
        http_port = int(server_env["MNIST_HTTP_PORT"])
        assert str(stack.compose["services"]["server"]["environment"]["MNIST_HTTP_PORT"]) in {
            str(p) for p in stack.compose["services"]["server"]["expose"]}
        with RestClient(http_port, retry=False) as rest:
            ready = rest.request("GET", "/v2/health/ready")
            assert (ready.status, ready.json()) == (200, {"ready": True})
            assert rest.infer(images).json()["model_version"] == "1"

        # `docker compose run --rm trainer --epochs 3 ...`: the user's args replace `command`.
        user_args = ["--epochs", "3", "--hidden", "32", "--seed", "1", "--quiet", "--json"]
        trainer_log = tmp_path / "trainer.log"
        trained = subprocess.run(
            stack.argv("trainer", command=user_args), env=stack.environment("trainer"),
            capture_output=True, text=True, timeout=240, check=False,
        )
        trainer_log.write_text(trained.stdout + trained.stderr)
        assert trained.returncode == 0, trainer_log.read_text()
        summary = json.loads(trained.stdout.strip().splitlines()[-1])
        assert summary["version"] == 2
        assert Path(summary["path"]) == models / "mnist" / "2"

        def swapped() -> bool:
            info = stub.GetModelInfo(pb.GetModelInfoRequest(model="mnist"), timeout=10)
            return bool(info.current_version == 2)

        wait_for(swapped, 30, "the server to hot-swap to version 2", server_log)
        assert stub.Classify(uint8_request(images), timeout=10).version == 2
        channel.close()
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
            raise
    assert code == 0, f"server did not stop cleanly on SIGTERM:\n{server_log.read_text()}"
