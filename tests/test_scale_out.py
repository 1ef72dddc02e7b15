"""`docker compose up --scale server=3`, natively: the real nginx of deploy/nginx in front of three
real `python -m service` processes on 127.0.0.1, driven through the balancer.

Proves, for gRPC (port 50051 of the balancer) and for the KServe v2 REST API (port 8000), what
the compose stack promises: requests (not connections) are spread so each replica gets a fair
share, and a replica stopped with SIGTERM mid-traffic drains without one lost request (with
the client retry policy docs/deployment.md gives); the balancer's own errors are KServe JSON.
Replicas are counted from their own /metrics (mnist_requests_total), not from the client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support.deploy import RestClient, nginx_command, nginx_version, render_nginx, tool
from support.procs import free_port, stop_process
from support.servers import make_model, uint8_request, write_version

from service.config import Settings
from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
REPLICAS = 3
START_TIMEOUT_S = 60.0


@dataclass
class Replica:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    http_port: int
    log: Path

    def classify_count(self, method: str = "Classify") -> float:
        """Requests of `method` this replica answered, from its own Prometheus endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "mnist_requests_total" and sample.labels.get("method") == method
        )


def wait_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, f"replica exited early:\n{log.read_text()}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"replica on {port} never became SERVING:\n{log.read_text()}")


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"nginx exited:\n{log.read_text()}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx never listened on {port}:\n{log.read_text()}")


