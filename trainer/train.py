"""The training loop: split, shuffle, augment, step, validate, stop early, build the Model.

Validation accuracy (never test accuracy) picks the epoch whose weights are kept. Every
random choice draws from one generator seeded by `seed`, and BLAS runs with a fixed thread
count, so the same config on the same data gives byte-identical weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from service.model import INPUT_SIZE, NUM_CLASSES, Model, build_model, forward, pixels_to_input
from trainer import __version__
from trainer.augment import random_affine, random_shift
from trainer.data import Dataset
from trainer.network import (
    Architecture,
    Params,
    backward,
    forward_cache,
    init_params,
    loss,
    one_hot,
)
from trainer.optim import OPTIMIZERS, SCHEDULES, learning_rate, make_optimizer

DIGIT_LABELS = [str(d) for d in range(NUM_CLASSES)]
# Inputs the saved model must reproduce on load: blank, saturated and a few real images.
N_PROBE_IMAGES = 8


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; recorded verbatim in the model's metadata.

    The defaults are the recipe of the committed models/mnist/1 (docs/training.md): the
    serving budget caps the first hidden layer at 128 units, and on the 5,000-digit subset
    two 128-unit layers with shift + rotation + scaling augmentation, 200 cosine-scheduled
    epochs, light dropout and label smoothing scored best on validation of the recipes tried.
    """

    hidden: tuple[int, ...] = (128, 128)
    activation: str = "relu"
    output: str = "softmax"
    cost: str = "cross_entropy"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    momentum: float = 0.9
    l2: float = 1e-4
    batch_size: int = 64
    epochs: int = 200
    patience: int = 0  # epochs without a better validation accuracy before stopping; 0 = never
    validation_fraction: float = 0.1
    shift: int = 2  # largest random translation in pixels; 0 = no augmentation
    rotate: float = 10.0  # largest random rotation in degrees; 0 = none
    scale: float = 0.1  # largest random relative size change (0.1 = 0.9x..1.1x); 0 = none
    dropout: float = 0.1  # probability of zeroing each hidden ReLU unit while training
    label_smoothing: float = 0.1  # share of each target spread evenly over all classes
    seed: int = 0
    dtype: str = "float32"
    threads: int = 1  # BLAS threads; one is fastest for these sizes on 2 cores
    max_train: int = 0  # use at most this many training images (0 = all); for quick tries

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for any nonsense value."""
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be >= 1, got {list(self.hidden)}")
        Architecture(self.layer_sizes, self.activations, self.output, self.cost)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        checks: list[tuple[bool, str]] = [
            (self.learning_rate > 0 and np.isfinite(self.learning_rate),
             f"learning rate must be > 0, got {self.learning_rate}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (0 < self.validation_fraction < 1,
             f"validation fraction must be in (0, 1), got {self.validation_fraction}"),
            (0 <= self.shift <= 8, f"shift must be 0..8 pixels, got {self.shift}"),
            (0 <= self.rotate <= 45, f"rotate must be 0..45 degrees, got {self.rotate}"),
            (0 <= self.scale <= 0.5, f"scale must be 0..0.5, got {self.scale}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (not self.dropout or self.activation == "relu",
             f"dropout must go with relu hidden layers, got {self.activation!r}"),
            (0 <= self.label_smoothing < 1,
             f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.dtype in ("float32", "float64"),
             f"dtype must be float32 or float64, got {self.dtype!r}"),
            (self.threads >= 0, f"threads must be >= 0, got {self.threads}"),
            (self.max_train >= 0, f"max-train must be >= 0, got {self.max_train}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (INPUT_SIZE, *self.hidden, NUM_CLASSES)

    @property
    def activations(self) -> tuple[str, ...]:
        return (self.activation,) * len(self.hidden)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    validation_accuracy: float
    learning_rate: float
    seconds: float


@dataclass
class TrainResult:
    params: Params  # the best epoch's weights (by validation accuracy)
    best_epoch: int
    best_validation_accuracy: float
    history: list[EpochStats] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit BLAS to `n` threads while training (0 = leave it alone); threadpoolctl is optional."""
    if n <= 0:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield


