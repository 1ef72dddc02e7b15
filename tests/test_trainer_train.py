"""The training loop: learns, is reproducible, stops early, records what the format needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from support.data import real_mnist_dir, synthetic_digits

from service.model import load_model, pixels_to_input
from trainer.data import Dataset, load_dataset
from trainer.publish import publish
from trainer.train import TrainConfig, run, split_validation

REPO_ROOT = Path(__file__).resolve().parents[1]




def synthetic_dataset(n_train: int = 400, n_test: int = 200) -> Dataset:
    tx, ty = synthetic_digits(n_train, 1)
    vx, vy = synthetic_digits(n_test, 2)
    return Dataset(tx, ty, vx, vy, {"synthetic": "0" * 64})


# Shifts only, no other regularisation: the plain recipe the tests below vary one knob of.
FAST = TrainConfig(hidden=(32,), epochs=4, batch_size=32, shift=1, rotate=0.0, scale=0.0,
                   dropout=0.0, label_smoothing=0.0, seed=5)


def test_learns_the_synthetic_classes() -> None:
    result = run(FAST, synthetic_dataset())
    assert result.test.accuracy > 0.9
    assert len(result.result.history) == 4
    assert sum(map(sum, result.test.confusion)) == 200


def test_same_seed_gives_identical_weights_and_another_seed_does_not() -> None:
    data = synthetic_dataset()
    a, b = run(FAST, data), run(FAST, data)
    c = run(dataclasses.replace(FAST, seed=6), data)
    for wa, wb, wc in zip(a.model.weights, b.model.weights, c.model.weights, strict=True):
        assert wa.tobytes() == wb.tobytes()
        assert wa.tobytes() != wc.tobytes()
    assert a.result.history[-1].loss == b.result.history[-1].loss


def test_rotation_and_scaling_train_reproducibly() -> None:
    config = dataclasses.replace(FAST, rotate=10.0, scale=0.1)
    data = synthetic_dataset()
    a, b = run(config, data), run(config, data)
    plain = run(FAST, data)
    assert a.test.accuracy > 0.9
    for wa, wb, wp in zip(a.model.weights, b.model.weights, plain.model.weights, strict=True):
        assert wa.tobytes() == wb.tobytes()
        assert wa.tobytes() != wp.tobytes()  # the warp really changed what was seen
    assert a.model.metadata["training"]["rotate"] == 10.0


@pytest.mark.parametrize("change", [{"dropout": 0.2}, {"label_smoothing": 0.1}])
def test_dropout_and_label_smoothing_train_reproducibly(change: dict[str, float]) -> None:
    config = dataclasses.replace(FAST, epochs=6, **change)  # type: ignore[arg-type]
    data = synthetic_dataset()
    a, b, plain = run(config, data), run(config, data), run(FAST, data)
    assert a.test.accuracy > 0.9
    assert a.model.weights[0].tobytes() == b.model.weights[0].tobytes()
    assert a.model.weights[0].tobytes() != plain.model.weights[0].tobytes()
    assert a.model.metadata["training"] | change == a.model.metadata["training"]


def test_float64_training_publishes_float32(tmp_path: Path) -> None:
    result = run(dataclasses.replace(FAST, dtype="float64"), synthetic_dataset())
    assert all(w.dtype == np.float32 for w in result.model.weights)
    assert result.test.accuracy > 0.9


@pytest.mark.parametrize(
    ("activation", "output", "cost", "optimizer", "lr"),
    [("sigmoid", "sigmoid", "mse", "sgd", 3.0), ("tanh", "softmax", "cross_entropy", "momentum",
                                                   0.05)],
)
def test_other_recipes_train(activation: str, output: str, cost: str, optimizer: str,
                             lr: float) -> None:
    config = dataclasses.replace(FAST, activation=activation, output=output, cost=cost,
                                 optimizer=optimizer, learning_rate=lr, epochs=6)
    assert run(config, synthetic_dataset()).test.accuracy > 0.8


def test_early_stopping_keeps_the_best_epoch() -> None:
    config = dataclasses.replace(FAST, epochs=50, patience=2, learning_rate=0.5, l2=0.0)
    result = run(config, synthetic_dataset()).result
    accs = [h.validation_accuracy for h in result.history]
    assert result.stopped_early
    assert len(accs) < 50
    assert result.best_validation_accuracy == max(accs)
    assert len(accs) - accs[::-1].index(max(accs)) == result.best_epoch  # the last best
    assert len(accs) - (accs.index(max(accs)) + 1) == 2  # patience counts from the first best


def test_validation_split_is_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(10, dtype=np.uint8), 50)
    train_idx, val_idx = split_validation(labels, 0.2, np.random.default_rng(0))
    assert np.intersect1d(train_idx, val_idx).size == 0
    assert train_idx.size + val_idx.size == 500
    assert np.bincount(labels[val_idx]).tolist() == [10] * 10


def test_metadata_records_what_the_format_requires(tmp_path: Path) -> None:
    result = run(FAST, synthetic_dataset())
    _, path = publish(result.model, tmp_path, "m")
    meta = load_model(path).metadata
    assert meta["training"]["seed"] == 5
    assert meta["training"]["hidden"] == [32]
    assert meta["layer_sizes"] == [784, 32, 10]
    assert meta["metrics"]["test_accuracy"] == result.test.accuracy
    assert set(meta["metrics"]["per_class_accuracy"]) == {str(d) for d in range(10)}
    assert meta["data"]["files"] == {"synthetic": "0" * 64}
    assert meta["input"]["scale"] == "pixel / 255"
    assert meta["created_at"].endswith("Z")


@pytest.mark.parametrize(
    "change",
    [{"hidden": (0,)}, {"learning_rate": -1.0}, {"epochs": 0}, {"batch_size": 0},
     {"validation_fraction": 1.0}, {"activation": "gelu"}, {"cost": "hinge"},
     {"rotate": 90.0}, {"scale": 0.9}, {"scale": -0.1}, {"dropout": 1.0},
     {"dropout": 0.5, "activation": "tanh"}, {"label_smoothing": 1.0}],
)
def test_nonsense_configs_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must|one of"):
        run(dataclasses.replace(FAST, **change), synthetic_dataset())  # type: ignore[arg-type]


def test_committed_default_model_meets_its_target() -> None:
    """models/mnist/1 loads, and on the real 10k test set it scores what it claims (>= 97%)."""
    data = load_dataset(real_mnist_dir())
    model = load_model(REPO_ROOT / "models" / "mnist" / "1")
    predicted = model.predict(pixels_to_input(data.test_images)).argmax(axis=1)
    accuracy = float((predicted == data.test_labels).mean())
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(model.metadata["metrics"]["test_accuracy"], abs=1e-9)
