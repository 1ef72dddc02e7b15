"""Probe: would a threaded grpc.server front end feeding a batcher reach 0.80 of bare threaded?

    flock /tmp/mnist-bench.lock .venv/bin/python bench/threaded_probe.py [--duration-s 2]
        [--repeats 3] [--hidden 128] [--probe-workers 80,64,128] [--policy peak]

Not the service: a self-contained prototype, to measure before redesigning the front end.
`grpc.server(ThreadPoolExecutor(max_workers=N))` serves mnist.v1.Classifier/Classify through a
generic raw-bytes handler. A handler parses and decodes with service.dataplane.codec (as our
servicer does), puts (rows, concurrent.futures.Future) on a queue and blocks on the future; one
batch thread waits for the first item, optionally waits a little for more ("peak": while fewer
are queued than were outstanding at the busiest moment since the previous flush, at most
--max-wait-s after the oldest arrived, as service/batching/ does; "drain": never), takes up to
--max-rows rows, runs ONE Model.predict on the stacked rows and completes the futures. The
handler encodes the packed reply with service.dataplane.codec.encode_response.

Measured side by side (servers pinned to CPU 0, this load generator on CPU 1, servers
restarted each round, medians): bare-threaded (serve_bench's), ours (`python -m service`, as
serve_bench starts it) and the probe at each --probe-workers, 1 image a request at
concurrency 1, 8 and 64; ratios against bare-threaded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import serve_bench
from common import (
    BIG_MESSAGES,
    classify_probe,
    classify_request,
    free_port,
    median_per_metric,
    model_repo,
    pin_self,
    start_server,
    stop,
)

from service.dataplane.codec import decode_pixels, encode_response, parse_request
from service.errors import InvalidInput
from service.model import load_model
from service.registry import ServableVersion

SHAPES = [(1, 1), (1, 8), (1, 64)]
MAX_IMAGES = 4096


class ThreadBatcher:
    """Handlers call `submit` (blocking); one daemon thread forms batches and runs forwards."""

    def __init__(self, servable: ServableVersion, max_rows: int, max_wait_s: float,
                 policy: str) -> None:
        self._sv = servable
        self._max_rows = max_rows
        self._max_wait = max_wait_s if policy == "peak" else 0.0
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[np.ndarray, futures.Future[np.ndarray], float]] = deque()
        self._outstanding = 0
        self._peak = 0
        self._target = 1
        threading.Thread(target=self._run, name="batcher", daemon=True).start()

    def submit(self, x: np.ndarray, timeout_s: float) -> np.ndarray:
        fut: futures.Future[np.ndarray] = futures.Future()
        with self._cond:
            self._queue.append((x, fut, time.monotonic()))
            self._outstanding += 1
            if self._outstanding > self._peak:
                self._peak = self._outstanding
            self._cond.notify()
        return fut.result(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                if self._max_wait > 0:
                    until = self._queue[0][2] + self._max_wait
                    while len(self._queue) < self._target:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                batch = [self._queue.popleft()]
                rows = len(batch[0][0])
                while self._queue and rows + len(self._queue[0][0]) <= self._max_rows:
                    item = self._queue.popleft()
                    rows += len(item[0])
                    batch.append(item)
                self._target = max(1, self._peak)
                self._peak = self._outstanding
            try:
                xs = [x for x, _, _ in batch]
                probs = self._sv.model.predict(xs[0] if len(xs) == 1 else np.concatenate(xs))
                start = 0
                for x, fut, _ in batch:
                    fut.set_result(probs[start:start + len(x)])
                    start += len(x)
            except Exception as e:  # never let the thread die: waiters would hang
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(e)
            with self._cond:
                self._outstanding -= len(batch)


def run_probe(port: int, model_dir: Path, workers: int, max_rows: int, max_wait_s: float,
              policy: str) -> None:
    """The prototype server, until killed (SIGTERM ends the process)."""
    import gc

    sv = ServableVersion(name="mnist", version=1, model=load_model(model_dir), path=model_dir,
                         loaded_at=time.time())
    batcher = ThreadBatcher(sv, max_rows, max_wait_s, policy)

    def classify(raw: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            request = parse_request(raw)
            x = decode_pixels(request, MAX_IMAGES)
        except InvalidInput as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = context.time_remaining()
        probs = batcher.submit(x, remaining if remaining is not None else 30.0)
        return encode_response(probs, sv, request.request_id,
                               request.packed_output).SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         options=[*BIG_MESSAGES, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "mnist.v1.Classifier", {"Classify": grpc.unary_unary_rpc_method_handler(classify)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    gc.collect()  # as service/server.py's _tune_gc: startup objects frozen, fewer young gcs
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(10_000, gen1, gen2)
    print(f"event=listening port={port} workers={workers} policy={policy}", flush=True)
    server.wait_for_termination()


def start_probe(model_dir: Path, log_dir: Path, workers: int,
                args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), "--model-dir",
           str(model_dir), "--workers", str(workers), "--max-rows", str(args.max_rows),
           "--max-wait-s", str(args.max_wait_s), "--policy", args.policy]
    return start_server(cmd, port, log_dir / f"probe-{workers}.log",
                        classify_probe(classify_request(1, packed_output=True)),
                        name=f"probe-{workers}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=80, help=argparse.SUPPRESS)
    parser.add_argument("--duration-s", type=float, default=2.0, help="per cell")
    parser.add_argument("--max-requests", type=int, default=200_000, help="per cell")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--hidden", type=int, default=0,
                        help="serve a synthetic 784-N-10 model instead of models/mnist/1")
    parser.add_argument("--probe-workers", default="80",
                        help="comma-separated ThreadPoolExecutor sizes, one probe server each")
    parser.add_argument("--policy", choices=("peak", "drain"), default="peak",
                        help="peak: wait like service/batching/; drain: take what is queued")
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--max-wait-s", type=float, default=0.002)
    parser.add_argument("--no-ours", action="store_true", help="skip `python -m service`")
    args = parser.parse_args()
    if args.serve:
        run_probe(args.port, args.model_dir, args.workers, args.max_rows, args.max_wait_s,
                  args.policy)
        return 0
    pin_self(1)
    probes = [int(w) for w in args.probe_workers.split(",")]
    servers = ["bare-threaded", *([] if args.no_ours else ["ours"]),
               *(f"probe-{w}" for w in probes)]
    results: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        repo = model_repo(Path(tmp), args.hidden)
        sizes = load_model(repo / "mnist" / "1").layer_sizes
        print(f"model {'-'.join(map(str, sizes))}; {args.repeats} rounds of {args.duration_s} s "
              f"cells; policy {args.policy}", file=sys.stderr)
        for r in range(args.repeats):
            for kind in servers:
                if kind.startswith("probe-"):
                    proc, target = start_probe(repo / "mnist" / "1", Path(tmp),
                                               int(kind.removeprefix("probe-")), args)
                else:
                    proc, target = serve_bench.start(kind, repo, Path(tmp))
                try:
                    for images, conc in SHAPES:
                        out = serve_bench.measure_with_cpu(
                            proc, target, images, conc, args.duration_s, args.max_requests
                        )
                        results.setdefault((kind, images, conc), []).append(out)
                        print(f"round {r + 1} {kind:13} c{conc:<3} {out['rps']:8.0f} req/s "
                              f"{out['p50_ms']:7.3f} ms p50 {out['cpu_us']:5.0f} us/req",
                              file=sys.stderr)
                finally:
                    stop(proc)
    med = median_per_metric(results)
    per_round = {k: [round(v["rps"]) for v in vs] for k, vs in results.items()}
    print(f"\nmodel {'-'.join(map(str, sizes))}; medians of {args.repeats} rounds, "
          f"{args.duration_s} s per cell; 1 image/request; server on CPU 0, client on CPU 1; "
          f"probe policy {args.policy}\n")
    print("| server | concurrency | req/s | p50 ms | p99 ms | errors | server CPU us/req "
          "| req/s vs bare-threaded | p50 vs bare-threaded | req/s per round |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for kind in servers:
        for images, conc in SHAPES:
            m, b = med[(kind, images, conc)], med[("bare-threaded", images, conc)]
            print(f"| {kind} | {conc} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} "
                  f"| {m['errors']:.0f} | {m['cpu_us']:.0f} | {m['rps'] / b['rps']:.2f} "
                  f"| {m['p50_ms'] / b['p50_ms']:.2f} "
                  f"| {', '.join(map(str, per_round[(kind, images, conc)]))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
