"""What the serving benchmarks share: servers started pinned, one closed-loop load generator.

serve_bench, oip_bench, metrics_bench, swap_bench and lb_bench were written separately and each
had its own copy of starting `python -m service` on CPU 0 and waiting for it, stopping it,
reading its CPU time from /proc, building a Classify request, and running N callers in a
closed loop. Kept here once, so that a fix to how the benchmarks measure (a warm-up, an error
rule, how elapsed time is taken) reaches every benchmark, and their figures stay comparable.
Each benchmark keeps what it alone measures: its cells, its ratios, its tables.

Importing this module puts the repository root on sys.path, so `service` imports resolve when
a benchmark is run as a script (`python bench/x.py`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from service.pb.mnist.v1 import classifier_pb2 as pb  # noqa: E402

CLASSIFY = "/mnist.v1.Classifier/Classify"
# 256-image requests are ~200 kB; grpc's 4 MB default is fine, but 64 requests of them in one
# channel are not, so the load generators and the bare servers raise both limits alike.
BIG_MESSAGES = [("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)]
# Metadata of the synthetic models: only what save_model/validate need.
SYNTHETIC_META: dict[str, Any] = {
    "cost": "cross_entropy", "input": {"shape": [28, 28], "scale": "0..1"},
    "labels": [str(i) for i in range(10)], "training": {}, "data": {}, "metrics": {},
    "created_at": "2026-01-01T00:00:00Z", "trainer_version": "bench",
}

K = TypeVar("K")


# --- processes ------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: int) -> list[str]:
    """A `taskset` prefix putting a subprocess on `cpu`, so server and load generator do not
    take each other's core; empty on a one-core machine or without taskset."""
    if (os.cpu_count() or 1) > 1 and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu)]
    return []


def pin_self(cpu: int) -> None:
    """Pin this process (the load generator) to `cpu`, if there is more than one core."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


def env_without(*prefixes: str) -> dict[str, str]:
    """This environment minus variables starting with `prefixes`: keeps e.g. a developer's
    MNIST_* settings from changing the server a benchmark thinks it is starting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


# Benchmarked servers get no HTTP port unless a bench asks for one (the default 8000 would
# collide between servers); through the environment, so an older tree without the flag (an
# A/B baseline) starts too.
os.environ.setdefault("MNIST_HTTP_PORT", "0")


