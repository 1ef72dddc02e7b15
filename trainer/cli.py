"""`mnist-train`: train an MLP on MNIST IDX files and publish it as the next model version.

Every failure a user can cause (bad option, missing or damaged data, unwritable model
directory, full disk) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

from service.model import CHECKSUM_FILE
from service.promotion.gate import MAX_GATE_IMAGES, write_gate
from trainer import __version__
from trainer.data import MIRRORS, DataError, download, load_dataset, missing_files
from trainer.network import COSTS
from trainer.optim import OPTIMIZERS, SCHEDULES
from trainer.publish import PublishError, publish
from trainer.train import EpochStats, RunResult, TrainConfig, run

PROG = "mnist-train"
PLOT_INSTALL = "pip install 'mnist-serving[plot]'"
DEFAULTS = TrainConfig()


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes like 256,128, got {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"every hidden layer needs >= 1 unit, got {text!r}")
    return sizes


def _bounded(kind: type, low: float, high: float | None = None, *, open_low: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if open_low else value < low
        if too_low or (high is not None and value > high) or value != value:
            bound = f"> {low}" if open_low else f">= {low}"
            bound += f" and <= {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (not the whole usage) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = _Parser(
        prog=PROG,
        description=(
            "Train a multilayer perceptron on MNIST-format IDX files with NumPy only, report\n"
            "test accuracy, and publish the model atomically as MODEL_DIR/NAME/<N>/\n"
            "(N = highest existing version + 1; existing versions are never touched)."
        ),
        epilog=(
            "example (the committed default model):\n"
            "  mnist-train --data-dir ../shared/data/mnist --model-dir models --name mnist --plot\n"
            "The same command with the same --seed gives byte-identical weights.\n\n"
            "--download tries, in order: " + ", ".join(MIRRORS) + "\n\n"
            "exit status: 0 ok, 1 bad data / unwritable model dir / failed publish, "
            "2 bad option"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("data and output")
    io.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MNIST_DATA_DIR", "data")),
                    help="directory with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                         "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may be .gz) "
                         "(default: $MNIST_DATA_DIR or ./data)")
    io.add_argument("--download", action="store_true",
                    help="fetch the original MNIST files missing from --data-dir, verifying "
                         "each file's sha256; mirrors are tried in turn")
    io.add_argument("--mirror", action="append", metavar="URL",
                    help="base URL to download from instead of the public mirrors "
                         "(repeatable; tried in order)")
    io.add_argument("--model-dir", type=Path, default=Path("models"),
                    help="model repository root (default: models)")
    io.add_argument("--name", default="mnist", help="model name, the subdirectory of --model-dir "
                                                    "(default: mnist)")
    io.add_argument("--no-publish", action="store_true",
                    help="train and evaluate only; write nothing")
    io.add_argument("--plot", action="store_true",
                    help="also write training_curves.png and confusion_matrix.png into the "
                         f"version directory (needs matplotlib: {PLOT_INSTALL})")
    io.add_argument("--json", action="store_true",
                    help="print one JSON summary line on stdout at the end (version, path, "
                         "test_accuracy, seconds, ...); progress then goes to stderr")
    io.add_argument("--quiet", action="store_true", help="no per-epoch progress")

    net = p.add_argument_group("network")
    net.add_argument("--hidden", type=_hidden, default=d.hidden, metavar="N[,N...]",
                     help="hidden layer sizes, comma-separated (default: "
                          f"{','.join(map(str, d.hidden))})")
    net.add_argument("--activation", choices=("relu", "sigmoid", "tanh"), default=d.activation,
                     help=f"hidden-layer activation (default: {d.activation}); weights are "
                          "He-initialised for relu, Xavier for sigmoid/tanh")
    net.add_argument("--output", choices=("softmax", "sigmoid"), default=d.output,
                     help=f"output layer (default: {d.output})")
    net.add_argument("--cost", choices=COSTS, default=None,
                     help="cost function (default: cross_entropy for softmax, mse for sigmoid, "
                          "the classic notebook pairing)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                     help=f"sgd (plain mini-batch), momentum, or adam (default: {d.optimizer})")
    opt.add_argument("--lr", type=_bounded(float, 0, 100, open_low=True), default=d.learning_rate,
                     help=f"base learning rate (default: {d.learning_rate}; try 0.1 for sgd)")
    opt.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                     help=f"learning-rate schedule over all steps (default: {d.schedule})")
    opt.add_argument("--momentum", type=_bounded(float, 0, 0.999), default=d.momentum,
                     help=f"momentum coefficient for --optimizer momentum (default: {d.momentum})")
    opt.add_argument("--l2", type=_bounded(float, 0, 1), default=d.l2,
                     help=f"L2 weight decay on the weights, not biases (default: {d.l2})")
    opt.add_argument("--batch-size", type=_bounded(int, 1, 65536), default=d.batch_size,
                     help=f"mini-batch size (default: {d.batch_size})")
    opt.add_argument("--epochs", type=_bounded(int, 1, 100000), default=d.epochs,
                     help=f"maximum number of epochs (default: {d.epochs})")
    opt.add_argument("--patience", type=_bounded(int, 0), default=d.patience,
                     help="stop after this many epochs without a better validation accuracy; "
                          "the best epoch's weights are kept either way (default: "
                          f"{d.patience} = run every epoch)")
    opt.add_argument("--validation-fraction", type=_bounded(float, 0, 0.9, open_low=True),
                     default=d.validation_fraction,
                     help="share of the training images held out (stratified) to pick the "
                          f"best epoch; the test set is never used for that "
                          f"(default: {d.validation_fraction})")
    opt.add_argument("--shift", type=_bounded(int, 0, 8), default=d.shift,
                     help="augment by random translations of up to this many pixels, "
                          f"0 = off (default: {d.shift})")
    opt.add_argument("--rotate", type=_bounded(float, 0, 45), default=d.rotate,
                     help="augment by random rotations of up to this many degrees either way, "
                          f"0 = off (default: {d.rotate:g})")
    opt.add_argument("--scale", type=_bounded(float, 0, 0.5), default=d.scale,
                     help="augment by random size changes of up to this fraction either way "
                          f"(0.1 = 0.9x to 1.1x), 0 = off (default: {d.scale:g})")
    opt.add_argument("--dropout", type=_bounded(float, 0, 0.9), default=None,
                     help="while training, zero each hidden unit with this probability "
                          f"(relu only), 0 = off (default: {d.dropout:g} for relu, 0 for "
                          "sigmoid/tanh)")
    opt.add_argument("--label-smoothing", type=_bounded(float, 0, 0.5),
                     default=d.label_smoothing,
                     help="train towards targets with this share spread evenly over the "
                          f"classes, 0 = plain one-hot (default: {d.label_smoothing:g})")
    opt.add_argument("--max-train", type=_bounded(int, 0), default=d.max_train,
                     help="use at most this many training images, 0 = all (default: 0)")

    gate = p.add_argument_group(
        "quality gate",
        "write MODEL_DIR/NAME/gate/ (docs/versions.md): a sample of the held-out test images "
        "and the bar every new version of NAME must clear before the server serves it",
    )
    gate.add_argument("--gate-min-accuracy", type=_bounded(float, 0, 1), default=None,
                      metavar="F", help="write the gate: minimum accuracy on its images")
    gate.add_argument("--gate-max-drop", type=_bounded(float, 0, 1), default=None,
                      metavar="F", help="write the gate: largest accuracy drop allowed against "
                      "the version serving when a new one loads")
    gate.add_argument("--gate-images", type=_bounded(int, 1, MAX_GATE_IMAGES), default=1000,
                      metavar="N", help="held-out test images the gate keeps")
    rt = p.add_argument_group("reproducibility and speed")
    rt.add_argument("--seed", type=_bounded(int, 0, 2**63 - 1), default=d.seed,
                    help=f"seed for initialisation, split, shuffling and augmentation; the "
                         f"same seed gives byte-identical weights (default: {d.seed})")
    rt.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype,
                    help="training precision; float32 is ~2x faster and the model file is "
                         f"float32 either way (default: {d.dtype})")
    rt.add_argument("--threads", type=_bounded(int, 0, 256), default=d.threads,
                    help="BLAS threads while training, 0 = library default; one is fastest "
                         "for these layer sizes on a 2-core machine (needs threadpoolctl) "
                         f"(default: {d.threads})")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cost = args.cost or ("mse" if args.output == "sigmoid" else "cross_entropy")
    dropout = args.dropout if args.dropout is not None else (
        DEFAULTS.dropout if args.activation == "relu" else 0.0)
    config = TrainConfig(
        hidden=args.hidden, activation=args.activation, output=args.output, cost=cost,
        optimizer=args.optimizer, learning_rate=args.lr, schedule=args.schedule,
        momentum=args.momentum, l2=args.l2, batch_size=args.batch_size, epochs=args.epochs,
        patience=args.patience, validation_fraction=args.validation_fraction,
        shift=args.shift, rotate=args.rotate, scale=args.scale, dropout=dropout,
        label_smoothing=args.label_smoothing, seed=args.seed,
        dtype=args.dtype, threads=args.threads, max_train=args.max_train,
    )
    config.validate()
    return config


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args, parser)
    except (CliError, DataError, PublishError, ValueError, FloatingPointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was published", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.plot:
        if args.no_publish:
            parser.error("--plot writes next to the published version; drop --no-publish")
        _require_matplotlib()
    out: TextIO = sys.stderr if args.json else sys.stdout
    if not args.no_publish:
        _check_writable(args.model_dir / args.name)

    if args.download and missing_files(args.data_dir):
        mirrors = tuple(args.mirror) if args.mirror else MIRRORS
        download(args.data_dir, mirrors=mirrors, log=lambda m: print(m, file=out, flush=True))
    data = load_dataset(args.data_dir)
    print(f"training on {data.train_labels.size} images from {args.data_dir} "
          f"(layers {'-'.join(map(str, config.layer_sizes))}, {config.optimizer}, "
          f"seed {config.seed})", file=out, flush=True)

    def progress(s: EpochStats) -> None:
        if not args.quiet:
            print(f"epoch {s.epoch:3d}/{config.epochs}  loss {s.loss:.4f}  "
                  f"train {s.train_accuracy:6.2%}  val {s.validation_accuracy:6.2%}  "
                  f"lr {s.learning_rate:.2e}  {s.seconds:.2f}s", file=out, flush=True)

    result = run(config, data, progress)
    _report(result, out)
    summary: dict[str, Any] = {
        "test_accuracy": result.test.accuracy,
        "validation_accuracy": result.validation_accuracy,
        "best_epoch": result.result.best_epoch,
        "epochs_run": len(result.result.history),
        "seconds": round(result.result.seconds, 3),
        "version": None,
        "path": None,
    }
    if not args.no_publish and (args.gate_min_accuracy is not None
                                or args.gate_max_drop is not None):
        # Before the version: the server judges it by the gate it finds in place.
        gate_dir = _write_gate(args, data, config.seed)
        summary["gate"] = str(gate_dir)
        print(f"wrote quality gate {gate_dir} ({args.gate_images} held-out test images)",
              file=out)
    if not args.no_publish:
        extra = _write_plots(result) if args.plot else None
        version, path = publish(result.model, args.model_dir, args.name, extra_files=extra)
        digest = (path / CHECKSUM_FILE).read_text().split()[0]
        summary.update(version=version, path=str(path), sha256=digest)
        print(f"published {path} (version {version}, sha256 {digest[:16]}...)", file=out)
    if args.json:
        print(json.dumps(summary, sort_keys=True), flush=True)
    return 0


def _write_gate(args: argparse.Namespace, data: Any, seed: int) -> Path:
    """A seeded sample of the held-out test split as the model's gate."""
    n = min(args.gate_images, int(data.test_labels.size))
    pick = np.sort(np.random.default_rng(seed).choice(data.test_labels.size, n, replace=False))
    return write_gate(
        args.model_dir / args.name, data.test_images[pick], data.test_labels[pick],
        min_accuracy=args.gate_min_accuracy or 0.0, max_drop=args.gate_max_drop,
    )