@dataclass
class Stack:
    replicas: list[Replica]
    lb_port: int  # gRPC
    lb_log: Path
    lb_http_port: int  # KServe v2 REST


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Three replicas on one model repository and nginx in front; all stopped by PID after."""
    nginx = tool("nginx")
    repo = tmp_path / "models"
    write_version(repo, "mnist", 1, make_model(seed=1))
    replicas: list[Replica] = []
    processes: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes]] = []
    try:
        for i in range(REPLICAS):
            port, metrics_port, http_port = free_port(), free_port(), free_port()
            log = tmp_path / f"replica-{i}.log"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("MNIST_")},
                "MNIST_MODEL_DIR": str(repo),
                "MNIST_HOST": "127.0.0.1",
                "MNIST_PORT": str(port),
                "MNIST_METRICS_HOST": "127.0.0.1",
                "MNIST_METRICS_PORT": str(metrics_port),
                "MNIST_GRACE_PERIOD_S": "5",
                "MNIST_RESCAN_INTERVAL_S": "0",
                "MNIST_HTTP_PORT": str(http_port),
            }
            out = open(log, "wb")  # noqa: SIM115 - closed in finally
            logs.append(out)
            process = subprocess.Popen(
                [sys.executable, "-m", "service"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
            processes.append(process)
            replicas.append(Replica(process, port, metrics_port, http_port, log))
        for r in replicas:
            wait_serving(r.port, r.process, r.log)

        lb_port, lb_http_port = free_port(), free_port()
        conf = render_nginx(
            tmp_path / "nginx", lb_port, free_port(), [r.port for r in replicas],
            nginx_version(nginx), http_port=lb_http_port,
            http_upstream_ports=[r.http_port for r in replicas],
        )
        lb_log = tmp_path / "nginx.log"
        out = open(lb_log, "wb")  # noqa: SIM115 - closed in finally
        logs.append(out)
        lb = subprocess.Popen(nginx_command(nginx, conf), stdout=out, stderr=subprocess.STDOUT)
        processes.append(lb)
        wait_listening(lb_port, lb, lb_log)
        wait_listening(lb_http_port, lb, lb_log)
        yield Stack(replicas, lb_port, lb_log, lb_http_port)
    finally:
        for process in reversed(processes):
            stop_process(process, signal.SIGQUIT if process.args[0] == nginx else signal.SIGTERM)
        for out in logs:
            out.close()


# What docs/deployment.md tells clients to use: retry Classify when the server answered
# UNAVAILABLE, or CANCELLED without the client having cancelled. A replica that has begun its
# graceful stop refuses RPCs that reach it in the moment before nginx reads its GOAWAY with
# CANCELLED (grpc-core's answer to a call arriving after shutdown), as an HTTP 200 response that
# nginx cannot retry; Classify is a pure function, so the client retries it safely.
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "mnist.v1.Classifier", "method": "Classify"}],
        "retryPolicy": {
            "maxAttempts": 3,
            "initialBackoff": "0.01s",
            "maxBackoff": "0.1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        },
    }],
})


@dataclass
class Traffic:
    ok: int = 0
    failed: list[str] | None = None


async def drive(
    lb_port: int, total: int, concurrency: int, on_progress: object = None, retry: bool = False
) -> Traffic:
    """`total` Classify RPCs through the balancer, `concurrency` at a time, on one channel."""
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    request = uint8_request(images)
    result = Traffic(failed=[])
    next_index = 0
    options = [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{lb_port}", options=options if retry else [("grpc.enable_retries", 0)]
    ) as channel:
        stub = pb_grpc.ClassifierStub(channel)

        async def worker() -> None:
            nonlocal next_index
            while next_index < total:
                next_index += 1
                try:
                    reply = await stub.Classify(request, timeout=30)
                    assert len(reply.predictions) == 4
                    result.ok += 1
                except grpc.aio.AioRpcError as e:
                    assert result.failed is not None
                    result.failed.append(f"{e.code().name}: {e.details()}")
                if callable(on_progress):
                    on_progress(result.ok)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def test_every_replica_serves_a_fair_share(
    stack: Stack,
) -> None:
    replicas, lb_port, lb_log = stack.replicas, stack.lb_port, stack.lb_log
    total = 600
    traffic = asyncio.run(drive(lb_port, total, concurrency=8))
    assert traffic.failed == []
    assert traffic.ok == total
    counts = [r.classify_count() for r in replicas]
    assert sum(counts) == total, f"replicas counted {counts}, client sent {total}"
    shares = [c / total for c in counts]
    # Round robin gives 1/3 each; a balancer pinning the client's one HTTP/2 connection to a
    # replica would give [1, 0, 0].
    assert all(0.25 <= s <= 0.42 for s in shares), f"unfair split {shares}\n{lb_log.read_text()}"


def stop_one_mid_traffic(
    stack: Stack, *, retry: bool, total: int = 1500,
    stop_after: int = 300,
) -> tuple[Traffic, int, int]:
    """SIGTERM replica 0 after `stop_after` OK answers while 8 RPCs at a time keep flowing.

    Returns the traffic, the replica's exit code and how many RPCs it answered.
    """
    replicas, lb_port = stack.replicas, stack.lb_port
    victim, survivors = replicas[0], replicas[1:]

    def on_progress(ok: int) -> None:
        if ok == stop_after:
            victim.process.send_signal(signal.SIGTERM)

    async def run() -> tuple[Traffic, int]:
        traffic_task = asyncio.ensure_future(drive(lb_port, total, 8, on_progress, retry))
        # The victim drains and exits while the traffic keeps flowing to the others.
        code = await asyncio.to_thread(victim.process.wait, 60)
        return await traffic_task, code

    before = sum(r.classify_count() for r in survivors)
    traffic, code = asyncio.run(run())
    after = sum(r.classify_count() for r in survivors)
    return traffic, code, traffic.ok - (after - before)


def test_sigterm_mid_traffic_drains_without_losing_a_request(
    stack: Stack,
) -> None:
    lb_log = stack.lb_log
    total, stop_after = 1500, 300
    traffic, code, served_by_victim = stop_one_mid_traffic(
        stack, retry=True, total=total, stop_after=stop_after
    )
    failed = traffic.failed or []
    assert failed == [], f"{len(failed)} RPCs failed, first: {failed[:1]}\n" \
        f"{lb_log.read_text()[-4000:]}"
    assert traffic.ok == total
    assert code == 0, "the replica did not drain and exit cleanly"
    # About a third of the RPCs before the stop, and none started after it.
    assert stop_after // 6 <= served_by_victim <= stop_after // 2, served_by_victim


def test_without_client_retry_only_the_shutdown_race_fails(
    stack: Stack,
) -> None:
    """nginx itself retries refused connections; what reaches the client is only the race.

    The race: RPCs sent on a kept-alive upstream connection in the moment between the replica's
    shutdown and nginx reading its GOAWAY are refused by grpc-core with CANCELLED. At most one
    per RPC in flight at a time (bench/lb_bench.py measured 0-6 per stop with 8 in flight).
    On a loaded machine nginx's own retry can also run out of upstreams in that moment and
    answer UNAVAILABLE (seen once in CI-like runs with both cores busy). Both are the codes the
    documented client retry policy retries; anything else, or more of them, is a bug.
    """
    traffic, code, _ = stop_one_mid_traffic(stack, retry=False)
    failed = traffic.failed or []
    assert code == 0
    assert {f.split(":")[0] for f in failed} <= {"CANCELLED", "UNAVAILABLE"}, failed
    assert len(failed) <= 16, failed  # twice the RPCs in flight: a bound, not a target
    assert traffic.ok == 1500 - len(failed)


# --- the KServe v2 REST API through the balancer's port 8000

REST_METHOD = "REST ModelInfer"  # the method label REST infer requests are counted under


def test_rest_requests_are_spread_over_every_replica(stack: Stack) -> None:
    """One kept-alive client connection to nginx; each request goes to the next replica."""
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    with RestClient(stack.replicas[0].http_port, retry=False) as direct:
        expected = direct.classes(images)
    before = [r.classify_count(REST_METHOD) for r in stack.replicas]
    total = 90
    with RestClient(stack.lb_http_port, retry=False) as client:
        ready = client.request("GET", "/v2/health/ready")
        assert (ready.status, ready.json()) == (200, {"ready": True})
        for _ in range(total):
            assert client.classes(images) == expected
    counts = [r.classify_count(REST_METHOD) - b for r, b in zip(stack.replicas, before,
                                                                 strict=True)]
    assert sum(counts) == total, f"replicas counted {counts}, client sent {total}"
    assert all(0.25 <= c / total <= 0.42 for c in counts), (
        f"unfair split {counts}\n{stack.lb_log.read_text()[-3000:]}")


def test_rest_sigterm_mid_traffic_loses_nothing_with_the_client_retry(stack: Stack) -> None:
    """4 kept-alive clients through nginx; replica 0 gets SIGTERM after 100 answers. nginx
    moves what it had not sent yet; what a replica closed under a sent POST reaches the client
    as a 502, which the client's retry (deploy_support.RestClient, docs/deployment.md) sends
    again. Nothing else may fail."""
    victim = stack.replicas[0]
    images = np.random.default_rng(1).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    total, stop_after = 800, 100
    ok: list[int] = []
    errors: list[str] = []
    retried: list[str] = []
    lock = threading.Lock()
    sent = iter(range(total))

    def worker() -> None:
        with RestClient(stack.lb_http_port) as client:
            while True:
                with lock:
                    if next(sent, None) is None:
                        break
                try:
                    reply = client.infer(images)
                except OSError as e:
                    reply = None
                    error = f"{type(e).__name__}: {e}"
                with lock:
                    if reply is not None and reply.status == 200:
                        ok.append(1)
                        if len(ok) == stop_after:
                            victim.process.send_signal(signal.SIGTERM)
                    else:
                        errors.append(error if reply is None else
                                      f"{reply.status}: {reply.body[:200]!r}")
            with lock:
                retried.extend(client.retried)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    code = victim.process.wait(timeout=60)
    assert errors == [], f"{len(errors)} lost, first: {errors[:3]}\n" \
        f"{stack.lb_log.read_text()[-4000:]}"
    assert len(ok) == total
    assert code == 0, "the replica did not drain and exit cleanly"
    # Only the balancer's 502 (a sent POST cut by the stopping replica) or a reset connection
    # may have needed a retry; a 503 from nginx would mean it ran out of replicas.
    assert all(r.startswith(("502", "Remote", "Connection")) for r in retried), retried
    print(f"client retries across the stop: {len(retried)} {retried[:3]}")


def test_balancer_answers_its_own_errors_as_kserve_json(tmp_path: Path) -> None:
    """No replica behind it: nginx's own 502, and its 413 past the server's body bound, are
    `{"error": ...}` JSON as the server's are (not nginx's HTML pages); a body of exactly the
    server's bound passes the balancer (and finds no replica)."""
    nginx = tool("nginx")
    dead = free_port()  # nothing listens: connection refused
    http_port = free_port()
    conf = render_nginx(tmp_path / "nginx", free_port(), free_port(), [dead],
                        nginx_version(nginx), http_port=http_port, http_upstream_ports=[dead])
    log = tmp_path / "nginx.log"
    with open(log, "wb") as out:
        lb = subprocess.Popen(nginx_command(nginx, conf), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_listening(http_port, lb, log)
        limit = Settings().http_max_body_bytes
        with RestClient(http_port, retry=False, timeout_s=30) as client:
            for method, path, body in (("GET", "/v2/health/ready", None),
                                       ("POST", "/v2/models/mnist/infer", b"{}"),
                                       ("POST", "/v2/models/mnist/infer", b"0" * limit)):
                reply = client.request(method, path, body)
                assert reply.status == 502, (method, path, reply.status, reply.body[:200])
                assert reply.content_type == "application/json"
                assert set(reply.json()) == {"error"}, reply.body
            too_big = client.request("POST", "/v2/models/mnist/infer", b"0" * (limit + 1))
            assert too_big.status == 413, too_big.body[:200]
            assert too_big.content_type == "application/json"
            assert "error" in too_big.json()
    finally:
        stop_process(lb, signal.SIGQUIT)


def test_a_replica_that_never_accepts_is_unavailable_not_a_deadline(tmp_path: Path) -> None:
    """A replica removed by a scale-down but still in the balancer's resolver cache drops
    connects without a reset: nginx's connect timeout (150 ms) is its 504. The RPC never
    reached a server, so the client must get UNAVAILABLE, which it retries, not
    DEADLINE_EXCEEDED, which it does not (the Docker scale-down test lost two RPCs so).
    Here the silent replica is a loopback listener whose accept queue is full: the kernel
    drops further SYNs, as a vanished container's address does."""
    nginx = tool("nginx")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        port = silent.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue (never accepted): later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        grpc_port = free_port()
        conf = render_nginx(tmp_path / "nginx", grpc_port, free_port(), [port],
                            nginx_version(nginx))
        log = tmp_path / "nginx.log"
        with open(log, "wb") as out:
            lb = subprocess.Popen(nginx_command(nginx, conf), stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            wait_listening(grpc_port, lb, log)
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = pb_grpc.ClassifierStub(channel)
                with pytest.raises(grpc.RpcError) as failed:
                    stub.Classify(uint8_request(np.zeros((1, 784))), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (
                failed.value.code(), failed.value.details(), log.read_text()[-2000:])
        finally:
            stop_process(lb, signal.SIGQUIT)
            for s in fillers:
                s.close()