def service_command(model_dir: Path, port: int, *, metrics_port: int | None,
                    rescan_interval_s: float = 0, extra: Iterable[str] = (),
                    http_port: int = 0) -> list[str]:
    """`python -m service` on 127.0.0.1:port as the benchmarks run it: warnings-only logs,
    the /metrics exporter on `metrics_port` or disabled when it is None, the HTTP front end
    on `http_port` (0: none)."""
    metrics = (["--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port)]
               if metrics_port is not None else ["--no-metrics-enabled"])
    return [sys.executable, "-m", "service", "--model-dir", str(model_dir), "--host",
            "127.0.0.1", "--port", str(port), "--rescan-interval-s", f"{rescan_interval_s:g}",
            "--log-level", "WARNING", *(["--http-port", str(http_port)] if http_port else []),
            *metrics, *extra]


def wait_until_ready(proc: subprocess.Popen[bytes], target: str,
                     probe: Callable[[grpc.Channel], bool], log: Path, name: str = "server",
                     timeout_s: float = 60) -> None:
    """Return once `probe` (a real request) succeeds on `target`; SystemExit with the server's
    log if it exits first or is not ready within `timeout_s` (then it is killed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited:\n{log.read_text()}")
        try:
            with grpc.insecure_channel(target) as ch:
                grpc.channel_ready_future(ch).result(timeout=0.5)
                if probe(ch):
                    return
        except (grpc.FutureTimeoutError, grpc.RpcError):
            pass
        time.sleep(0.1)
    stop(proc)
    raise SystemExit(f"{name} did not start:\n{log.read_text()}")


def start_server(cmd: list[str], port: int, log: Path, probe: Callable[[grpc.Channel], bool], *,
                 name: str = "server", cpu: int | None = 0,
                 env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `cmd` (pinned to `cpu`, output to `log`) and wait until `probe` answers on
    127.0.0.1:port; returns the process and its target address."""
    prefix = pin(cpu) if cpu is not None else []
    with log.open("wb") as out:
        proc = subprocess.Popen(prefix + cmd, cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    wait_until_ready(proc, target, probe, log, name)
    return proc, target


def classify_probe(body: bytes) -> Callable[[grpc.Channel], bool]:
    """A readiness probe that sends one pre-serialized Classify request."""
    def probe(ch: grpc.Channel) -> bool:
        ch.unary_unary(CLASSIFY)(body, timeout=5)
        return True
    return probe


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace_s: float = 20) -> None:
    """Ask a process to stop with `sig` (the server drains on SIGTERM); kill it after
    `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc: server CPU per
    request is steadier than req/s on a shared machine (time the core was taken away from the
    server does not count)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_metrics(port: int) -> str:
    """One GET of a server's /metrics, as Prometheus would scrape it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


# --- models and requests --------------------------------------------------------------------

def write_random_model(directory: Path, sizes: tuple[int, ...], seed: int,
                       probe_rows: int = 2) -> None:
    """A complete version directory holding a random ReLU MLP of `sizes` (forward cost of a
    trained one; its answers are meaningless)."""
    from service.model import build_model, save_model

    rng = np.random.default_rng(seed)
    ws = [rng.normal(0, 0.05, (a, b)).astype(np.float32) for a, b in itertools.pairwise(sizes)]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    directory.mkdir(parents=True)
    save_model(build_model(ws, bs, ["relu"] * (len(sizes) - 2), "softmax", SYNTHETIC_META,
                           rng.random((probe_rows, 784))), directory)


def model_repo(tmp: Path, hidden: int = 0) -> Path:
    """The committed default model (models/mnist/1), or, if it is missing or `hidden` is set,
    a repository under `tmp` with a random 784-`hidden`-10 (default 128) model."""
    if not hidden and (ROOT / "models" / "mnist" / "1").is_dir():
        return ROOT / "models"
    write_random_model(tmp / "mnist" / "1", (784, hidden or 128, 10), seed=0)
    return tmp


def random_pixels(images: int) -> np.ndarray:
    """`images` random 784-pixel uint8 rows, the same for a given count in every benchmark."""
    return np.random.default_rng(images).integers(0, 256, (images, 784), dtype=np.uint8)


@functools.cache
def classify_request(images: int, packed_output: bool = False) -> bytes:
    """A serialized uint8 ClassifyRequest of `images` images, built once per shape so the load
    generator spends nothing on it; `packed_output` asks for the packed reply (as
    ClassifierClient does)."""
    return pb.ClassifyRequest(pixels=random_pixels(images).tobytes(), encoding=pb.ENCODING_UINT8,
                              packed_output=packed_output).SerializeToString()


# --- the load generator ---------------------------------------------------------------------

@dataclass
class LoopResult:
    """What one closed-loop run saw: every successful call's latency and the failures."""

    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def summary(self, images: int) -> dict[str, float]:
        """req/s, images/s, p50/p99 ms and errors: one table cell of serve/oip_bench."""
        return {"rps": self.rps, "elapsed_s": self.elapsed_s,
                "ips": len(self.latencies_s) * images / self.elapsed_s,
                "p50_ms": percentile_ms(self.latencies_s, 50),
                "p99_ms": percentile_ms(self.latencies_s, 99), "errors": float(self.errors)}


async def closed_loop(call: Callable[..., Awaitable[Any]], body: Any, concurrency: int,
                      duration_s: float, *, max_requests: int | None = None,
                      timeout_s: float = 30, on_reply: Callable[[Any], None] | None = None,
                      alongside: Callable[[float], Awaitable[None]] | None = None) -> LoopResult:
    """`concurrency` callers each sending `body` to `call` and waiting for the answer before
    sending again (a closed loop: load adapts to the server, as real clients' does), until
    `duration_s` has passed or `max_requests` calls succeeded. A failed call is counted and
    not timed. `alongside(end)` runs with the callers (e.g. a /metrics scraper until the
    perf_counter time `end`) and its time is part of `elapsed_s`."""
    result = LoopResult()
    limit = max_requests if max_requests is not None else float("inf")
    end = time.perf_counter() + duration_s

    async def caller() -> None:
        while time.perf_counter() < end and len(result.latencies_s) < limit:
            t0 = time.perf_counter()
            try:
                reply = await call(body, timeout=timeout_s)
            except grpc.RpcError:
                result.errors += 1
                continue
            result.latencies_s.append(time.perf_counter() - t0)
            if on_reply is not None:
                on_reply(reply)

    extra = [alongside(end)] if alongside is not None else []
    t0 = time.perf_counter()
    await asyncio.gather(*extra, *(caller() for _ in range(concurrency)))
    result.elapsed_s = time.perf_counter() - t0
    return result


async def measure_cell(target: str, method: str, body: bytes, images: int, concurrency: int,
                       duration_s: float, max_requests: int) -> dict[str, float]:
    """One serve/oip_bench cell: 3 warm-up calls (failing loudly if the method is not
    served), then a closed loop of pre-serialized `body`; LoopResult.summary of it."""
    async with grpc.aio.insecure_channel(target, options=BIG_MESSAGES) as ch:
        call = ch.unary_unary(method)
        for _ in range(3):
            await call(body, timeout=10)
        result = await closed_loop(call, body, concurrency, duration_s,
                                   max_requests=max_requests)
    return result.summary(images)


# --- statistics -----------------------------------------------------------------------------

def percentile_ms(latencies_s: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation) of latencies in seconds, in milliseconds."""
    return float(np.percentile(np.array(latencies_s), q)) * 1e3


def median_per_metric(results: Mapping[K, list[dict[str, float]]]) -> dict[K, dict[str, float]]:
    """For each cell, the median over rounds of each metric: what the tables report."""
    return {k: {m: statistics.median(v[m] for v in vs) for m in vs[0]}
            for k, vs in results.items()}
