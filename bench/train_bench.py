"""Training speed and accuracy of our NumPy MLP against baselines, side by side in one run.

Every contender trains the same 784-128-10 ReLU network with Adam (lr 1e-3), batch 128,
softmax + cross-entropy, on full Fashion-MNIST (60k train / 10k test), for the same number
of epochs, with the same BLAS/intra-op thread count:

  ours          trainer.train.EpochRunner, the exact epoch `mnist-train` runs (float32)
  per-example   the classic notebook loop: backprop one example at a time, summed over the
                batch. Only a slice of one epoch is timed and extrapolated (a full epoch
                would take minutes); its maths is ours, so no accuracy is reported.
  scikit-learn  MLPClassifier(solver="adam"), one fit of all epochs, if installed
  pytorch       nn.Sequential + torch.optim.Adam on CPU tensors, no DataLoader, if installed

Seconds per epoch are medians over the epochs; ratios are ours / theirs (below 1 = we are
faster). Also measured: our epoch in float64 and with 2 BLAS threads.

    .venv/bin/python bench/train_bench.py                 # 5 epochs, 1 thread
    .venv/bin/python bench/train_bench.py --epochs 10 --repeat 3

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from service.model import forward, pixels_to_input
from trainer.data import Dataset, load_dataset
from trainer.network import Architecture, Params, init_params, one_hot
from trainer.optim import Adam
from trainer.train import EpochRunner, TrainConfig, blas_threads

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"
BATCH = 128
CONFIG = TrainConfig(hidden=(128,), activation="relu", optimizer="adam", learning_rate=1e-3,
                     schedule="constant", batch_size=BATCH, shift=0, rotate=0.0, scale=0.0,
                     dropout=0.0, label_smoothing=0.0, l2=0.0)


@dataclass
class Row:
    name: str
    seconds_per_epoch: float  # wall clock
    test_accuracy: float | None
    note: str = ""
    cpu_seconds_per_epoch: float = 0.0  # process CPU time: robust when others share the box


def _median_epoch(times: list[float]) -> float:
    return statistics.median(times)


class _Clock:
    """Wall and CPU time of each timed section, so contention on a shared box shows."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall.append(time.perf_counter() - self._w)
        self.cpu.append(time.process_time() - self._c)


def bench_ours(data: Dataset, epochs: int, threads: int, dtype: str, seed: int) -> Row:
    config = replace(CONFIG, epochs=epochs, dtype=dtype, seed=seed, threads=threads)
    clock = _Clock()
    with blas_threads(threads):
        runner = EpochRunner(config, data.train_images, data.train_labels,
                             np.random.default_rng(seed))
        for _ in range(epochs):
            with clock:
                runner.run()
        p = runner.params
        x_test = pixels_to_input(data.test_images).astype(runner.dtype)
        pred = forward(x_test, p.weights, p.biases, runner.arch.activations, "softmax")
    acc = float((pred.argmax(axis=1) == data.test_labels).mean())
    name = f"ours ({dtype}, {threads} thread{'s' if threads > 1 else ''})"
    return Row(name, _median_epoch(clock.wall), acc, "", _median_epoch(clock.cpu))


def bench_per_example(data: Dataset, threads: int, batches: int, seed: int) -> Row:
    """Classic notebook backprop: one example at a time, np.outer per layer, then Adam."""
    rng = np.random.default_rng(seed)
    arch = Architecture((784, 128, 10), ("relu",))
    params = init_params(arch, rng)
    opt = Adam(params)
    x = pixels_to_input(data.train_images)
    y = one_hot(data.train_labels, 10)
    order = rng.permutation(x.shape[0])
    w1, w2 = params.weights
    b1, b2 = params.biases
    clock = _Clock()
    with blas_threads(threads), clock:
        for b in range(batches):
            gw1, gw2 = np.zeros_like(w1), np.zeros_like(w2)
            gb1, gb2 = np.zeros_like(b1), np.zeros_like(b2)
            for i in order[b * BATCH : (b + 1) * BATCH]:
                xi, yi = x[i], y[i]
                h = np.maximum(xi @ w1 + b1, 0)
                z = h @ w2 + b2
                e = np.exp(z - z.max())
                delta2 = e / e.sum() - yi
                delta1 = (w2 @ delta2) * (h > 0)
                gw2 += np.outer(h, delta2)
                gb2 += delta2
                gw1 += np.outer(xi, delta1)
                gb1 += delta1
            inv = np.float32(1.0 / BATCH)
            opt.step(params, Params([gw1 * inv, gw2 * inv], [gb1 * inv, gb2 * inv]), 1e-3)
    scale = -(-x.shape[0] // BATCH) / batches
    return Row("per-example loop", clock.wall[0] * scale, None,
               f"timed {batches} of {-(-x.shape[0] // BATCH)} batches, extrapolated",
               clock.cpu[0] * scale)


def bench_sklearn(data: Dataset, epochs: int, threads: int, seed: int) -> Row | None:
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError:
        return None
    x = pixels_to_input(data.train_images)
    # One fit over all epochs, sklearn's natural use (no per-call overhead counted);
    # tol and n_iter_no_change are set so it runs every epoch.
    clf = MLPClassifier(hidden_layer_sizes=(128,), activation="relu", solver="adam",
                        batch_size=BATCH, learning_rate_init=1e-3, alpha=0.0, max_iter=epochs,
                        shuffle=True, random_state=seed, tol=0.0, n_iter_no_change=epochs + 1)
    clock = _Clock()
    with blas_threads(threads), warnings.catch_warnings(), clock:
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, data.train_labels)
    assert clf.n_iter_ == epochs
    acc = float(clf.score(pixels_to_input(data.test_images), data.test_labels))
    return Row("scikit-learn MLPClassifier", clock.wall[0] / epochs, acc,
               "one fit, total / epochs", clock.cpu[0] / epochs)


