"""Recording cost per request, this checkout against another one, side by side in one run.

    git worktree add /tmp/mnist-old <commit>   # (or git archive <commit> | tar -x -C DIR)
    flock /tmp/mnist-bench.lock .venv/bin/python bench/metrics_ab.py /tmp/mnist-old [--runs 7]

Each run is a fresh interpreter importing one checkout's `service.metrics` and timing, in CPU
seconds of that process (less sensitive than wall clock to a shared machine's load), what
bench/metrics_bench.py part 3 times: one request's metric calls in a stream of batches of a
given size, with its share of the flush (scrape) that records 100 batches. Runs alternate
between the two checkouts; medians and ranges are printed, and new/old ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((1, 43.0), (1, 8.0), (16, 235.0), (1, 1.0))  # (images per request, batch rows)

_SNIPPET = """
import sys, time
import numpy as np
from prometheus_client import CollectorRegistry
from service.metrics import Metrics
images, batch_rows = int(sys.argv[1]), float(sys.argv[2])
m = Metrics(CollectorRegistry())
m.version_available("mnist", 1, 0.01)
rng = np.random.default_rng(1)
b = max(1, round(batch_rows))
p = rng.dirichlet(np.ones(10), size=b).astype(np.float32)
waits = list(rng.uniform(0, 0.002, max(1, b // images)))
def hundred():
    for _ in range(100):
        m.inflight.inc()
        m.set_queue_rows("mnist", 3)
        m.set_queue_rows("mnist", 0)
        m.request_done("Classify", "mnist", "1", "OK", images, 0.001)
        m.inflight.dec()
    m.flush()
def batches():
    for _ in range(100):
        m.batch_done("mnist", 1, waits, 0.0005, p)
    m.flush()
for fn in (hundred, batches):
    fn()  # warm up
t = time.process_time(); [hundred() for _ in range(100)]; per_req = (time.process_time() - t) / 1e4
t = time.process_time(); [batches() for _ in range(30)]; per_batch = (time.process_time() - t) / 3e3
print((per_req + per_batch * images / b) * 1e6)
"""


def cost_us(tree: Path, images: int, batch_rows: float) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _SNIPPET, str(images), str(batch_rows)],
        cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="the other checkout (the baseline)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"recording µs per request (CPU time), {args.runs} alternating runs: median [range]")
    print(f"  {'images x batch rows':<22}{'old':>20}{'new':>20}{'new/old':>9}")
    for images, rows in SHAPES:
        old, new = [], []
        for _ in range(args.runs):
            old.append(cost_us(args.old, images, rows))
            new.append(cost_us(ROOT, images, rows))
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"  {f'{images} x {rows:g}':<22}"
              f"{f'{mo:.2f} [{min(old):.2f}-{max(old):.2f}]':>20}"
              f"{f'{mn:.2f} [{min(new):.2f}-{max(new):.2f}]':>20}{mn / mo:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
