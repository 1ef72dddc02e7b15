"""A real Docker engine for tests/test_docker_engine.py: started, fed its images, driven, stopped.

scripts/docker-engine.sh does the engine's life and the images no registry gives here (a
Debian-made base under the tag the Dockerfile names, nginx and Prometheus stand-ins under the
tags compose pins); this module builds the project image from the Dockerfile, runs compose on
the repository's own file under a project name and free ports of its own, and reads what the
engine reports. The docker CLI is the one of the engine's package (Debian docker.io), with the
compose plugin from .tools/docker.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.deploy import COMPOSE_FILE, DOCKER_CONFIG, ROOT
from support.procs import free_port

ENGINE_SCRIPT = ROOT / "scripts" / "docker-engine.sh"
DOCKER = "/usr/bin/docker"
ADMIN_TOKEN = "engine-test-token"


class CommandFailed(AssertionError):
    pass


def run(argv: list[str], env: dict[str, str], timeout_s: float) -> str:
    """Run a command to completion; its output, or an assertion naming it with its output."""
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} -> {done.returncode}\n{done.stdout[-3000:]}"
                            f"\n{done.stderr[-3000:]}")
    return done.stdout


def engine_unavailable() -> str | None:
    """Why no engine can run on this machine (no root, no dockerd, no overlay...), or None."""
    if not ENGINE_SCRIPT.exists() or shutil.which("bash") is None:
        return "scripts/docker-engine.sh or bash missing"
    done = subprocess.run(["bash", str(ENGINE_SCRIPT), "check"], capture_output=True, text=True,
                          timeout=60, check=False)
    return None if done.returncode == 0 else (done.stderr.strip() or "check failed")


class Engine:
    """A dockerd of our own: its socket under `run_dir`, stopped by `close`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{run_dir}/docker.sock",
            "DOCKER_CONFIG": str(DOCKER_CONFIG),
            "DOCKER_BUILDKIT": "0",
        }

    def script(self, command: str, timeout_s: float) -> str:
        return run(["bash", str(ENGINE_SCRIPT), command, str(self.run_dir)], self.env, timeout_s)

    def docker(self, *args: str, timeout_s: float = 120) -> str:
        return run([DOCKER, *args], self.env, timeout_s)

    def logs(self, container: str) -> str:
        """A container's output, both streams (the server logs to stderr)."""
        done = subprocess.run([DOCKER, "logs", container], env=self.env, text=True, timeout=60,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        return done.stdout

    def inspect(self, ref: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(self.docker("inspect", ref))
        return found[0]


@contextmanager
def running_engine() -> Iterator[Engine]:
    """Start the engine, make its images, build ours; stop it and clean up whatever happens."""
    run_dir = Path(tempfile.mkdtemp(prefix="mdk-", dir="/tmp"))  # short: socket paths
    engine = Engine(run_dir)
    try:
        engine.script("start", timeout_s=960)
        engine.script("images", timeout_s=600)
        tag = compose_model()["services"]["server"]["image"]
        engine.docker("build", "--network", "host", "-t", tag, str(ROOT), timeout_s=600)
        yield engine
    finally:
        try:
            engine.script("stop", timeout_s=120)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


def compose_model() -> dict[str, Any]:
    model: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return model


class Stack:
    """The repository's compose file as a project of its own, on free loopback ports."""

    SERVICES = ("server", "lb", "prometheus")  # grafana: no image reachable (docs/deployment.md)

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.project = f"mnist-engine-test-{os.getpid()}"
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.prometheus_port = free_port()
        self.env = {
            **engine.env,
            "MNIST_GRPC_BIND": "127.0.0.1",
            "MNIST_GRPC_PORT": str(self.grpc_port),
            "MNIST_HTTP_BIND": "127.0.0.1",
            "MNIST_HTTP_PORT": str(self.http_port),
            "PROMETHEUS_PORT": str(self.prometheus_port),
            "GRAFANA_PORT": str(free_port()),
            "MNIST_ADMIN_ENABLED": "true",
            "MNIST_ADMIN_TOKEN": ADMIN_TOKEN,
        }

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def compose(self, *args: str, timeout_s: float = 180) -> str:
        return run([DOCKER, "compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args],
                   self.env, timeout_s)

    def up(self, *args: str) -> None:
        """`up -d --wait` on the images already there: nothing is built or pulled by compose."""
        self.compose("up", "-d", "--wait", "--no-build", "--pull", "never", *args,
                     *self.SERVICES)

    def containers(self, service: str) -> list[str]:
        return sorted(self.compose("ps", "-q", service).split())

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def prometheus(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.prometheus_port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> dict[str, float]:
        """An instant query's vector as {instance: value}."""
        data = self.prometheus("/api/v1/query", query=promql)
        return {r["metric"].get("instance", ""): float(r["value"][1]) for r in data["result"]}

    def mnist_targets(self) -> list[dict[str, Any]]:
        data = self.prometheus("/api/v1/targets", state="active")
        return [t for t in data["activeTargets"] if t["labels"]["job"] == "mnist"]

    def logs(self) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", "60", timeout_s=60)
        except CommandFailed as e:
            return str(e)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str,
              explain: Callable[[], str] = lambda: "") -> float:
    """Poll until true; the seconds it took, or an assertion saying what never happened."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{explain()}")


def engine_or_skip() -> None:
    """Say plainly why there is no engine here; in CI that is a failure, not a skip."""
    reason = engine_unavailable()
    if reason is None:
        return
    message = f"no Docker engine can run on this machine: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
