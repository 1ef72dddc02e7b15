"""Health Check latency while 64 clients saturate Classify: does the asyncio lane keep up?

    flock /tmp/mnist-bench.lock .venv/bin/python bench/health_under_load.py [server flags]

On the core front end (service/frontends/core.py) Classify runs on the polling thread and health on
the asyncio loop, which gets the GIL only when that thread waits or at the interpreter's switch
interval. The server (pinned to CPU 0, committed default model) is loaded by 64 closed-loop
callers for 5 s while a prober checks health every 10 ms; prints Classify req/s and the
checks' p50, p99 and max. Pass `--frontend aio` to compare.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
from common import (
    BIG_MESSAGES,
    CLASSIFY,
    ROOT,
    classify_probe,
    classify_request,
    closed_loop,
    free_port,
    pin_self,
    service_command,
    start_server,
    stop,
)
from grpc_health.v1 import health_pb2


async def main(target: str, extra: list[str]) -> None:
    async with (grpc.aio.insecure_channel(target, options=BIG_MESSAGES) as ch,
                grpc.aio.insecure_channel(target) as health_ch):
        classify = ch.unary_unary(CLASSIFY)
        check = health_ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        latencies: list[float] = []

        async def prober(end: float) -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                reply = await check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.perf_counter() - t0)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                await asyncio.sleep(0.01)

        load = await closed_loop(classify, classify_request(1, True), 64, 5.0, alongside=prober)
    latencies.sort()
    p50, p99 = (latencies[int(len(latencies) * q)] * 1e3 for q in (0.5, 0.99))
    print(f"{' '.join(extra) or '(defaults)'}: Classify {load.rps:.0f} req/s, {load.errors} "
          f"errors; {len(latencies)} health checks: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
          f"max {latencies[-1] * 1e3:.2f} ms")


if __name__ == "__main__":
    pin_self(1)
    extra = sys.argv[1:]
    port = free_port()
    cmd = service_command(ROOT / "models", port, metrics_port=free_port(), extra=extra)
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_server(cmd, port, Path(tmp) / "server.log",
                                    classify_probe(classify_request(1, True)), name="ours")
        try:
            asyncio.run(main(target, extra))
        finally:
            stop(proc)
