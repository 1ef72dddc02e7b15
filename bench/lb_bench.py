"""What the compose load balancer costs, and what a replica stop costs, measured side by side.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/lb_bench.py [--duration-s 2] [--repeats 3]

Runs the real deploy/nginx config (rendered for 127.0.0.1 as tests/test_scale_out.py does) in
front of real `python -m service` replicas on a one-model repository, and the same client
against:
  direct   one replica, no proxy (the baseline)
  lb-1     nginx -> that replica
  lb-3     nginx -> three replicas
Cells: 1-image Classify, closed loop, concurrency 1 (p50 latency) and 8 (req/s). Every round
restarts nothing but measures the three targets back to back; medians over --repeats rounds,
reported as ratios to `direct` from the same round. On this 2-core machine the replicas, nginx
and the client share the cores, so lb-3 shows the proxy's cost, not a scaling gain.
Then --stops times: SIGTERM one of three replicas after 300 of 1500 RPCs (8 in flight, no
client retry) and count the RPCs that failed: the race docs/deployment.md describes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, closed_loop, env_without, free_port, stop, wait_until_ready

sys.path.insert(0, str(ROOT / "tests"))

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.deploy import nginx_command, nginx_version, render_nginx
from support.servers import make_model, uint8_request, write_version

from service.pb.mnist.v1 import classifier_pb2_grpc as pb_grpc

NGINX = str(ROOT / ".tools" / "bin" / "nginx")


def serving(ch: grpc.Channel) -> bool:
    """The replica's health service says SERVING (a model is loaded)."""
    check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
    return bool(check.status == health_pb2.HealthCheckResponse.SERVING)


def start_replica(repo: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A replica configured as compose configures it (MNIST_* environment), not pinned."""
    port = free_port()
    env = {**env_without("MNIST_"),
           "MNIST_MODEL_DIR": str(repo), "MNIST_HOST": "127.0.0.1", "MNIST_PORT": str(port),
           "MNIST_METRICS_ENABLED": "false", "MNIST_RESCAN_INTERVAL_S": "0",
           "MNIST_GRACE_PERIOD_S": "5"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    wait_until_ready(proc, f"127.0.0.1:{port}", serving, log, "replica")
    return proc, port


def start_nginx(tmp: Path, name: str, ports: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = render_nginx(tmp / name, port, free_port(), ports, nginx_version(NGINX))
    (tmp / name / "access.log").touch()
    conf.write_text(conf.read_text().replace("access_log /dev/stdout grpc;", "access_log off;"))
    with open(tmp / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(nginx_command(NGINX, conf), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise RuntimeError("nginx did not start")


async def load(port: int, concurrency: int, duration_s: float) -> tuple[float, float, int]:
    """(req/s, p50 latency s, failures) of 1-image Classify for duration_s."""
    request = uint8_request(np.zeros((1, 28, 28), dtype=np.uint8))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for _ in range(20):
            await stub.Classify(request, timeout=10)  # warm connections
        result = await closed_loop(stub.Classify, request, concurrency, duration_s, timeout_s=10)
    return result.rps, statistics.median(result.latencies_s), result.errors


async def stop_mid_traffic(lb_port: int, victim: subprocess.Popen[bytes]) -> list[str]:
    request = uint8_request(np.zeros((4, 28, 28), dtype=np.uint8))
    failed: list[str] = []
    ok = 0
    sent = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{lb_port}",
                                         options=[("grpc.enable_retries", 0)]) as ch:
        stub = pb_grpc.ClassifierStub(ch)

        async def worker() -> None:
            nonlocal ok, sent
            while sent < 1500:
                sent += 1
                try:
                    await stub.Classify(request, timeout=30)
                    ok += 1
                    if ok == 300:
                        victim.send_signal(signal.SIGTERM)
                except grpc.aio.AioRpcError as e:
                    failed.append(e.code().name)

        await asyncio.gather(*(worker() for _ in range(8)))
    await asyncio.to_thread(victim.wait, 60)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stops", type=int, default=5)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        repo = tmp / "models"
        write_version(repo, "mnist", 1, make_model(seed=1))
        try:
            replicas = [start_replica(repo, tmp / f"r{i}.log") for i in range(3)]
            procs += [p for p, _ in replicas]
            ports = [port for _, port in replicas]
            lb1, lb1_port = start_nginx(tmp, "lb1", ports[:1])
            lb3, lb3_port = start_nginx(tmp, "lb3", ports)
            procs += [lb1, lb3]
            targets = {"direct": ports[0], "lb-1": lb1_port, "lb-3": lb3_port}
            rows: dict[str, dict[str, list[float]]] = {
                t: {"rps_c8": [], "p50_c1_ms": []} for t in targets}
            for _ in range(args.repeats):
                for name, port in targets.items():
                    rps, _, f8 = asyncio.run(load(port, 8, args.duration_s))
                    _, p50, f1 = asyncio.run(load(port, 1, args.duration_s))
                    assert f8 == f1 == 0, f"{name}: {f8 + f1} RPCs failed"
                    rows[name]["rps_c8"].append(rps)
                    rows[name]["p50_c1_ms"].append(p50 * 1000)
            base = {k: statistics.median(v) for k, v in rows["direct"].items()}
            print(f"{'target':8} {'req/s c8':>10} {'ratio':>7} {'p50 c1 ms':>10} {'ratio':>7}")
            for name, cells in rows.items():
                rps = statistics.median(cells["rps_c8"])
                p50 = statistics.median(cells["p50_c1_ms"])
                print(f"{name:8} {rps:10.0f} {rps / base['rps_c8']:7.2f} "
                      f"{p50:10.3f} {p50 / base['p50_c1_ms']:7.2f}")
            for p in procs:
                stop(p, signal.SIGQUIT if p.args[0] == NGINX else signal.SIGTERM)
            procs.clear()

            failures: list[int] = []
            for i in range(args.stops):
                reps = [start_replica(repo, tmp / f"s{i}-{j}.log") for j in range(3)]
                procs += [p for p, _ in reps]
                lb, lb_port = start_nginx(tmp, f"stop{i}", [port for _, port in reps])
                procs.append(lb)
                failed = asyncio.run(stop_mid_traffic(lb_port, reps[0][0]))
                assert set(failed) <= {"CANCELLED"}, failed
                failures.append(len(failed))
                for p in procs:
                    stop(p, signal.SIGQUIT if p.args[0] == NGINX else signal.SIGTERM)
                procs.clear()
            print(f"\nreplica stop mid-traffic, no client retry, {args.stops} stops: "
                  f"failed RPCs per stop {failures} (median {statistics.median(failures)}, "
                  f"of 1500; all CANCELLED)")
        finally:
            for p in procs:
                stop(p, signal.SIGQUIT if p.args[0] == NGINX else signal.SIGTERM)


if __name__ == "__main__":
    main()
