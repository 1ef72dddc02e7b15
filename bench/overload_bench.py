"""Goodput under overload, both front ends, as ratios against a normal load in the same run.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/overload_bench.py [--repeats 3]

For each front end (`core`, the default, and `aio`) and each round, one server (our server as
shipped, pinned to CPU 0) meets these phases in turn; the load generators are separate
processes pinned to CPU 1, each caller on its own connection unless stated:
  b64      64 callers x 256 images, retrying 50 ms after RESOURCE_EXHAUSTED (the baseline)
  b500     500 callers x 256 images, same; plus one well-behaved extra caller (one 256-image
           request every 50 ms, on its own connection) whose every answer is timed
  r16      16 callers x 256 images retrying at once after RESOURCE_EXHAUSTED (baseline)
  r64      64 such callers
  r128     128 such callers (not a target: shows the design holds past the queue's size)
  s16      16 callers x 1 image retrying at once (baseline)
  s2000    2,000 concurrent 1-image streams over 20 connections, retrying at once
Reported per phase: completed req/s and images/s, p50/p99 of the admitted (OK) requests,
refusals/s and their p99, the server's peak RSS during the phase. Targets (issue 11, section
2): b500 req/s >= 0.8 x b64; b500 p99 <= 4 x b64 p99; the extra caller's RESOURCE_EXHAUSTED
answers p99 <= 20 ms (its OK answers wait in the queue like everyone's); r64 images/s >= 0.8 x
r16; s2000 images/s >= 0.8 x s16; RSS bounded by --max-queue-bytes, not by the callers.
--hidden N serves a random 784-N-10 model instead of models/mnist/1 (whose forward is slow on
some CPUs: docs/serving.md, "Overload").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from common import (
    BIG_MESSAGES,
    CLASSIFY,
    ROOT,
    classify_probe,
    classify_request,
    cpu_s,
    free_port,
    model_repo,
    percentile_ms,
    pin,
    service_command,
    start_server,
    stop,
)

# name -> (images per request, callers, connections, backoff after RESOURCE_EXHAUSTED or None)
PHASES: dict[str, tuple[int, int, int, float | None]] = {
    "b64": (256, 64, 64, 0.05),
    "b500": (256, 500, 500, 0.05),
    "r16": (256, 16, 16, None),
    "r64": (256, 64, 64, None),
    "r128": (256, 128, 128, None),
    "s16": (1, 16, 16, None),
    "s2000": (1, 2000, 20, None),
}
LOAD_PROCESSES = 2  # load generator processes per phase (the extra caller is one more)
EXTRA_PERIOD_S = 0.05


# --- the load generator (a subprocess) ------------------------------------------------------

async def _load(target: str, images: int, callers: int, connections: int,
                backoff_s: float | None, start_at: float, duration_s: float,
                period_s: float | None) -> dict[str, Any]:
    """`callers` closed-loop callers over `connections` channels from `start_at` (time.time())
    for `duration_s`; with `period_s`, each caller waits that long between its calls (the
    well-behaved extra caller)."""
    body = classify_request(images, packed_output=True)
    options = [*BIG_MESSAGES, ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    ok: list[float] = []
    refused: list[float] = []
    other: dict[str, int] = {}
    await asyncio.gather(*(ch.channel_ready() for ch in channels))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    end = time.perf_counter() + duration_s

    async def caller(i: int) -> None:
        call = channels[i % connections].unary_unary(CLASSIFY)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await call(body, timeout=max(0.1, end - t0 + 5.0))
            except grpc.aio.AioRpcError as e:
                t1 = time.perf_counter()
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    if t1 < end:
                        refused.append(t1 - t0)
                    if backoff_s is not None:
                        await asyncio.sleep(backoff_s)
                else:
                    other[e.code().name] = other.get(e.code().name, 0) + 1
                continue
            t1 = time.perf_counter()
            if t1 < end:
                ok.append(t1 - t0)
            if period_s is not None:
                await asyncio.sleep(period_s)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    for ch in channels:
        await ch.close()
    return {"ok": ok, "refused": refused, "other": other}


def run_load(args: argparse.Namespace) -> None:
    out = asyncio.run(_load(args.target, args.images, args.callers, args.connections,
                            args.backoff_s if args.backoff_s >= 0 else None, args.start_at,
                            args.duration_s, args.period_s if args.period_s > 0 else None))
    json.dump(out, sys.stdout)


def spawn_load(target: str, images: int, callers: int, connections: int,
                backoff_s: float | None, start_at: float, duration_s: float,
                period_s: float = 0.0) -> subprocess.Popen[bytes]:
    cmd = [*pin(1), sys.executable, __file__, "--load", "--target", target,
           "--images", str(images), "--callers", str(callers), "--connections",
           str(connections), "--backoff-s", str(-1 if backoff_s is None else backoff_s),
           "--start-at", repr(start_at), "--duration-s", str(duration_s),
           "--period-s", str(period_s)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE)


# --- the coordinator ------------------------------------------------------------------------

def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """The most RSS the server had while running (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, _rss_bytes(self.pid))
            except OSError:
                return

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def measure_phase(proc: subprocess.Popen[bytes], target: str, name: str,
                  duration_s: float) -> dict[str, float]:
    images, callers, connections, backoff_s = PHASES[name]
    start_at = time.time() + 2.0 + callers / 500  # time to open the connections
    parts = min(LOAD_PROCESSES, connections)
    loads = [spawn_load(target, images, c, k, backoff_s, start_at, duration_s)
             for c, k in zip(split(callers, parts), split(connections, parts), strict=True)]
    extra = (spawn_load(target, images, 1, 1, 0.05, start_at, duration_s, EXTRA_PERIOD_S)
             if name == "b500" else None)
    while time.time() < start_at:
        time.sleep(0.01)
    sampler = RssSampler(proc.pid)
    cpu0 = cpu_s(proc.pid)
    time.sleep(duration_s)
    cpu_used = cpu_s(proc.pid) - cpu0
    results = [json.loads(p.communicate(timeout=duration_s + 120)[0]) for p in loads]
    rss = sampler.close()
    ok = [v for r in results for v in r["ok"]]
    refused = [v for r in results for v in r["refused"]]
    other = sum(n for r in results for n in r["other"].values())
    out = {"rps": len(ok) / duration_s, "ips": len(ok) * images / duration_s,
           "p50_ms": percentile_ms(ok, 50) if ok else float("nan"),
           "p99_ms": percentile_ms(ok, 99) if ok else float("nan"),
           "refused_per_s": len(refused) / duration_s,
           "refused_p99_ms": percentile_ms(refused, 99) if refused else float("nan"),
           "other_errors": float(other), "rss_mib": rss / 2**20,
           # the server's CPU use during the phase (1.0: its whole core) and per call answered
           "cpu_share": cpu_used / duration_s,
           "cpu_us_per_call": 1e6 * cpu_used / max(1, len(ok) + len(refused))}
    if extra is not None:
        e = json.loads(extra.communicate(timeout=duration_s + 120)[0])
        answers = e["ok"] + e["refused"]
        out["extra_p99_ms"] = percentile_ms(answers, 99) if answers else float("nan")
        out["extra_ok_share"] = len(e["ok"]) / max(1, len(answers))
        out["extra_refused_p99_ms"] = (percentile_ms(e["refused"], 99) if e["refused"]
                                       else float("nan"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--callers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backoff-s", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--period-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--duration-s", type=float, default=4.0, help="per phase")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--frontends", default="core,aio")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--server-args", default="", help="extra flags for the server")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server only (repeatable)")
    parser.add_argument("--hidden", type=int, default=0,
                        help="serve a synthetic 784-N-10 model instead of models/mnist/1")
    args = parser.parse_args()
    if args.load:
        run_load(args)
        return 0
    frontends = args.frontends.split(",")
    phases = args.phases.split(",")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = model_repo(Path(tmp), args.hidden)
        for r in range(args.repeats):
            for frontend in frontends:
                port = free_port()
                cmd = service_command(repo, port, metrics_port=None,
                                      extra=["--frontend", frontend, *args.server_args.split()])
                proc, target = start_server(
                    cmd, port, Path(tmp) / f"{frontend}.log",
                    classify_probe(classify_request(1, packed_output=True)), name=frontend,
                    env={**os.environ, **dict(v.split("=", 1) for v in args.server_env)})
                try:
                    for name in phases:
                        out = measure_phase(proc, target, name, args.duration_s)
                        results.setdefault((frontend, name), []).append(out)
                        print(f"round {r + 1} {frontend:4} {name:6} {out['rps']:7.0f} req/s "
                              f"{out['ips']:9.0f} img/s p99 {out['p99_ms']:8.1f} ms "
                              f"refused {out['refused_per_s']:6.0f}/s "
                              f"rss {out['rss_mib']:6.0f} MiB cpu {out['cpu_share']:.2f} "
                              f"({out['cpu_us_per_call']:.0f} us/call)"
                              + (f" other errors {out['other_errors']:.0f}"
                                 if out["other_errors"] else "")
                              + (f" extra p99 {out['extra_p99_ms']:.1f} ms (refusals "
                                 f"{out['extra_refused_p99_ms']:.1f} ms)"
                                 if "extra_p99_ms" in out else ""),
                              file=sys.stderr, flush=True)
                finally:
                    stop(proc)
    report(results, frontends, phases, args)
    return 0


