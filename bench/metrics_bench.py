"""What metrics cost: served throughput with metrics on vs off, measured side by side in one run.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/metrics_bench.py [--duration-s 3]
        [--rounds 5]

Part 1 (the target of issue 5: metrics cost at most 5% throughput). Two real servers run at
once, `metrics` (as shipped, /metrics exporter on) and `nometrics` (--no-metrics-enabled),
each a subprocess pinned to CPU 0; the load generator (grpc.aio, closed loop, pre-serialized
requests) is pinned to CPU 1. Rounds alternate between the two servers so drift in the shared
machine's load hits both alike; each round's pair gives a ratio, and the medians are quoted.
A scrape of /metrics runs every second during `metrics` rounds, as Prometheus would. Besides
requests/s, each round reads the server's CPU seconds from /proc: CPU per request is what
metrics add, and unlike wall-clock throughput it barely moves when other processes load the
shared 2-core machine; both are printed. Then the two servers are loaded at the same time
(sharing CPU 0, so noise hits both alike) and their requests/s compared.

Part 2 (why it is cheap): the recording calls alone, per request and per batch, against the
baseline of one `Histogram.observe()` per row that a batch would otherwise pay.

Part 4 (`--workers N`, docs/metrics.md): a worker's count snapshot (record, JSON, write,
rename) every 0.5 s, against what prometheus_client's multiprocess metrics would cost on the
request path instead (one memory-mapped observe() per row, measured in a subprocess).

Part 3 (the verdict): what the metric calls of one request cost, in a stream batched as the
server really batched it in part 1, as a share of the server's CPU per request with metrics
off (part 1). On a 2-core machine shared with other jobs the direct ratios of part 1 swing by
+-30% round to round, which cannot resolve a 5% budget; this ratio of two medians can.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from common import (
    CLASSIFY,
    classify_probe,
    classify_request,
    closed_loop,
    cpu_s,
    env_without,
    free_port,
    model_repo,
    scrape_metrics,
    service_command,
    start_server,
    stop,
)
from prometheus_client import CollectorRegistry, Histogram

from service.metrics import CONFIDENCE_BUCKETS, Metrics
from service.metrics.counts import Hist
from service.metrics.multiprocess import SnapshotWriter


def start_server_pair_member(metrics: bool, repo: Path,
                             log: Path) -> tuple[subprocess.Popen[bytes], str, int]:
    """`metrics` (exporter on) or `nometrics` (--no-metrics-enabled), pinned to CPU 0; returns
    the process, its target and its /metrics port."""
    port, metrics_port = free_port(), free_port()
    proc, target = start_server(
        service_command(repo, port, metrics_port=metrics_port if metrics else None), port, log,
        classify_probe(classify_request(1)), env=env_without("MNIST_", "PROMETHEUS_"))
    return proc, target, metrics_port


async def load(target: str, images: int, concurrency: int, duration_s: float,
               scrape_port: int | None) -> float:
    """Requests per second over `duration_s`, `concurrency` callers each in a closed loop,
    with /metrics scraped every second alongside if `scrape_port` is set."""
    async def scraper(end: float) -> None:
        while scrape_port is not None and time.perf_counter() < end:
            await asyncio.to_thread(scrape_metrics, scrape_port)
            await asyncio.sleep(1.0)

    async with grpc.aio.insecure_channel(target) as channel:
        result = await closed_loop(channel.unary_unary(CLASSIFY), classify_request(images),
                                   concurrency, duration_s, alongside=scraper)
    if result.errors:
        raise SystemExit(f"{result.errors} requests failed during the benchmark")
    return result.rps


async def load_both(targets: tuple[str, str], images: int, concurrency: int, duration_s: float,
                    scrape_port: int) -> tuple[float, float]:
    """Requests/s of the metrics-on and the metrics-off server, loaded at the same time."""
    on, off = await asyncio.gather(
        load(targets[0], images, concurrency, duration_s, scrape_port),
        load(targets[1], images, concurrency, duration_s, None))
    return on, off


def batch_rows_so_far(port: int) -> tuple[float, float]:
    """(rows, batches) the metrics-on server has run, from its own /metrics."""
    text = scrape_metrics(port)
    total = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for kind in total:
            if line.startswith(f"mnist_batch_rows_{kind}{{"):
                total[kind] += float(line.rsplit(" ", 1)[1])
    return total["sum"], total["count"]


Row = tuple[str, int, float, float, float, float, float, float]


def part1(args: argparse.Namespace) -> list[Row]:
    """Per shape: (shape, images, req/s on, req/s off, tput ratio, cpu ratio,
    server CPU µs per request with metrics off, mean batch rows)."""
    rows: list[Row] = []
    simultaneous: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = model_repo(Path(tmp) / "models")
        on, target_on, scrape_port = start_server_pair_member(True, repo, Path(tmp) / "on.log")
        off, target_off, _ = start_server_pair_member(False, repo, Path(tmp) / "off.log")
        try:
            for images, conc in [(1, 64), (1, 8), (16, 32)]:
                # warm up both
                for t in (target_on, target_off):
                    asyncio.run(load(t, images, conc, 0.5, None))
                ratios, cost_ratios, rates_on, rates_off, cpu_off = [], [], [], [], []
                rows0, batches0 = batch_rows_so_far(scrape_port)
                for r in range(args.rounds):
                    # alternate which goes first, so neither always gets the quieter moment
                    order = [(True, on, target_on), (False, off, target_off)]
                    if r % 2:
                        order.reverse()
                    rate, cpu_per_req = {}, {}
                    for metrics_on, proc, target in order:
                        before = cpu_s(proc.pid)
                        started = time.perf_counter()
                        rate[metrics_on] = asyncio.run(load(
                            target, images, conc, args.duration_s,
                            scrape_port if metrics_on else None))
                        n = rate[metrics_on] * (time.perf_counter() - started)
                        cpu_per_req[metrics_on] = (cpu_s(proc.pid) - before) / max(n, 1)
                    rates_on.append(rate[True])
                    rates_off.append(rate[False])
                    ratios.append(rate[True] / rate[False])
                    cost_ratios.append(cpu_per_req[False] / cpu_per_req[True])
                    cpu_off.append(cpu_per_req[False] * 1e6)
                rows1, batches1 = batch_rows_so_far(scrape_port)
                mean_batch = (rows1 - rows0) / max(batches1 - batches0, 1)
                shape = f"{images} img x c{conc}"
                row = (shape, images, statistics.median(rates_on), statistics.median(rates_off),
                       statistics.median(ratios), statistics.median(cost_ratios),
                       statistics.median(cpu_off), mean_batch)
                rows.append(row)
                print(f"  {shape:<13}{row[2]:>10.0f}{row[3]:>11.0f}{row[4]:>13.3f}{row[5]:>12.3f}"
                      "   rounds: " + " ".join(f"{x:.2f}" for x in ratios) + " | "
                      + " ".join(f"{x:.2f}" for x in cost_ratios), flush=True)
                # Both at once: the two servers share CPU 0 and whatever else runs on it, so
                # the machine's noise hits them at the same moments.
                together = []
                for _ in range(args.rounds):
                    got_on, got_off = asyncio.run(load_both(
                        (target_on, target_off), images, conc, args.duration_s, scrape_port))
                    together.append(got_on / got_off)
                print(f"  {'':<13}simultaneous on/off {statistics.median(together):.3f}   rounds: "
                      + " ".join(f"{x:.2f}" for x in together), flush=True)
                simultaneous.append(statistics.median(together))
        finally:
            stop(on)
            stop(off)
    print(f"  worst simultaneous on/off: {min(simultaneous):.3f}")
    return rows


def timed(fn: object, n: int) -> float:
    """Median µs per call over 5 runs of n calls."""
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def batches_then_flush(metrics: Metrics, waits: list[float], p: np.ndarray) -> None:
    """100 batches and the one flush (a scrape) that records them."""
    for _ in range(100):
        metrics.batch_done("mnist", 1, waits, 0.0005, p)
    metrics.flush()


def part2() -> list[tuple[str, float, float]]:
    m = Metrics(CollectorRegistry())
    d = Metrics.disabled()
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=64).astype(np.float32)
    waits = list(rng.uniform(0, 0.002, 64))
    conf = p.max(axis=1).astype(np.float64)
    # The baseline: a prometheus_client Histogram, one observe() per row.
    child = Histogram("bench", "bench", buckets=CONFIDENCE_BUCKETS,
                      registry=CollectorRegistry())
    bulk = Hist(CONFIDENCE_BUCKETS)
    def requests_then_flush(metrics: Metrics) -> None:
        for _ in range(100):
            metrics.request_done("Classify", "mnist", "1", "OK", 1, 0.001)
        metrics.flush()

    rows = [
        # request_done queues too; 100 of them and the flush that records them, per request
        ("request_done (+flush/100)", timed(lambda: requests_then_flush(m), 200) / 100,
         timed(lambda: requests_then_flush(d), 200) / 100),
        # batch_done only queues; flush() records (at scrape time in the server): time both.
        ("batch_done+flush, 64 rows",
         timed(lambda: (m.batch_done("mnist", 1, waits, 0.0005, p), m.flush()), 2000),
         timed(lambda: d.batch_done("mnist", 1, waits, 0.0005, p), 2000)),
        # a scrape records every batch since the previous one, grouped: per batch of 100
        ("batch_done (+flush/100), 64 rows",
         timed(lambda: batches_then_flush(m, waits, p), 200) / 100,
         timed(lambda: batches_then_flush(d, waits, p), 200) / 100),
    ]
    bulk_us = timed(lambda: bulk.observe_many(conf), 2000)
    loop_us = timed(lambda: [child.observe(v) for v in conf.tolist()], 2000)
    print(f"  {'call':<28}{'enabled µs':>12}{'disabled µs':>13}")
    for name, on, off in rows:
        print(f"  {name:<28}{on:>12.2f}{off:>13.2f}")
    print(f"  64 confidences, bulk      {bulk_us:8.2f} µs   vs observe() per row "
          f"{loop_us:8.2f} µs   ratio {bulk_us / loop_us:.3f}")
    return rows


def stream_cost_us(images: int, batch_rows: float) -> float:
    """Metric calls one request costs in a stream of batches of `batch_rows` rows: in-flight
    up and down, request_done, two queue-depth updates, and its share of one batch_done and
    of the flush that records it with 99 others."""
    m = Metrics(CollectorRegistry())
    rng = np.random.default_rng(1)
    b = max(1, round(batch_rows))
    p = rng.dirichlet(np.ones(10), size=b).astype(np.float32)
    waits = list(rng.uniform(0, 0.002, max(1, b // images)))
    def hundred_requests() -> None:
        for _ in range(100):
            m.inflight.inc()
            m.set_queue_rows("mnist", 3)
            m.set_queue_rows("mnist", 0)
            m.request_done("Classify", "mnist", "1", "OK", images, 0.001)
            m.inflight.dec()
        m.flush()

    per_request = timed(hundred_requests, 200) / 100
    # A scrape records all batches since the previous one (hundreds at these rates): 100.
    per_batch = timed(lambda: batches_then_flush(m, waits, p), 200) / 100
    return per_request + per_batch * images / b


_MMAP_SNIPPET = """
import os, sys, time, statistics
from prometheus_client import CollectorRegistry, Histogram
h = Histogram("h", "h", buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999,
              1.0), registry=CollectorRegistry())