def split_validation(
    labels: npt.NDArray[np.uint8], fraction: float, rng: np.random.Generator
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Stratified (train, validation) index arrays: each class keeps its share in both."""
    train_idx, val_idx = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_val = round(idx.size * fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def accuracy(params: Params, arch: Architecture, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> float:
    """Accuracy through the shared forward pass, in chunks to bound memory."""
    correct = 0
    for start in range(0, x.shape[0], 4096):
        p = forward(x[start : start + 4096], params.weights, params.biases,
                    arch.activations, arch.output)
        correct += int((p.argmax(axis=1) == y[start : start + 4096]).sum())
    return float(correct / max(x.shape[0], 1))


class EpochRunner:
    """One pass over the training data per call: shuffle, augment, one step per mini-batch.

    Separate from `train` so the benchmark times exactly the product's epoch, without the
    validation pass that `train` adds.
    """

    def __init__(
        self,
        config: TrainConfig,
        images: npt.NDArray[np.uint8],
        labels: npt.NDArray[np.uint8],
        rng: np.random.Generator,
    ) -> None:
        self.config, self.images, self.labels, self.rng = config, images, labels, rng
        self.dtype = np.float32 if config.dtype == "float32" else np.float64
        self.arch = Architecture(config.layer_sizes, config.activations, config.output,
                                 config.cost)
        self.params = init_params(self.arch, rng, self.dtype)
        self.optimizer = make_optimizer(config.optimizer, self.params, l2=config.l2,
                                        momentum=config.momentum)
        self.grads = self.params.zeros_like()
        self.n = images.shape[0]
        self.batches = -(-self.n // config.batch_size)
        self.total_steps = self.batches * config.epochs
        self.step = 0
        self.scale = self.dtype(1.0 / 255.0)
        # Without augmentation the float inputs never change: convert them once.
        self.x_all: npt.NDArray[Any] | None = None
        if not self.augmented:
            self.x_all = images.reshape(self.n, -1).astype(self.dtype)
            self.x_all *= self.scale

    @property
    def augmented(self) -> bool:
        return bool(self.config.shift or self.config.rotate or self.config.scale)

    def augment(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """Shifts alone keep their exact integer gather (and its random stream); rotation or
        scaling switches to the bilinear affine warp, which includes the shift."""
        c = self.config
        if c.rotate or c.scale:
            return random_affine(images, c.shift, c.rotate, c.scale, self.rng)
        return random_shift(images, c.shift, self.rng)

    def run(self) -> tuple[float, float, float]:
        """Train one epoch; returns (mean loss, training accuracy, last learning rate)."""
        config, n, arch, params = self.config, self.n, self.arch, self.params
        order = self.rng.permutation(n)
        source = self.augment(self.images[order]) if self.augmented else None
        loss_sum, correct = 0.0, 0
        lr = config.learning_rate
        for b in range(self.batches):
            lo, hi = b * config.batch_size, min((b + 1) * config.batch_size, n)
            xb: npt.NDArray[Any]
            if source is not None:
                xb = source[lo:hi].reshape(hi - lo, -1).astype(self.dtype)
                xb *= self.scale
            else:
                assert self.x_all is not None
                xb = self.x_all[order[lo:hi]]
            yb_labels = self.labels[order[lo:hi]]
            yb = one_hot(yb_labels, NUM_CLASSES, self.dtype)
            if config.label_smoothing:
                yb *= self.dtype(1.0 - config.label_smoothing)
                yb += self.dtype(config.label_smoothing / NUM_CLASSES)
            outs = forward_cache(xb, params, arch, config.dropout, self.rng)
            loss_sum += loss(outs[-1], yb, arch) * (hi - lo)
            correct += int((outs[-1].argmax(axis=1) == yb_labels).sum())
            backward(outs, yb, params, arch, out=self.grads, dropout=config.dropout)
            lr = learning_rate(config.schedule, config.learning_rate, self.step,
                               self.total_steps)
            self.optimizer.step(params, self.grads, lr)
            self.step += 1
        return loss_sum / n, correct / n, lr


def train(
    config: TrainConfig,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint8],
    val_images: npt.NDArray[np.uint8],
    val_labels: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    progress: Callable[[EpochStats], None] = lambda _: None,
) -> TrainResult:
    """Train on (images, labels), keeping the weights with the best validation accuracy."""
    runner = EpochRunner(config, images, labels, rng)
    params, arch = runner.params, runner.arch
    x_val = pixels_to_input(val_images).astype(runner.dtype, copy=False)
    best = TrainResult(params.copy(), 0, -1.0)
    history: list[EpochStats] = []
    since_best = 0
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        mean_loss, train_acc, lr = runner.run()
        if not np.isfinite(mean_loss):
            raise FloatingPointError(
                f"training diverged in epoch {epoch} (loss is not finite); "
                "try a smaller learning rate"
            )
        val_acc = accuracy(params, arch, x_val, val_labels)
        stats = EpochStats(epoch, mean_loss, train_acc, val_acc, lr, time.perf_counter() - t0)
        history.append(stats)
        progress(stats)
        # A tie keeps the later epoch's weights (under a decaying schedule they are more
        # settled) but does not reset the patience: only a better accuracy does.
        if val_acc >= best.best_validation_accuracy:
            since_best = 0 if val_acc > best.best_validation_accuracy else since_best + 1
            best = TrainResult(params.copy(), epoch, val_acc)
        else:
            since_best += 1
        if config.patience and since_best >= config.patience:
            best.stopped_early = True
            break
    best.history = history
    best.seconds = time.perf_counter() - started
    return best


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # confusion[true][predicted]


def evaluate(
    model: Model, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]
) -> Evaluation:
    """Test metrics through Model.predict: exactly the computation the service will run."""
    predicted = np.concatenate([
        model.predict(pixels_to_input(images[i : i + 4096])).argmax(axis=1)
        for i in range(0, images.shape[0], 4096)
    ])
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels.astype(np.intp), predicted), 1)
    totals = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / totals[c]) if totals[c] else 0.0
                 for c in range(NUM_CLASSES)]
    return Evaluation(float(np.trace(confusion) / max(labels.size, 1)), per_class,
                      confusion.tolist())


def created_at() -> str:
    """Now in UTC, or SOURCE_DATE_EPOCH when set, so a rebuilt file can be byte-identical."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch and epoch.isdigit()
            else datetime.datetime.now(datetime.UTC))
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class RunResult:
    model: Model
    result: TrainResult
    test: Evaluation
    validation_accuracy: float


