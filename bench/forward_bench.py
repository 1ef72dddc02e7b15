"""The forward pass alone: the committed model's weights as stored vs as the server uses them.

    flock /tmp/mnist-bench.lock .venv/bin/python bench/forward_bench.py [--rows 256] [--repeats 200]

`Model` construction (service/model.py, `_parameter`) reads subnormal weights (|w| < 1.18e-38)
as zero, because a matrix product over them runs on a slow path of x86 CPUs. This measures the
default model's forward both ways in one run, on one core with one BLAS thread, and checks the
answers are identical. Reports min and median milliseconds and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from service.model import WEIGHTS_FILE, forward, load_model

ROOT = Path(__file__).resolve().parent.parent


def timings(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist" / "1")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    model = load_model(args.model)
    with np.load(args.model / WEIGHTS_FILE, allow_pickle=False) as raw:
        stored_w = [raw[f"W{i}"] for i in range(len(model.weights))]
        stored_b = [raw[f"b{i}"] for i in range(len(model.biases))]
    tiny = np.finfo(np.float32).tiny
    subnormal = sum(int(((w != 0) & (np.abs(w) < tiny)).sum()) for w in stored_w + stored_b)
    x = np.random.default_rng(0).random((args.rows, model.layer_sizes[0]), dtype=np.float32)

    def as_stored() -> object:
        return forward(x, stored_w, stored_b, model.activations, model.output)

    with threadpool_limits(1):
        same = np.array_equal(as_stored(), model.predict(x))
        stored = timings(as_stored, args.repeats)
        served = timings(lambda: model.predict(x), args.repeats)
    print(f"model {args.model}: {subnormal} subnormal parameters in the file; "
          f"answers identical: {same}")
    for name, t in (("as stored", stored), ("as served", served)):
        print(f"{name:10} {args.rows}-row forward: min {min(t):.3f} ms, "
              f"median {statistics.median(t):.3f} ms")
    print(f"stored / served (median): {statistics.median(stored) / statistics.median(served):.1f}x")


if __name__ == "__main__":
    main()
