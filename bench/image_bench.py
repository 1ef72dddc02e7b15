"""Encoded-image requests: req/s on one core, and what decoding costs of each request.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/image_bench.py [--duration-s 3] [--repeats 3]

One server (`python -m service` as shipped, `--image-decode-workers 1`) pinned with its
decoder process to CPU 0 (taskset's affinity is inherited), the load generator on CPU 1. Per
round, side by side with the same digit: Classify with the image's PNG bytes (`images`) vs
Classify with the pixels the CLI would send for that PNG (uint8), 1 image per request at
concurrency 1 and 8, for a 112x112 MNIST PNG (docs/examples) and a 400x300 "scan" of a
digit; server CPU per request includes the decoder process. Reported: medians over rounds
[min-max] of req/s, p50, CPU ms/request, and decoding's share of an image request's CPU
(1 - pixels/image CPU).

Also, in this process: to_mnist alone per image (what a decoder thread would cost) vs a
DecoderPool round trip (the price of running it in a process that can be killed at its time
limit), same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from common import (
    CLASSIFY,
    ROOT,
    closed_loop,
    cpu_s,
    free_port,
    model_repo,
    pin_self,
    service_command,
    start_server,
    stop,
)

from mnist_imaging.decode import ImageLimits, to_mnist
from mnist_imaging.pool import DecoderPool
from service.pb.mnist.v1 import classifier_pb2 as pb


def scan_png() -> bytes:
    """A 400x300 photo-like digit: gray paper with noise, a dark stroke."""
    from PIL import Image

    rng = np.random.default_rng(0)
    canvas = rng.normal(225, 8, (300, 400)).clip(0, 255).astype(np.uint8)
    canvas[60:250, 180:205] = 30
    canvas[60:85, 120:260] = 30
    out = io.BytesIO()
    Image.fromarray(canvas).save(out, format="PNG")
    return out.getvalue()


def images() -> dict[str, bytes]:
    return {"mnist-png-112x112": (ROOT / "docs" / "examples" / "digit-7.png").read_bytes(),
            "scan-png-400x300": scan_png()}


def tree_cpu_s(pid: int) -> float:
    """CPU of the server and its live children (the decoder processes)."""
    total = cpu_s(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_s(int(child))
    return total


async def cell(target: str, body: bytes, concurrency: int, duration_s: float,
               pid: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_unary(CLASSIFY)
        for _ in range(5):
            await call(body, timeout=10)
        cpu0 = tree_cpu_s(pid)
        result = await closed_loop(call, body, concurrency, duration_s)
        cpu = tree_cpu_s(pid) - cpu0
    n = len(result.latencies_s)
    return {"rps": result.rps, "p50_ms": statistics.median(result.latencies_s) * 1e3,
            "cpu_ms": cpu / max(n, 1) * 1e3, "errors": float(result.errors)}


def in_process(data: bytes, rounds: int = 300) -> dict[str, float]:
    limits = ImageLimits()
    to_mnist(data, limits)
    t0 = time.perf_counter()
    for _ in range(rounds):
        to_mnist(data, limits)
    inline = (time.perf_counter() - t0) / rounds
    pool = DecoderPool(1, limits)
    try:
        for _ in range(5):
            pool.decode([data], 10.0)
        t0 = time.perf_counter()
        for _ in range(rounds):
            pool.decode([data], 10.0)
        pooled = (time.perf_counter() - t0) / rounds
    finally:
        pool.close()
    return {"inline_ms": inline * 1e3, "process_ms": pooled * 1e3}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra server flag, e.g. --server-arg=--frontend=aio (repeatable)")
    args = parser.parse_args()
    pin_self(1)
    files = images()
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = model_repo(Path(tmp))
        for r in range(args.repeats):
            port = free_port()
            cmd = service_command(repo, port, metrics_port=None,
                                  extra=["--image-decode-workers", "1", *args.server_arg])
            body = {name: {
                "images": pb.ClassifyRequest(images=[data]).SerializeToString(),
                "pixels": pb.ClassifyRequest(pixels=to_mnist(data, ImageLimits()).tobytes(),
                                             encoding=pb.ENCODING_UINT8).SerializeToString(),
            } for name, data in files.items()}
            first = next(iter(body.values()))["images"]

            def probe(ch: grpc.Channel, first: bytes = first) -> bool:
                ch.unary_unary(CLASSIFY)(first, timeout=10)
                return True

            proc, target = start_server(cmd, port, Path(tmp) / f"server-{r}.log", probe)
            try:
                for name in files:
                    for concurrency in (1, 8):
                        order = ("images", "pixels") if r % 2 == 0 else ("pixels", "images")
                        for kind in order:
                            got = asyncio.run(cell(target, body[name][kind], concurrency,
                                                   args.duration_s, proc.pid))
                            results.setdefault((name, kind, concurrency), []).append(got)
            finally:
                stop(proc)
    print(f"machine: {os.cpu_count()} cores, shared; python {sys.version.split()[0]}; "
          f"{args.repeats} rounds x {args.duration_s:g} s; median [min-max]; server flags "
          f"{' '.join(args.server_arg) or '(defaults)'}")
    print(f"{'image':18} {'c':>2} {'kind':7} {'req/s':>22} {'p50 ms':>22} {'CPU ms/req':>22}")
    for (name, kind, c), rows in results.items():
        print(f"{name:18} {c:>2} {kind:7} {spread([x['rps'] for x in rows]):>22} "
              f"{spread([x['p50_ms'] for x in rows]):>22} "
              f"{spread([x['cpu_ms'] for x in rows]):>22}"
              + (f"  errors {sum(x['errors'] for x in rows):g}"
                 if any(x["errors"] for x in rows) else ""))
    print("decoding's share of an image request's server CPU (1 - pixels/images, per round):")
    for name in files:
        for c in (1, 8):
            shares = [1 - p["cpu_ms"] / i["cpu_ms"] for i, p in
                      zip(results[(name, "images", c)], results[(name, "pixels", c)],
                          strict=True)]
            print(f"  {name:18} c={c}: {spread([100 * s for s in shares])} %")
    print("in this process, one image: to_mnist inline vs a decoder-process round trip (ms):")
    for name, data in files.items():
        rows: list[dict[str, Any]] = [in_process(data) for _ in range(args.repeats)]
        print(f"  {name:18} inline {spread([x['inline_ms'] for x in rows])}  "
              f"process {spread([x['process_ms'] for x in rows])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
