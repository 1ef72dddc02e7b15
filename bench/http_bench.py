"""Our KServe v2 REST infer vs MLServer's, side by side in one run: same model, same bodies,
same load generator.

Both servers run at once, each pinned to CPU 0 (only the one under load works); h2load
(bench/h2load.py) runs on CPU 1. MLServer serves the same models/mnist/1/model.npz through a
~30-line custom runtime (bench/mlserver_runtime.py) with `parallel_workers: 0`, so its
inference runs in its one process, as ours does, and a process's CPU time is the whole
server's. Bodies are the same JSON bytes to both (UINT8 pixels as `data`, what any REST
client sends); a `ours-binary` row adds our binary tensor extension, which MLServer lacks.
Cells alternate between the servers round by round; medians and ranges over rounds.

The forward pass alone (service.model.Model.predict on the same pixels, CPU 0) is timed in the
same run, so "server CPU beyond the forward pass" per request is server CPU per request minus
it: what serving costs, parsing through replying.

    scripts/install-bench-tools.sh   # h2load + MLServer's venv
    flock /tmp/mnist-bench.lock .venv/bin/python bench/http_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common
import h2load
from common import ROOT, cpu_s, env_without, free_port, pin, random_pixels, stop

MLSERVER = ROOT / ".tools" / "mlserver-venv" / "bin" / "mlserver"
MODEL = ROOT / "models" / "mnist" / "1" / "model.npz"
REQUESTS = {(1, 1): 3000, (1, 8): 6000, (1, 64): 10000,
            (256, 1): 300, (256, 8): 600, (256, 64): 1000}


def json_body(images: int) -> bytes:
    pixels = random_pixels(images)
    return json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                   "shape": [images, 784],
                                   "data": pixels.ravel().tolist()}]}).encode()


def binary_body(images: int) -> tuple[bytes, dict[str, str]]:
    raw = random_pixels(images).tobytes()
    head = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                   "shape": [images, 784],
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"not ready: {url}\n{log.read_text()[-3000:]}")


def start_ours(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port, http_port = free_port(), free_port()
    # 64 requests of 256 JSON images are 16384 images holding ~140 MB: more than the default
    # --max-queue-rows/--max-queue-bytes admit at once (the rest would get 429 at once, as on
    # the grpc.aio front end); MLServer queues without bound, so for the same load ours gets
    # room for all of them.
    cmd = common.service_command(ROOT / "models", port, metrics_port=free_port(),
                                 http_port=http_port,
                                 extra=["--max-queue-bytes", str(512 << 20),
                                        "--max-queue-rows", str(1 << 16)])
    log = tmp / "ours.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*pin(0), *cmd], cwd=ROOT, env=env_without("MNIST_"),
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    wait_http(f"{base}/v2/models/mnist/ready", proc, log)
    return proc, base


def start_mlserver(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    if not MLSERVER.exists():
        raise SystemExit(f"{MLSERVER} missing: run scripts/install-bench-tools.sh")
    home = tmp / "mlserver"
    (home / "mnist").mkdir(parents=True)
    (home / "mnist" / "mlserver_runtime.py").write_bytes(
        (ROOT / "bench" / "mlserver_runtime.py").read_bytes())
    http_port = free_port()
    (home / "settings.json").write_text(json.dumps({
        "http_port": http_port, "grpc_port": free_port(), "metrics_port": free_port(),
        "host": "127.0.0.1", "parallel_workers": 0, "debug": False}))
    (home / "mnist" / "model-settings.json").write_text(json.dumps({
        "name": "mnist", "implementation": "mlserver_runtime.NpzMLP",
        "parameters": {"uri": str(MODEL), "version": "1"}}))
    log = tmp / "mlserver.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*pin(0), str(MLSERVER), "start", str(home)], cwd=home,
                                stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    wait_http(f"{base}/v2/models/mnist/ready", proc, log)
    return proc, base


def forward_cpu_us(images: int, seconds: float = 1.0) -> float:
    """CPU µs of one Model.predict on `images` images, on CPU 0 like the servers."""
    from threadpoolctl import threadpool_limits

    from service.model import load_model, pixels_to_input

    model = load_model(ROOT / "models" / "mnist" / "1")
    x = pixels_to_input(random_pixels(images))
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    # One BLAS thread, as in the servers (pinned to one CPU before NumPy loaded): this
    # process loaded it with two, which would spin against each other on CPU 0.
    with threadpool_limits(1):
        model.predict(x)
        n, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            model.predict(x)
            n += 1
        cpu_us = (time.process_time() - start) / n * 1e6
    os.sched_setaffinity(0, before)
    return cpu_us


def measure(proc: subprocess.Popen[bytes], url: str, body: bytes, images: int, c: int,
            headers: dict[str, str] | None = None) -> dict[str, float]:
    n = REQUESTS[(images, c)]
    h2load.run(url, body, connections=c, requests=max(c * 4, n // 10), headers=headers)  # warm
    before = cpu_s(proc.pid)
    load = h2load.run(url, body, connections=c, requests=n, headers=headers)
    used = cpu_s(proc.pid) - before
    return {"rps": load.rps, "p50_ms": load.p50_ms, "cpu_us": used / load.ok * 1e6}


def _fmt(values: list[float], digits: int = 0) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 256])
    args = parser.parse_args()
    h2load.h2load()
    forward = {n: forward_cpu_us(n) for n in args.images}
    results: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="http-bench-") as tmp:
        ours, ours_url = start_ours(Path(tmp))
        theirs, theirs_url = start_mlserver(Path(tmp))
        try:
            for _ in range(args.rounds):
                for images in args.images:
                    body = json_body(images)
                    binary, headers = binary_body(images)
                    for c in args.concurrency:
                        for name, proc, base, data, extra in (
                            ("ours", ours, ours_url, body, None),
                            ("mlserver", theirs, theirs_url, body, None),
                            ("ours-binary", ours, ours_url, binary, headers),
                        ):
                            results.setdefault((name, images, c), []).append(measure(
                                proc, f"{base}/v2/models/mnist/infer", data, images, c, extra))
        finally:
            stop(ours)
            stop(theirs)
    print("forward pass alone (CPU µs, CPU 0): "
          + ", ".join(f"{n} images {us:.0f}" for n, us in forward.items()))
    print("\n| server | images | c | req/s median (range) | p50 ms | server CPU µs/req | "
          "beyond forward µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, images, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        cpu = [r["cpu_us"] for r in runs]
        print(f"| {name} | {images} | {c} | {_fmt([r['rps'] for r in runs])} | "
              f"{_fmt([r['p50_ms'] for r in runs], 2)} | {_fmt(cpu)} | "
              f"{statistics.median(cpu) - forward[images]:.0f} |")
    print("\nratios (median over rounds; ours JSON / MLServer):")
    for images in args.images:
        for c in args.concurrency:
            o, m = results[("ours", images, c)], results[("mlserver", images, c)]
            rps = statistics.median(r["rps"] for r in o) / statistics.median(
                r["rps"] for r in m)
            p50 = statistics.median(r["p50_ms"] for r in o) / statistics.median(
                r["p50_ms"] for r in m)
            beyond_o = statistics.median(r["cpu_us"] for r in o) - forward[images]
            beyond_m = statistics.median(r["cpu_us"] for r in m) - forward[images]
            print(f"  {images:>3} images c={c:<2}: req/s x{rps:.2f}, p50 x{p50:.2f}, "
                  f"CPU beyond forward {beyond_o:.0f}/{beyond_m:.0f} µs = "
                  f"{beyond_o / beyond_m:.3f}")


if __name__ == "__main__":
    sys.exit(main())