def _report(r: RunResult, out: TextIO) -> None:
    res = r.result
    print(f"best epoch {res.best_epoch} of {len(res.history)} "
          f"(validation {r.validation_accuracy:.2%}), {res.seconds:.1f}s", file=out)
    print(f"test accuracy {r.test.accuracy:.2%} on {sum(map(sum, r.test.confusion))} images",
          file=out)
    print("confusion matrix (rows: true digit, columns: predicted):", file=out)
    print("      " + "".join(f"{c:>6}" for c in range(10)), file=out)
    for c, row in enumerate(r.test.confusion):
        print(f"{c:>6}" + "".join(f"{v:>6}" for v in row), file=out)


def _check_writable(repo: Path) -> None:
    """Fail before training, not after a minute of it, when the model dir cannot be written."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=repo):
            pass
    except OSError as e:
        raise CliError(f"model directory {repo} is not writable: {e.strerror or e}") from None


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL}") from None


def _write_plots(r: RunResult) -> Any:
    def write(directory: Path) -> None:
        from trainer.plots import plot_confusion, plot_history

        plot_history(r.result.history, r.result.best_epoch, directory / "training_curves.png")
        plot_confusion(r.test.confusion, r.test.accuracy, directory / "confusion_matrix.png")

    return write


if __name__ == "__main__":
    sys.exit(main())