values = [i / 64 for i in range(64)]
runs = []
for _ in range(5):
    t = time.perf_counter()
    for _ in range(200):
        for v in values:
            h.observe(v)
    runs.append((time.perf_counter() - t) / 200 * 1e6)
print(statistics.median(runs))
"""


def part4() -> None:
    """Snapshot cost per interval vs multiprocess observe() per row on the request path."""
    m = Metrics(CollectorRegistry())
    rng = np.random.default_rng(2)
    for v in range(1, 3):
        m.version_available("mnist", v, 0.01)
    for method in ("Classify", "ModelInfer", "ClassifyStream"):
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
            m.request_done(method, "mnist", "1", code, 1, 0.001)
    for v in (1, 2):
        m.batch_done("mnist", v, [0.001] * 8, 0.001,
                     rng.dirichlet(np.ones(10), size=64).astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        writer = SnapshotWriter(Path(tmp), m._snapshot, interval_s=3600)
        snap_us = timed(writer.write, 200)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.json"))
        writer.stop()
        env = {**env_without("PROMETHEUS_MULTIPROC_DIR"), "PROMETHEUS_MULTIPROC_DIR": tmp}
        mmap_us = float(subprocess.run([sys.executable, "-c", _MMAP_SNIPPET], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    print(f"  snapshot of a worker's counts ({size} bytes): {snap_us:.0f} µs every 0.5 s "
          f"= {snap_us / 5000:.3f}% of one core")
    print(f"  multiprocess-mode Histogram.observe() x64 (one 64-row batch's confidences): "
          f"{mmap_us:.0f} µs per batch, on the request path; kept counts: see part 2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"part 1: served throughput, metrics on vs off, {args.rounds} alternating rounds of "
          f"{args.duration_s} s (medians)", flush=True)
    print(f"  {'shape':<13}{'on req/s':>10}{'off req/s':>11}{'tput on/off':>13}"
          f"{'cpu off/on':>12}")
    rows = part1(args)
    print("  tput on/off: requests/s ratio (wall clock, at the mercy of the shared machine);\n"
          "  cpu off/on: server CPU seconds per request, off over on = the throughput ratio a\n"
          "  CPU-bound server gets, and far less sensitive to other processes' load.")
    print("part 2: cost of the recording calls (median of 5 runs)")
    part2()
    print("part 4: --workers N, count snapshots vs prometheus_client multiprocess metrics")
    part4()
    print("part 3: metric calls per request (this run's mean batch size) over the server's CPU\n"
          "  per request with metrics off (part 1): the share of a CPU-bound server's time that\n"
          "  recording takes, i.e. the throughput it can cost")
    print(f"  {'shape':<13}{'batch rows':>11}{'server µs/req':>15}{'metrics µs/req':>16}"
          f"{'est. on/off':>13}")
    estimates = []
    for shape, images, *_, cpu_off_us, mean_batch in rows:
        cost = stream_cost_us(images, mean_batch)
        est = cpu_off_us / (cpu_off_us + cost)
        estimates.append(est)
        print(f"  {shape:<13}{mean_batch:>11.1f}{cpu_off_us:>15.0f}{cost:>16.1f}{est:>13.3f}")
    worst_est = min(estimates)
    worst_cpu = min(r[5] for r in rows)
    worst_tput = min(r[4] for r in rows)
    verdict = "PASS" if worst_est >= 0.95 else "FAIL"
    print(f"target: metrics cost <= 5% throughput. worst estimate (part 3) {worst_est:.3f} -> "
          f"{verdict}; direct medians (part 1, noisy on a shared machine): cpu off/on "
          f"{worst_cpu:.3f}, wall-clock on/off {worst_tput:.3f}")
    return 0 if worst_est >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