def bench_torch(data: Dataset, epochs: int, threads: int, seed: int) -> Row | None:
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x = torch.from_numpy(pixels_to_input(data.train_images))
    y = torch.from_numpy(data.train_labels.astype(np.int64))
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    clock = _Clock()
    for _ in range(epochs):
        with clock:
            perm = torch.randperm(x.shape[0])
            for b in range(0, x.shape[0], BATCH):
                idx = perm[b : b + BATCH]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x[idx]), y[idx])
                loss.backward()
                opt.step()
    with torch.no_grad():
        logits = net(torch.from_numpy(pixels_to_input(data.test_images)))
    acc = float((logits.argmax(dim=1).numpy() == data.test_labels).mean())
    return Row(f"pytorch {torch.__version__} CPU", _median_epoch(clock.wall), acc,
               f"{threads} thread{'s' if threads > 1 else ''}", _median_epoch(clock.cpu))


def _blas_kernel() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                     for i in blas) or "none found"


def _table(rows: list[Row], ours: Row) -> str:
    lines = ["| contender | wall s/epoch | CPU s/epoch | test acc | ours/theirs wall | "
             "ours/theirs CPU | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        acc = f"{r.test_accuracy:.2%}" if r.test_accuracy is not None else "n/a"
        ratio = ours.seconds_per_epoch / r.seconds_per_epoch
        cpu_ratio = ours.cpu_seconds_per_epoch / max(r.cpu_seconds_per_epoch, 1e-9)
        lines.append(f"| {r.name} | {r.seconds_per_epoch:.3f} | {r.cpu_seconds_per_epoch:.3f} "
                     f"| {acc} | {ratio:.2f}x | {cpu_ratio:.2f}x | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path,
                   default=Path(os.environ.get("FASHION_DATA_DIR", DEFAULT_DATA)),
                   help="Fashion-MNIST IDX files (default: ../shared/data/fashion-mnist)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per contender (default: 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS / torch threads for every contender (default: 1)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run everything this many times and report medians (default: 1)")
    p.add_argument("--slice-batches", type=int, default=20,
                   help="batches the per-example loop is timed on (default: 20)")
    p.add_argument("--skip", action="append", default=[],
                   choices=["per-example", "sklearn", "torch", "variants"],
                   help="leave a contender out (repeatable)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = p.parse_args(argv)

    data = load_dataset(args.data_dir)
    print(f"Fashion-MNIST {data.train_labels.size} train / {data.test_labels.size} test, "
          f"784-128-10 relu, adam 1e-3, batch {BATCH}, {args.epochs} epochs, "
          f"{args.threads} thread(s), {args.repeat} repeat(s); BLAS: {_blas_kernel()}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}", flush=True)

    runs: dict[str, list[Row]] = {}
    for rep in range(args.repeat):
        e, t = args.epochs, args.threads
        jobs: list[tuple[str, Callable[[], Row | None]]] = [
            ("ours", partial(bench_ours, data, e, t, "float32", rep)),
        ]
        if "variants" not in args.skip:
            jobs += [
                ("ours64", partial(bench_ours, data, e, t, "float64", rep)),
                ("ours2", partial(bench_ours, data, e, 2, "float32", rep)),
            ]
        if "per-example" not in args.skip:
            jobs.append(("loop", partial(bench_per_example, data, t, args.slice_batches, rep)))
        if "sklearn" not in args.skip:
            jobs.append(("sklearn", partial(bench_sklearn, data, e, t, rep)))
        if "torch" not in args.skip:
            jobs.append(("torch", partial(bench_torch, data, e, t, rep)))
        for key, job in jobs:
            row = job()
            if row is None:
                print(f"  {key}: not installed, skipped", flush=True)
                continue
            runs.setdefault(key, []).append(row)
            acc = f"{row.test_accuracy:.2%}" if row.test_accuracy is not None else "n/a"
            print(f"  run {rep + 1}: {row.name}: {row.seconds_per_epoch:.3f} s/epoch "
                  f"({row.cpu_seconds_per_epoch:.3f} s CPU), test {acc}", flush=True)

    rows = []
    for found in runs.values():
        accs = [r.test_accuracy for r in found if r.test_accuracy is not None]
        rows.append(Row(found[0].name, statistics.median(r.seconds_per_epoch for r in found),
                        statistics.median(accs) if accs else None, found[0].note,
                        statistics.median(r.cpu_seconds_per_epoch for r in found)))
    print()
    print(_table(rows, rows[0]))
    if args.json:
        payload: list[dict[str, Any]] = [r.__dict__ for r in rows]
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