def run(
    config: TrainConfig,
    data: Dataset,
    progress: Callable[[EpochStats], None] = lambda _: None,
) -> RunResult:
    """Split, train, evaluate on the test set once, and build the Model with full metadata."""
    config.validate()
    rng = np.random.default_rng(config.seed)
    images, labels = data.train_images, data.train_labels
    if config.max_train and config.max_train < images.shape[0]:
        keep = np.sort(rng.permutation(images.shape[0])[: config.max_train])
        images, labels = images[keep], labels[keep]
    train_idx, val_idx = split_validation(labels, config.validation_fraction, rng)
    if train_idx.size == 0 or val_idx.size == 0:
        raise ValueError(
            f"{images.shape[0]} training images are too few to hold out a validation split"
        )
    with blas_threads(config.threads):
        result = train(config, images[train_idx], labels[train_idx],
                       images[val_idx], labels[val_idx], rng, progress)
    arch_meta = {
        "format_version": 1,
        "cost": config.cost,
        "input": {
            "shape": [INPUT_SIZE],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "scale": "pixel / 255",
            "image_shape": [28, 28],
            "pixels": "uint8 0..255, row-major 28x28, 0 = background (black), 255 = ink; "
                      "input = pixel / 255, no other normalisation",
        },
        "labels": DIGIT_LABELS,
        "training": {
            **config.to_json(),
            "layer_sizes": list(config.layer_sizes),
            "train_examples": int(train_idx.size),
            "validation_examples": int(val_idx.size),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "seconds": round(result.seconds, 3),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "data": {
            "files": dict(sorted(data.fingerprints.items())),
            "train_count": int(data.train_labels.size),
            "test_count": int(data.test_labels.size),
        },
        "created_at": created_at(),
        "trainer_version": __version__,
    }
    probes = _probe_images(images[val_idx])
    provisional = build_model(result.params.weights, result.params.biases, config.activations,
                              config.output, {**arch_meta, "metrics": {}}, pixels_to_input(probes))
    test = evaluate(provisional, data.test_images, data.test_labels)
    val = evaluate(provisional, images[val_idx], labels[val_idx])
    metrics = {
        "validation_accuracy": val.accuracy,
        "test_accuracy": test.accuracy,
        "per_class_accuracy": dict(zip(DIGIT_LABELS, test.per_class_accuracy, strict=True)),
        "confusion_matrix": test.confusion,
        "history": [dataclasses.asdict(h) for h in result.history],
    }
    model = build_model(result.params.weights, result.params.biases, config.activations,
                        config.output, {**arch_meta, "metrics": metrics},
                        pixels_to_input(probes))
    return RunResult(model, result, test, val.accuracy)


def _probe_images(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    blank = np.zeros((1, 28, 28), dtype=np.uint8)
    full = np.full((1, 28, 28), 255, dtype=np.uint8)
    return np.concatenate([blank, full, images[:N_PROBE_IMAGES]])
