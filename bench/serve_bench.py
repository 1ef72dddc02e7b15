"""Serving throughput and latency, as ratios against bare gRPC servers measured in the same run.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/serve_bench.py [--duration-s 2] [--repeats 3]

Servers (each a subprocess pinned to CPU 0 with taskset; the load generator is pinned to CPU 1):
  bare-aio       grpc.aio server, same method path, no work: returns a prebuilt reply
  bare-threaded  threaded grpc.server, same
  bare-core      service.frontends.core.CoreServer, same, as a fast method answered at once: the
                 floor of the front end `ours` is built on (for information; the issue's
                 target is against the faster of bare-aio and bare-threaded)
  nobatch        our server with --no-batching (each request its own forward)
  ours           our server as shipped (dynamic batching)
  baseline       our server from another source tree (--baseline-tree, e.g. a `git worktree
                 add /work/wt-old <commit>` of the commit before a change), same interpreter
                 and flags: with it the rounds alternate baseline/ours and the table ends
                 with new/old ratios (issue 12: c64 1-image req/s and 256-image images/s
                 >= 0.97x old, c1 1-image p50 <= 1.03x old)
Shapes: 1 image and 256 images per request at concurrency 1, 8 and 64 (closed loop, asyncio,
pre-serialized requests asking for the packed reply, as ClassifierClient does; bounded by
--duration-s and --max-requests per cell). Each cell is
repeated --repeats times (servers restarted each round) and the median is reported.
A/B:   flock /tmp/mnist-bench.lock .venv/bin/python bench/serve_bench.py \
           --baseline-tree /work/wt-old --servers baseline,ours --shapes 1x1,1x64,256x8
Targets (issue 3): c64 1-image >= 80% of the faster bare server's req/s; c1 1-image p50 <=
1.3x the faster bare server's; 256-image >= 150,000 images/s; ours beats nobatch at c64.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from common import (
    BIG_MESSAGES,
    CLASSIFY,
    classify_probe,
    classify_request,
    cpu_s,
    free_port,
    measure_cell,
    median_per_metric,
    model_repo,
    pin_self,
    service_command,
    start_server,
    stop,
)

from service.pb.mnist.v1 import classifier_pb2 as pb

EXTRA: list[str] = []
BASELINE_TREE: list[str] = []  # the source tree the "baseline" server runs from, if any
SERVERS = ("bare-aio", "bare-threaded", "bare-core", "nobatch", "ours")
# (images per request, concurrency)
SHAPES: list[tuple[int, ...]] = [(1, 1), (1, 8), (1, 64), (256, 1), (256, 8), (256, 64)]


# --- the bare servers ---------------------------------------------------------------------

def _bare_reply(raw: bytes, cache: dict[int, bytes]) -> bytes:
    """A reply of the right size for the request, built once per size: no per-call work."""
    n = max(1, len(raw) // 784)
    reply = cache.get(n)
    if reply is None:
        reply = pb.ClassifyResponse(  # the packed form our client asks for
            model="mnist", version=1, labels=[0] * n, probabilities_f32le=bytes(40 * n),
        ).SerializeToString()
        cache[n] = reply
    return reply


def run_bare(kind: str, port: int) -> None:
    cache: dict[int, bytes] = {}
    options = [*BIG_MESSAGES, ("grpc.so_reuseport", 0)]
    if kind == "core":
        from service.frontends.core import CoreServer, FastCall

        def answer(call: FastCall, raw: bytes) -> None:
            call.reply(_bare_reply(raw, cache))

        async def main_core() -> None:
            server = CoreServer(options)
            server.add_fast_method(CLASSIFY, answer)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            print(f"event=listening port={port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(main_core())
    elif kind == "aio":
        async def handle(raw: bytes, context: Any) -> bytes:
            return _bare_reply(raw, cache)

        async def main() -> None:
            server = grpc.aio.server(options=options)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "mnist.v1.Classifier", {"Classify": grpc.unary_unary_rpc_method_handler(handle)}),))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            print(f"event=listening port={port}", flush=True)
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        def handle_sync(raw: bytes, context: Any) -> bytes:
            return _bare_reply(raw, cache)

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
        handler = grpc.unary_unary_rpc_method_handler(handle_sync)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "mnist.v1.Classifier", {"Classify": handler}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print(f"event=listening port={port}", flush=True)
        server.wait_for_termination()


# --- starting servers ---------------------------------------------------------------------

def start(kind: str, model_dir: Path, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One of SERVERS on CPU 0, returned once it answers a packed 1-image request."""
    port = free_port()
    if kind.startswith("bare-"):
        cmd = [sys.executable, __file__, "--bare", kind.removeprefix("bare-"), "--port", str(port)]
    else:
        # ours-http: ours with the REST port open and idle (`--servers ours,ours-http`).
        cmd = service_command(model_dir, port, metrics_port=free_port(), extra=EXTRA,
                              http_port=free_port() if kind == "ours-http" else 0)
        if kind == "nobatch":
            cmd.append("--no-batching")
        if kind == "baseline":
            # `python -m service` with the other tree first on sys.path (the -c form: -m would
            # put this tree, the working directory, first).
            tree = BASELINE_TREE[0]
            boot = (f"import runpy, sys; sys.path.insert(0, {tree!r}); "
                    "runpy.run_module('service', run_name='__main__', alter_sys=True)")
            cmd = [cmd[0], "-c", boot, *cmd[3:]]
    return start_server(cmd, port, log_dir / f"{kind}.log",
                        classify_probe(classify_request(1, packed_output=True)), name=kind)



