"""The compose stack on a real Docker engine: the image built from the Dockerfile, the repository's
docker-compose.yml brought up, scaled, retrained, rolled back, killed and stopped.

One engine per module (tests/support/docker.py, scripts/docker-engine.sh): Debian's dockerd
started by hand with its own roots and socket, without iptables, NAT or ip_forward changes,
stopped at the end whatever happened. The tests run in file order on one stack, each leaving it
in the state the next one starts from, as an operator would walk through docs/deployment.md.
What cannot be pulled here is made locally (scripts/docker-engine.sh: the base image, nginx and
Prometheus stand-ins under the tags compose pins); Grafana has no image here and is left out.
Where no engine can run (no root, no kernel support) the module says so and skips, and fails
in CI (CI=true).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import pytest
import yaml
from support.deploy import RestClient
from support.docker import (
    ADMIN_TOKEN,
    Engine,
    Stack,
    compose_model,
    engine_or_skip,
    running_engine,
    wait_for,
)
from support.synthetic import synthetic_mnist

from mnist_client.client import ClassifierClient, ClientError
from service.fatal import FATAL_EXIT_CODE

# The first test also waits for the engine (and for another run holding it, up to 15 min).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parent.parent
K8S_DEPLOYMENT = ROOT / "deploy" / "k8s" / "deployment.yaml"
IMAGES = np.zeros((2, 28, 28), dtype=np.uint8)
# MNIST test images 0..9 and their labels (docs/examples/make_examples.py), which the
# committed model classifies right (README, "Over HTTP with curl").
DIGITS = np.load(ROOT / "docs" / "examples" / "first-10-test-images.npy")
DIGIT_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine_or_skip()
    with running_engine() as started:
        yield started


@pytest.fixture(scope="module")
def stack(engine: Engine) -> Iterator[Stack]:
    stack = Stack(engine)
    try:
        stack.up()
        yield stack
    finally:
        try:
            stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "15")
        except AssertionError as e:  # the engine's stop removes what is left
            print(f"compose down failed: {e}")


def versions_answered(stack: Stack, n: int) -> list[int]:
    """The versions of `n` consecutive RPCs through the balancer (round robin over replicas)."""
    with ClassifierClient(stack.target, timeout_s=10) as client:
        return [client.classify(IMAGES).version for _ in range(n)]


def server_process_status(engine: Engine, container: str) -> dict[str, str]:
    """/proc/<pid>/status of the server process, as the kernel sees it (not as Docker says)."""
    init_pid = engine.inspect(container)["State"]["Pid"]  # docker-init, as compose's init: true
    children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
    assert len(children) == 1, f"expected one server process under docker-init, got {children}"
    lines = Path(f"/proc/{children[0]}/status").read_text().splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    status = {k: v.strip() for k, v in status.items()}
    status["Pid"] = children[0]
    return status


# --- the image and one replica


def test_server_runs_with_the_pod_security_context_of_the_k8s_manifests(
    engine: Engine, stack: Stack
) -> None:
    pod = yaml.safe_load(K8S_DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    container_spec = next(c for c in pod["containers"] if c["name"] == "server")
    pod_ctx, ctx = pod["securityContext"], container_spec["securityContext"]
    (server,) = stack.containers("server")
    info = engine.inspect(server)
    host = info["HostConfig"]

    assert pod_ctx["runAsNonRoot"] is True
    assert info["Config"]["User"] == f"{pod_ctx['runAsUser']}:{pod_ctx['runAsGroup']}"
    assert host["ReadonlyRootfs"] is ctx["readOnlyRootFilesystem"] is True
    assert host["CapDrop"] == ctx["capabilities"]["drop"] == ["ALL"]
    assert host["CapAdd"] in (None, [])
    assert ctx["allowPrivilegeEscalation"] is False
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any(o.startswith("seccomp") for o in host["SecurityOpt"])  # Docker's default
    k8s_mounts = {m["mountPath"] for m in container_spec["volumeMounts"]}
    assert "/tmp" in k8s_mounts
    assert "/tmp" in host["Tmpfs"]

    # What the kernel enforces on the running server process.
    status = server_process_status(engine, server)
    assert status["Uid"].split()[:2] == [str(pod_ctx["runAsUser"])] * 2
    assert status["Gid"].split()[:2] == [str(pod_ctx["runAsGroup"])] * 2
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # a filter is loaded
    with pytest.raises(AssertionError, match="Read-only file system"):
        engine.docker("exec", server, "sh", "-c", "echo x > /opt/venv/written")
    engine.docker("exec", server, "sh", "-c", "echo x > /tmp/written")
    assert info["State"]["Health"]["Status"] == "healthy"


def test_fresh_models_volume_is_seeded_from_the_image_and_served(
    engine: Engine, stack: Stack
) -> None:
    volume = stack.volume("models")
    # Checksums of what the image copied into the fresh volume, against the committed model.
    listing = engine.docker(
        "run", "--rm", "--network", "none", "-v", f"{volume}:/m:ro", "--entrypoint", "sh",
        engine.inspect(stack.containers("server")[0])["Config"]["Image"],
        "-c", "cd /m && find . -type f | sort | xargs sha256sum && stat -c '%u:%g %n' mnist/1",
    ).splitlines()
    committed = sorted(p for p in (ROOT / "models").rglob("*") if p.is_file())
    expected = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(ROOT / 'models')}"
                for p in committed]
    assert listing[:-1] == expected
    assert listing[-1] == "10001:10001 mnist/1"  # the trainer (uid 10001) can publish beside it
    assert versions_answered(stack, 3) == [1, 1, 1]


# --- three replicas


def test_three_replicas_share_the_load_and_prometheus_scrapes_each(stack: Stack) -> None:
    stack.up("--scale", "server=3", "--no-recreate")
    assert len(stack.containers("server")) == 3

    def three_up() -> bool:
        targets = stack.mnist_targets()
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    wait_for(three_up, 60, "Prometheus to scrape three replicas",
             lambda: json.dumps(stack.mnist_targets(), indent=1))
    # gRPC on lb's 50051, and the KServe v2 REST API on its 8000 (published on MNIST_HTTP_PORT):
    # readiness, then real digits classified right, one request after the other on one
    # kept-alive connection. Each replica must have counted its share of both.
    sent = {"Classify": 90, "REST ModelInfer": 60}
    promql = {m: f'sum by (instance) (mnist_requests_total{{method="{m}"}})' for m in sent}
    before = {m: stack.query(q) for m, q in promql.items()}
    assert versions_answered(stack, sent["Classify"]) == [1] * sent["Classify"]
    with RestClient(stack.http_port, retry=False) as client:
        ready = client.request("GET", "/v2/health/ready")
        assert (ready.status, ready.json()) == (200, {"ready": True})
        for _ in range(sent["REST ModelInfer"]):
            assert client.classes(DIGITS) == DIGIT_LABELS

    per_replica: dict[str, dict[str, float]] = {}

    def all_counted() -> bool:
        nonlocal per_replica
        for method, query in promql.items():
            after = stack.query(query)
            per_replica[method] = {i: v - before[method].get(i, 0.0) for i, v in after.items()}
        return all(sum(per_replica[m].values()) >= n for m, n in sent.items())

    wait_for(all_counted, 30, "Prometheus to count every request", lambda: str(per_replica))
    for method, n in sent.items():
        counts = per_replica[method]
        assert len(counts) == 3, (method, counts)
        assert sum(counts.values()) == n, (method, counts)
        assert min(counts.values()) >= n / 3 / 2, (method, counts)  # round robin, roughly fair


def test_trainer_publishes_into_the_volume_and_every_replica_serves_it(
    engine: Engine, stack: Stack, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    synthetic_mnist(data)
    data.chmod(0o755)
    out = stack.compose(
        "run", "--rm", "--no-deps", "-v", f"{data}:/data:ro", "trainer",
        "--epochs", "3", "--hidden", "32", "--seed", "1", "--quiet", "--json", timeout_s=300,
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["version"] == 2
    assert summary["path"] == "/models/mnist/2"

    # Trained on synthetic digits, version 2 is far below the committed model's quality gate
    # (models/mnist/gate, docs/versions.md): every replica loads it and REJECTS it, version 1
    # keeps serving. An operator who wants it anyway promotes it on each replica.
    rejected = 'sum by (instance) (mnist_gate_rejected_versions_total{model="mnist"})'
    wait_for(lambda: len([v for v in stack.query(rejected).values() if v >= 1]) == 3, 30,
             "every replica to judge version 2 against its gate", stack.logs)
    assert set(versions_answered(stack, 9)) == {1}
    for server in stack.containers("server"):
        engine.docker("exec", "-e", f"MNIST_ADMIN_TOKEN={ADMIN_TOKEN}", server, "mnist-client",
                      "--target", "127.0.0.1:50051", "promote", "mnist", "2", "--force")

    wait_for(lambda: set(versions_answered(stack, 9)) == {2}, 20,
             "every replica to answer with version 2", stack.logs)
    wait_for(lambda: set(stack.query('mnist_model_current_version{model="mnist"}').values())
             == {2.0}, 20, "Prometheus to see version 2 current on every replica")
    assert len(stack.query('mnist_model_current_version{model="mnist"}')) == 3


def test_rollback_through_each_replicas_admin_api_reaches_all(engine: Engine, stack: Stack) -> None:
    for server in stack.containers("server"):
        engine.docker("exec", "-e", f"MNIST_ADMIN_TOKEN={ADMIN_TOKEN}", server,
                      "mnist-client", "--target", "127.0.0.1:50051", "set-current", "mnist", "1")
    assert set(versions_answered(stack, 9)) == {1}
    wait_for(lambda: set(stack.query('mnist_model_current_version{model="mnist"}').values())
             == {1.0}, 20, "Prometheus to see version 1 current on every replica")


# --- scale down under load


class Clients:
    """`clients` threads running `_run` for the length of a with-block (closed-loop load)."""

    clients: int
    stop: threading.Event

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.threads = [threading.Thread(target=self._run) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


@dataclass
class Load(Clients):
    """Closed-loop clients through the balancer: the client library with its default retry
    policy (mnist_client/client.py, the one docs/deployment.md asks clients to use)."""

    stack: Stack
    clients: int = 3
    # Paced, not flat out: the point is what a replica's removal costs an RPC, not how slow a
    # saturated 2-core machine gets (every replica, nginx and these clients share it).
    pause_s: float = 0.01
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        with ClassifierClient(self.stack.target, timeout_s=10) as client:  # default retry
            for _ in range(20_000):  # bounded whatever happens to `stop`
                if self.stop.is_set():
                    return
                start = time.monotonic()
                try:
                    client.classify(IMAGES)
                except ClientError as e:
                    self.errors.append(str(e))
                self.latencies_s.append(time.monotonic() - start)
                self.stop.wait(self.pause_s)


@dataclass
class RestLoad(Clients):
    """Closed-loop REST clients through the balancer's port 8000, each on one kept-alive
    connection, with the client retry docs/deployment.md asks for (deploy_support.RestClient:
    a 502/503 from the balancer or a connection closed under a request is sent again)."""

    stack: Stack
    clients: int = 1  # beside Load's 3: the 2-core machine also runs every replica and nginx
    pause_s: float = 0.01
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        with RestClient(self.stack.http_port) as client:
            for _ in range(20_000):  # bounded whatever happens to `stop`
                if self.stop.is_set():
                    break
                start = time.monotonic()
                try:
                    classes = client.classes(DIGITS)
                    if classes != DIGIT_LABELS:
                        self.errors.append(f"wrong classes {classes}")
                except (OSError, AssertionError) as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                self.latencies_s.append(time.monotonic() - start)
                self.stop.wait(self.pause_s)
            self.retried.extend(client.retried)


def slow_balancer_lines(stack: Stack, threshold_s: float) -> list[str]:
    """nginx's access log lines (deploy/nginx/nginx.conf `grpc` format) of RPCs that took long:
    which replicas each was tried on and how long each try took."""
    lines = stack.compose("logs", "--no-color", "lb", timeout_s=60).splitlines()
    slow = [line for line in lines
            if (m := re.search(r" rt=([0-9.]+)", line)) and float(m.group(1)) >= threshold_s]
    return slow[-20:]


def test_scale_down_under_load_loses_no_request(stack: Stack) -> None:
    """gRPC and REST load at once, across a scale-down from 3 replicas to 1."""
    with Load(stack) as load, RestLoad(stack) as rest:
        time.sleep(1)
        started, rest_started = len(load.latencies_s), len(rest.latencies_s)
        stack.up("--scale", "server=1", "--no-recreate")
        # Long enough for the balancer to try the removed replicas' addresses from its resolver
        # cache after their containers are gone, and again after fail_timeout: with
        # `valid=5s` and `grpc_connect_timeout 1s` this saw RPCs of 1.0 s in two of four runs.
        time.sleep(8)
    print(f"across the scale-down: {len(load.latencies_s)} RPCs, slowest "
          f"{max(load.latencies_s, default=0):.3f} s; {len(rest.latencies_s)} REST requests, "
          f"{len(rest.retried)} client retries, slowest {max(rest.latencies_s, default=0):.3f} s")
    assert len(stack.containers("server")) == 1
    assert started > 0, "the load did not start"
    assert len(load.latencies_s) > started + 100, "the load did not run across the scale-down"
    assert load.errors == []
    slowest = max(load.latencies_s)
    assert slowest < 0.5, (
        f"slowest RPC took {slowest:.3f} s across the scale-down; the balancer's slow ones:\n"
        + "\n".join(slow_balancer_lines(stack, 0.2))
    )
    assert rest_started > 0, "the REST load did not start"
    assert len(rest.latencies_s) > rest_started + 50, "the REST load did not run across it"
    assert rest.errors == [], rest.errors[:5]
    # What the client had to retry: only the balancer's 502 for a POST a stopping replica
    # closed under it (nginx does not replay a sent POST) or a connection reset.
    assert all(r.startswith(("502", "Remote", "Connection")) for r in rest.retried), rest.retried
    rest_slowest = max(rest.latencies_s)
    assert rest_slowest < 0.5, (
        f"slowest REST request took {rest_slowest:.3f} s across the scale-down; the balancer's "
        "slow ones:\n" + "\n".join(slow_balancer_lines(stack, 0.2)))


# --- failures


def test_killed_server_process_is_restarted_by_the_restart_policy(
    engine: Engine, stack: Stack
) -> None:
    (server,) = stack.containers("server")
    restarts = engine.inspect(server)["RestartCount"]
    pid = int(server_process_status(engine, server)["Pid"])
    os.kill(pid, signal.SIGKILL)  # the process inside the container, not the container

    def healthy_again() -> bool:
        state = engine.inspect(server)
        return bool(state["RestartCount"] > restarts and state["State"]["Running"]
                    and state["State"]["Health"]["Status"] == "healthy")

    wait_for(healthy_again, 60, "the server container to restart and turn healthy", stack.logs)
    assert server_process_status(engine, server)["Pid"] != str(pid)
    # The forced promotion and the rollback pin were in memory: the restarted server judges
    # version 2 against the gate again, rejects it, and serves version 1.
    assert versions_answered(stack, 3) == [1, 1, 1]


def test_server_whose_grpc_front_end_died_exits_non_zero_and_is_restarted(
    engine: Engine, stack: Stack
) -> None:
    """The image's server with the test-only fault injection (docs/serving.md), run with the
    compose server's restart policy, init and hardening: SIGUSR2 kills its gRPC front end behind
    its back; the process must exit non-zero (service/fatal.py) and Docker must restart it."""
    spec = compose_model()["services"]["server"]
    assert spec["restart"] == "unless-stopped"
    assert spec["init"] is True
    name = f"{stack.project}-fault"
    engine.docker(
        "run", "-d", "--name", name, "--network", "none", "--init",
        "--restart", spec["restart"], "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true",
        "-e", "MNIST_FAULT_INJECTION=frontend-death", "-e", "MNIST_METRICS_ENABLED=false",
        spec["image"], *spec["command"],
    )
    try:
        wait_for(lambda: "event=fault_injection_armed" in engine.logs(name),
                 60, "the server to arm the fault injection", lambda: engine.logs(name))
        since = str(int(time.time()) - 1)
        pid = int(server_process_status(engine, name)["Pid"])
        os.kill(pid, signal.SIGUSR2)

        def restarted() -> bool:
            state = engine.inspect(name)
            return bool(state["RestartCount"] >= 1 and state["State"]["Running"])

        wait_for(restarted, 60, "the container to be restarted",
                 lambda: engine.logs(name))
        until = str(int(time.time()) + 1)
        died = engine.docker("events", "--since", since, "--until", until, "--filter",
                             f"container={name}", "--filter", "event=die",
                             "--format", "{{.Actor.Attributes.exitCode}}").split()
        assert died, "no die event"
        assert died[0] not in ("0", "137"), f"exit code {died[0]}: not the server's own exit"
        assert died[0] == str(FATAL_EXIT_CODE)
        assert "event=fatal" in engine.logs(name)
    finally:
        engine.docker("rm", "-f", name)


def test_sigterm_drains_and_the_server_exits_zero(engine: Engine, stack: Stack) -> None:
    (server,) = stack.containers("server")
    with Load(stack, clients=2) as load:
        time.sleep(1)
        engine.docker("stop", "--time", "15", server, timeout_s=60)
    state = engine.inspect(server)["State"]
    logs = engine.logs(server)[-3000:]
    assert state["ExitCode"] == 0, f"{state}\n{logs}"
    assert not state["OOMKilled"]
    assert load.latencies_s, "no RPC ran before the stop"
    engine.docker("start", server)
    stack.up()
