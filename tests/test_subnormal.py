"""Subnormal weights are read as zero: a model file must not be able to slow the forward ~30x.

bench/forward_bench.py measures the slowdown (the committed default model's 256-row forward:
14 ms as stored, 0.49 ms as served, on this project's 2-core VM, 2026-11-29).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.servers import make_model

from service.model import (
    INPUT_SIZE,
    NUM_CLASSES,
    WEIGHTS_FILE,
    build_model,
    forward,
    load_model,
    save_model,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = np.finfo(np.float32).tiny


def _subnormals(arrays: tuple[np.ndarray, ...] | list[np.ndarray]) -> int:
    return sum(int(((a != 0) & (np.abs(a) < TINY)).sum()) for a in arrays)


def test_committed_model_is_served_without_subnormal_weights() -> None:
    version = ROOT / "models" / "mnist" / "1"
    model = load_model(version)
    with np.load(version / WEIGHTS_FILE, allow_pickle=False) as raw:
        weights = [raw[f"W{i}"] for i in range(len(model.weights))]
        biases = [raw[f"b{i}"] for i in range(len(model.biases))]
    assert _subnormals(weights + biases) > 0, "the committed file holds subnormals: the case"
    assert _subnormals([*model.weights, *model.biases]) == 0
    x = np.random.default_rng(1).random((16, INPUT_SIZE), dtype=np.float32)
    as_stored = forward(x, weights, biases, model.activations, model.output)
    np.testing.assert_array_equal(model.predict(x), as_stored)


def test_a_model_built_with_subnormals_saves_and_loads_without_them(tmp_path: Path) -> None:
    base = make_model(seed=3)
    weights = [np.array(w) for w in base.weights]
    biases = [np.array(b) for b in base.biases]
    rng = np.random.default_rng(0)
    for w in weights:
        mask = rng.random(w.shape) < 0.3
        w[mask] = np.float32(1e-40) * np.sign(rng.standard_normal(int(mask.sum())))
    biases[-1][:] = np.float32(-3e-39)
    assert _subnormals(weights + biases) > 0
    model = build_model(weights, biases, base.activations, base.output, dict(base.metadata),
                        base.probe_inputs)
    assert _subnormals([*model.weights, *model.biases]) == 0
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert _subnormals([*loaded.weights, *loaded.biases]) == 0
    assert loaded.predict(base.probe_inputs).shape == (len(base.probe_inputs), NUM_CLASSES)
    np.testing.assert_array_equal(loaded.predict(base.probe_inputs), model.probe_outputs)
