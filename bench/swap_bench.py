"""What a hot swap costs the requests in flight: p99 latency with and without swaps, one run.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/swap_bench.py [--rounds 5]
        [--phase-s 4] [--swap-every-s 0.25] [--concurrency 16]

One real server (subprocess `python -m service`, pinned to CPU 0, rescanning every 0.1 s)
serves a 784-256-128-10 MLP (~1.2 MB, loaded and fully validated on every swap). A closed-loop
grpc.aio load generator (pinned to CPU 1) keeps `--concurrency` one-image requests in flight
and records every latency. Each round has a `steady` phase (no repository changes) and a
`swap` phase (a new version appears every `--swap-every-s` by an atomic rename of a pre-staged
directory, exactly the last step of trainer.publish, and versions two behind are deleted);
the order alternates between rounds so drift of the shared machine hits both alike. Each round
gives a ratio p99(swap) / p99(steady); the median ratio is the figure (target <= 2).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
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
    service_command,
    start_server,
    stop,
    write_random_model,
)

from service.pb.mnist.v1 import classifier_pb2 as pb


def stage(directory: Path, seed: int) -> None:
    """A complete version directory (written like trainer.publish, before its rename)."""
    write_random_model(directory, (784, 256, 128, 10), seed, probe_rows=8)


def start(repo: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m service` pinned to CPU 0, rescanning every 0.1 s, metrics off."""
    port = free_port()
    return start_server(service_command(repo, port, metrics_port=None, rescan_interval_s=0.1),
                        port, log, classify_probe(classify_request(1)), env=env_without("MNIST_"))


async def load(target: str, concurrency: int, duration_s: float) -> tuple[list[float], set[int]]:
    """Every request latency (s) over `duration_s`, and the versions that answered."""
    versions: set[int] = set()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(CLASSIFY, response_deserializer=pb.ClassifyResponse.FromString)
        result = await closed_loop(call, classify_request(1), concurrency, duration_s,
                                   on_reply=lambda reply: versions.add(int(reply.version)))
    if result.errors:
        raise SystemExit(f"{result.errors} requests failed during the benchmark")
    return result.latencies_s, versions


class Publisher(threading.Thread):
    """Renames the next staged directory into place every `every_s`; deletes old versions."""

    def __init__(self, repo: Path, staged: list[Path], every_s: float, first: int) -> None:
        super().__init__(daemon=True)
        self.repo, self.staged, self.every_s, self.next = repo, staged, every_s, first
        self.stop_event = threading.Event()
        self.published = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            if not self.staged:
                raise SystemExit("ran out of staged versions: raise --staged")
            os.rename(self.staged.pop(), self.repo / str(self.next))
            old = self.repo / str(self.next - 2)
            if old.is_dir():
                shutil.rmtree(old)
            self.next += 1
            self.published += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--phase-s", type=float, default=4.0)
    parser.add_argument("--swap-every-s", type=float, default=0.25)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    pin_self(1)
    per_phase = int(args.phase_s / args.swap_every_s) + 2

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models" / "mnist"
        stage(repo / "1", 0)
        print(f"staging {per_phase * args.rounds} versions...", flush=True)
        staged = [repo / f".tmp-{i}" for i in range(per_phase * args.rounds)]
        for i, d in enumerate(staged):
            stage(d, i + 1)
        proc, target = start(repo.parent, Path(tmp) / "server.log")
        try:
            asyncio.run(load(target, args.concurrency, 1.0))  # warm up
            rows: list[tuple[int, str, int, float, float, int, int]] = []
            ratios = []
            next_version = 2
            for r in range(args.rounds):
                order = ["steady", "swap"] if r % 2 == 0 else ["swap", "steady"]
                p99 = {}
                for phase in order:
                    pub = None
                    if phase == "swap":
                        pub = Publisher(repo, staged, args.swap_every_s, next_version)
                        pub.start()
                    lat, versions = asyncio.run(load(target, args.concurrency, args.phase_s))
                    swaps = 0
                    if pub is not None:
                        pub.stop_event.set()
                        pub.join()
                        next_version, swaps = pub.next, pub.published
                        time.sleep(0.5)  # let the last swap settle before the next phase
                    p50, p99[phase] = percentile_ms(lat, 50), percentile_ms(lat, 99)
                    rows.append((r, phase, len(lat), p50, p99[phase], swaps, len(versions)))
                    print(f"  round {r} {phase:<6} {len(lat):7d} req  p50 {p50:6.2f} ms"
                          f"  p99 {p99[phase]:6.2f} ms  swaps {swaps:3d}  versions answering "
                          f"{len(versions)}", flush=True)
                ratios.append(p99["swap"] / p99["steady"])
        finally:
            stop(proc)

    print()
    print(f"{'phase':<8}{'median p50 ms':>15}{'median p99 ms':>15}{'swaps/round':>13}")
    for phase in ("steady", "swap"):
        mine = [row for row in rows if row[1] == phase]
        print(f"{phase:<8}{statistics.median(x[3] for x in mine):>15.2f}"
              f"{statistics.median(x[4] for x in mine):>15.2f}"
              f"{statistics.median(x[5] for x in mine):>13.0f}")
    print(f"\np99 ratio swap/steady per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"median p99 ratio: {statistics.median(ratios):.2f}  (target <= 2.0; "
          f"concurrency {args.concurrency}, a new version every {args.swap_every_s} s)")


if __name__ == "__main__":
    main()