def measure_with_cpu(
    proc: subprocess.Popen[bytes], target: str, images: int, conc: int, duration_s: float,
    max_requests: int,
) -> dict[str, float]:
    """One Classify cell, plus the server's CPU per answered request: steadier than req/s on
    a busy machine (it does not count time the server's core was taken away)."""
    before = cpu_s(proc.pid)
    out = asyncio.run(measure_cell(
        target, CLASSIFY, classify_request(images, packed_output=True),
        images, conc, duration_s, max_requests))
    answered = max(1.0, out["rps"] * out["elapsed_s"])
    out["cpu_us"] = (cpu_s(proc.pid) - before) / answered * 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", choices=("aio", "threaded", "core"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--duration-s", type=float, default=2.0, help="per cell")
    parser.add_argument("--max-requests", type=int, default=200_000, help="per cell")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--hidden", type=int, default=0,
                        help="serve a synthetic 784-N-10 model instead of models/mnist/1")
    parser.add_argument("--shapes", default="", help="e.g. '1x1,1x64' (images x concurrency)")
    parser.add_argument("--server-args", default="", help="extra flags for our servers")
    parser.add_argument("--baseline-tree", default="",
                        help="source tree of the 'baseline' server (A/B against 'ours')")
    args = parser.parse_args()
    if args.bare:
        run_bare(args.bare, args.port)
        return 0
    pin_self(1)  # the load generator on the other core
    servers = args.servers.split(",")
    if args.shapes:
        SHAPES[:] = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    EXTRA[:] = args.server_args.split()
    if args.baseline_tree:
        tree = Path(args.baseline_tree).resolve()
        if not (tree / "service" / "__main__.py").is_file():
            raise SystemExit(f"--baseline-tree {tree}: expected a source tree with service/")
        BASELINE_TREE[:] = [str(tree)]
        if "baseline" not in servers:
            servers.insert(0, "baseline")
    elif "baseline" in servers:
        raise SystemExit("server 'baseline' needs --baseline-tree")
    results: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = model_repo(Path(tmp), args.hidden)
        from service.model import load_model

        sizes = load_model(repo / "mnist" / "1").layer_sizes
        print(f"model {'-'.join(map(str, sizes))} from {repo}; {args.repeats} rounds of "
              f"{args.duration_s} s cells", file=sys.stderr)
        for r in range(args.repeats):
            # Alternate the order each round: drift on a shared machine favours neither.
            for kind in (servers if r % 2 == 0 else servers[::-1]):
                proc, target = start(kind, repo, Path(tmp))
                try:
                    for images, conc in SHAPES:
                        out = measure_with_cpu(
                            proc, target, images, conc, args.duration_s, args.max_requests
                        )
                        results.setdefault((kind, images, conc), []).append(out)
                        print(f"round {r + 1} {kind:13} {images:3} img c{conc:<3} "
                              f"{out['rps']:8.0f} req/s {out['p50_ms']:7.3f} ms p50",
                              file=sys.stderr)
                finally:
                    stop(proc)
    med = median_per_metric(results)
    print(f"\nmodel {'-'.join(map(str, sizes))}; medians of {args.repeats} rounds, "
          f"{args.duration_s} s per cell; server on CPU 0, client on CPU 1\n")
    print("| server | images/req | concurrency | req/s | images/s | p50 ms | p99 ms | errors "
          "| server CPU us/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind in servers:
        for images, conc in SHAPES:
            m = med[(kind, images, conc)]
            print(f"| {kind} | {images} | {conc} | {m['rps']:.0f} | {m['ips']:.0f} | "
                  f"{m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['errors']:.0f} | "
                  f"{m['cpu_us']:.0f} |")
    if {"baseline", "ours"} <= set(servers):
        print_ab(med, results)
    if {"ours", "ours-http"} <= set(servers):
        print("\n| with the HTTP port open and idle / without | value | target |\n|---|---:|---|")
        for images, conc in SHAPES:
            o, h = med[("ours", images, conc)], med[("ours-http", images, conc)]
            print(f"| {images} img c{conc} req/s | {h['rps'] / o['rps']:.3f} | >= 0.97 |")
            print(f"| {images} img c{conc} p50 | {h['p50_ms'] / o['p50_ms']:.3f} | <= 1.03 |")
    if {"bare-aio", "bare-threaded", "ours", "nobatch"} <= set(servers):
        def g(kind: str, images: int, conc: int, metric: str) -> float:
            return med[(kind, images, conc)][metric]

        bare64 = max(g("bare-aio", 1, 64, "rps"), g("bare-threaded", 1, 64, "rps"))
        bare_p50 = min(g("bare-aio", 1, 1, "p50_ms"), g("bare-threaded", 1, 1, "p50_ms"))
        best256 = max(g("ours", 256, c, "ips") for c in (1, 8, 64))
        checks = [
            ("c64 1-image req/s vs faster bare", g("ours", 1, 64, "rps") / bare64, ">= 0.80"),
            ("c1 1-image p50 vs faster bare", g("ours", 1, 1, "p50_ms") / bare_p50, "<= 1.30"),
            ("256-image images/s (best c) / 150,000", best256 / 150_000, ">= 1.00"),
            ("c64 1-image batching / no batching",
             g("ours", 1, 64, "rps") / g("nobatch", 1, 64, "rps"), "> 1.00"),
            ("c64 1-image bare-aio / bare-threaded",
             g("bare-aio", 1, 64, "rps") / g("bare-threaded", 1, 64, "rps"), "(info)"),
        ]
        if "bare-core" in servers:
            checks += [
                ("c64 1-image ours / bare-core (its own floor)",
                 g("ours", 1, 64, "rps") / g("bare-core", 1, 64, "rps"), "(info)"),
                ("c1 1-image p50 ours / bare-core",
                 g("ours", 1, 1, "p50_ms") / g("bare-core", 1, 1, "p50_ms"), "(info)"),
            ]
        print("\n| ratio | value | target |\n|---|---:|---|")
        for name, value, target in checks:
            print(f"| {name} | {value:.2f} | {target} |")
    return 0


def print_ab(med: dict[tuple[str, int, int], dict[str, float]],
             results: dict[tuple[str, int, int], list[dict[str, float]]]) -> None:
    """New (ours) / old (baseline) per shape, with issue 12's bounds: the ratio of the
    medians, and the median and range of the per-round ratios (each round measures both
    back to back, so on a shared machine the paired ratio drifts less)."""
    print("\n| A/B new/old | ratio of medians | paired median | paired range | target |\n"
          "|---|---:|---:|---:|---|")

    def row(name: str, images: int, conc: int, metric: str, target: str) -> None:
        new, old = results[("ours", images, conc)], results[("baseline", images, conc)]
        paired = sorted(n[metric] / o[metric] for n, o in zip(new, old, strict=False))
        ratio = med[("ours", images, conc)][metric] / med[("baseline", images, conc)][metric]
        print(f"| {name} | {ratio:.3f} | {statistics.median(paired):.3f} | "
              f"{paired[0]:.3f}-{paired[-1]:.3f} | {target} |")

    for images, conc in SHAPES:
        if images == 1 and conc == 1:
            row("c1 1-image p50", 1, 1, "p50_ms", "<= 1.03")
        metric, what = ("rps", "req/s") if images == 1 else ("ips", "images/s")
        target = ">= 0.97" if (images, conc) == (1, 64) or images == 256 else "(info)"
        row(f"c{conc} {images}-image {what}", images, conc, metric, target)


if __name__ == "__main__":
    sys.exit(main())
