"""What a 10% canary and shadow mode cost c=64 throughput, side by side with plain serving.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/promotion_bench.py [--rounds 5]
        [--phase-s 4] [--concurrency 64]

One real server (subprocess `python -m service`, pinned to CPU 0, admin on, metrics on)
serves two 784-256-128-10 versions; version 1 is held current. A closed-loop grpc.aio load
generator (pinned to CPU 1) keeps `--concurrency` one-image Classify requests in flight.
Each round runs three phases in a rotating order: `plain` (no canary, no shadow), `canary`
(version 2 takes 10% of requests; its rollback checks on, thresholds out of reach so it stays)
and `shadow` (every batch version 1 answers is recomputed by version 2 on the promotion
worker, compared, never returned). Per round: throughput ratio canary/plain and shadow/plain;
the medians are the figures. Shadow's second forward pass is bounded by its queue
(`--shadow-queue-batches`): the share of images it dropped rather than recomputed is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import tempfile
from pathlib import Path

import grpc
from common import (
    CLASSIFY,
    classify_probe,
    classify_request,
    closed_loop,
    env_without,
    free_port,
    percentile_ms,
    pin_self,
    scrape_metrics,
    service_command,
    start_server,
    stop,
    write_random_model,
)

from service.pb.mnist.v1 import admin_pb2 as apb
from service.pb.mnist.v1 import admin_pb2_grpc as apb_grpc
from service.pb.mnist.v1 import classifier_pb2 as pb

TOKEN = "bench-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODES = ("plain", "canary", "shadow")


def steer(admin: apb_grpc.AdminStub, mode: str) -> None:
    """Put the server in `mode` (ending the other modes first)."""
    admin.SetCanary(apb.AdminSetCanaryRequest(model="mnist", version=0), metadata=AUTH)
    admin.SetShadow(apb.AdminSetShadowRequest(model="mnist", version=0), metadata=AUTH)
    admin.SetCurrentVersion(apb.AdminSetCurrentVersionRequest(model="mnist", version=1, hold=True),
                            metadata=AUTH)
    if mode == "canary":
        admin.SetCanary(apb.AdminSetCanaryRequest(model="mnist", version=2, percent=10),
                        metadata=AUTH)
    elif mode == "shadow":
        admin.SetShadow(apb.AdminSetShadowRequest(model="mnist", version=2), metadata=AUTH)


async def load(target: str, concurrency: int, duration_s: float
               ) -> tuple[float, float, dict[int, int]]:
    """(requests/s, p99 ms, answers by version) of one closed-loop phase."""
    versions: dict[int, int] = {}

    def count(reply: object) -> None:
        v = int(getattr(reply, "version", 0))
        versions[v] = versions.get(v, 0) + 1

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(CLASSIFY, response_deserializer=pb.ClassifyResponse.FromString)
        result = await closed_loop(call, classify_request(1), concurrency, duration_s,
                                   on_reply=count)
    if result.errors:
        raise SystemExit(f"{result.errors} requests failed during the benchmark")
    rps = len(result.latencies_s) / result.elapsed_s
    return rps, percentile_ms(result.latencies_s, 99), versions


def shadow_counts(metrics_port: int) -> tuple[float, float]:
    """(images compared, images dropped) by shadow so far, from /metrics."""
    text = scrape_metrics(metrics_port)

    def total(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r"\S* ([0-9.e+]+)$", text, re.M))

    return total(r"^mnist_shadow_compared_total\{"), total(r"^mnist_shadow_dropped_total\{")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    pin_self(1)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models" / "mnist"
        for v in (1, 2):
            write_random_model(repo / str(v), (784, 256, 128, 10), v, probe_rows=8)
        port, metrics_port = free_port(), free_port()
        cmd = service_command(
            repo.parent, port, metrics_port=metrics_port,
            extra=["--admin-enabled", "--admin-token", TOKEN, "--canary-max-divergence", "1",
                   "--canary-max-disagreement", "1", "--canary-max-error-rate", "1"],
        )
        proc, target = start_server(cmd, port, Path(tmp) / "server.log",
                                    classify_probe(classify_request(1)), env=env_without("MNIST_"))
        rows: list[tuple[int, str, float, float, dict[int, int], float]] = []
        ratios: dict[str, list[float]] = {"canary": [], "shadow": []}
        try:
            with grpc.insecure_channel(target) as ch:
                admin = apb_grpc.AdminStub(ch)
                steer(admin, "plain")
                asyncio.run(load(target, args.concurrency, 1.0))  # warm up
                for r in range(args.rounds):
                    order = MODES[r % 3:] + MODES[:r % 3]
                    rps = {}
                    for mode in order:
                        steer(admin, mode)
                        before = shadow_counts(metrics_port)
                        rps[mode], p99, versions = asyncio.run(
                            load(target, args.concurrency, args.phase_s))
                        after = shadow_counts(metrics_port)
                        compared, dropped = (after[0] - before[0], after[1] - before[1])
                        drop_share = dropped / (compared + dropped) if compared + dropped else 0.0
                        rows.append((r, mode, rps[mode], p99, versions, drop_share))
                        share = versions.get(2, 0) / max(1, sum(versions.values()))
                        print(f"  round {r} {mode:<7} {rps[mode]:8.0f} req/s  p99 {p99:6.2f} ms"
                              f"  to version 2 {share:6.1%}"
                              + (f"  shadow dropped {drop_share:6.1%}" if mode == "shadow"
                                 else ""), flush=True)
                    for mode in ("canary", "shadow"):
                        ratios[mode].append(rps[mode] / rps["plain"])
        finally:
            stop(proc)
    print()
    print(f"{'mode':<8}{'median req/s':>14}{'median p99 ms':>15}")
    for mode in MODES:
        mine = [row for row in rows if row[1] == mode]
        print(f"{mode:<8}{statistics.median(x[2] for x in mine):>14.0f}"
              f"{statistics.median(x[3] for x in mine):>15.2f}")
    for mode in ("canary", "shadow"):
        print(f"throughput {mode}/plain per round: {', '.join(f'{x:.2f}' for x in ratios[mode])}"
              f"  median {statistics.median(ratios[mode]):.2f}")
    drops = [row[5] for row in rows if row[1] == "shadow"]
    print(f"shadow images dropped (bounded queue) median {statistics.median(drops):.1%}, "
          f"range {min(drops):.1%}..{max(drops):.1%}; c={args.concurrency}, shared machine")


if __name__ == "__main__":
    main()