def _fmt(values: list[float]) -> str:
    """median [min-max] of one metric across rounds."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def report(results: dict[tuple[str, str], list[dict[str, float]]], frontends: list[str],
           phases: list[str], args: argparse.Namespace) -> None:
    print(f"\nmedian [min-max] of {args.repeats} rounds, {args.duration_s} s a phase; server "
          "on CPU 0, load generators on CPU 1\n")
    print("| front end | phase | req/s | images/s | p50 ms | p99 ms | refused/s | "
          "refused p99 ms | server peak RSS MiB | server CPU share | server CPU us a call |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in frontends:
        for name in phases:
            rs = results[(f, name)]
            cells = [_fmt([x[m] for x in rs]) for m in
                     ("rps", "ips", "p50_ms", "p99_ms", "refused_per_s", "refused_p99_ms",
                      "rss_mib", "cpu_share", "cpu_us_per_call")]
            print(f"| {f} | {name} | " + " | ".join(cells) + " |")
    print("\n| front end | ratio (per round, same server) | value | target |")
    print("|---|---|---:|---|")
    checks = [
        ("b500 / b64 req/s", "b500", "b64", "rps", ">= 0.80"),
        ("b500 / b64 p99 of admitted", "b500", "b64", "p99_ms", "<= 4"),
        ("r64 / r16 images/s", "r64", "r16", "ips", ">= 0.80"),
        ("r128 / r16 images/s", "r128", "r16", "ips", "(info)"),
        ("s2000 / s16 images/s", "s2000", "s16", "ips", ">= 0.80"),
        ("b500 / b64 server peak RSS", "b500", "b64", "rss_mib", "(info)"),
    ]
    for f in frontends:
        for label, a, b, metric, target in checks:
            if (f, a) in results and (f, b) in results:
                ratios = [x[metric] / y[metric]
                          for x, y in zip(results[(f, a)], results[(f, b)], strict=True)]
                print(f"| {f} | {label} | {_fmt(ratios)} | {target} |")
        if (f, "b500") in results:
            rs = results[(f, "b500")]
            print(f"| {f} | extra caller p99 ms of its RESOURCE_EXHAUSTED answers | "
                  f"{_fmt([x['extra_refused_p99_ms'] for x in rs])} | <= 20 |")
            print(f"| {f} | extra caller p99 ms of every answer | "
                  f"{_fmt([x['extra_p99_ms'] for x in rs])} | (info) |")
            print(f"| {f} | extra caller share answered OK | "
                  f"{_fmt([x['extra_ok_share'] for x in rs])} | (info) |")


if __name__ == "__main__":
    sys.exit(main())
