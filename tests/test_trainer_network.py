"""Backprop, optimizers and augmentation of the NumPy trainer, checked against arithmetic."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from service.model import forward
from trainer.augment import random_shift
from trainer.network import (
    Architecture,
    Params,
    backward,
    forward_cache,
    init_params,
    loss,
    one_hot,
)
from trainer.optim import SGD, Adam, Momentum, learning_rate, make_optimizer

OUTPUT_COSTS = [("softmax", "cross_entropy"), ("sigmoid", "mse"),
                ("softmax", "mse"), ("sigmoid", "cross_entropy")]


def _numerical_gradient(
    params: Params, arch: Architecture, x: npt.NDArray[Any], y: npt.NDArray[Any], eps: float
) -> list[npt.NDArray[Any]]:
    grads = []
    for p in params.arrays():
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            saved = p[idx]
            p[idx] = saved + eps
            up = loss(forward_cache(x, params, arch)[-1], y, arch)
            p[idx] = saved - eps
            down = loss(forward_cache(x, params, arch)[-1], y, arch)
            p[idx] = saved
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


EPS64 = float(np.finfo(np.float64).eps)
STEP = 1e-6  # the central difference's h


def _gradient_tolerance(loss_at: float, arch: Architecture, batch: int) -> float:
    """How far a correct gradient may lie from the central difference, from float64 alone.

    (L(p+h) - L(p-h)) / 2h carries two errors. Rounding: each loss is float64 arithmetic over
    at most `terms` accumulated products and sums (batch x outputs for the mean, plus each
    layer's dot-product length), so it is off by at most ~terms * eps * |L|, and the quotient
    by that over h, whatever order a BLAS kernel sums in (a fixed relative bound held on one
    CPU and failed on another for a gradient of 3.5e-6). Truncation: h^2 |L'''| / 6, below
    h^2 for these small, smooth nets. Errors measured on several OpenBLAS kernels sat at
    0.2-1.4 eps |L| / h; the bound leaves ~40x room, and a wrong gradient is off by orders more.
    """
    terms = batch * arch.layer_sizes[-1] + sum(arch.layer_sizes[:-1])
    return terms * EPS64 * max(abs(loss_at), 1.0) / STEP + STEP**2


def _assert_gradients_match(
    analytic: list[npt.NDArray[Any]], numeric: list[npt.NDArray[Any]], tolerance: float
) -> None:
    for a, n in zip(analytic, numeric, strict=True):
        worst = float(np.max(np.abs(a - n)))
        assert worst <= tolerance, f"max |analytic - numeric| {worst:.3g} > {tolerance:.3g}"
    # The check has power only where gradients dwarf the tolerance: most of them must.
    values = np.concatenate([np.abs(n).ravel() for n in numeric])
    assert np.mean(values > 100 * tolerance) >= 0.5, "gradients too small to test against"


@pytest.mark.parametrize(("activation", "output_cost"),
                         list(itertools.product(("relu", "sigmoid", "tanh"), OUTPUT_COSTS)))
def test_backprop_matches_numerical_gradient(activation: str, output_cost: tuple[str, str]) -> None:
    output, cost = output_cost
    arch = Architecture((7, 6, 5, 4), (activation, activation), output, cost)
    rng = np.random.default_rng(3)
    params = init_params(arch, rng, np.float64)
    for b in params.biases:  # non-zero biases so every term of the gradient is exercised
        b[:] = rng.normal(0, 0.1, b.shape)
    x = rng.uniform(0, 1, (9, 7))
    y = one_hot(rng.integers(0, 4, 9).astype(np.uint8), 4, np.float64)

    grads = backward(forward_cache(x, params, arch), y, params, arch)
    numeric = _numerical_gradient(params, arch, x, y, STEP)
    tolerance = _gradient_tolerance(loss(forward_cache(x, params, arch)[-1], y, arch), arch, 9)
    _assert_gradients_match(grads.arrays(), numeric, tolerance)


def test_backprop_with_dropout_matches_numerical_gradient() -> None:
    """With the mask held fixed (same generator state each pass) dropout is a fixed
    linear rescaling of the hidden units, and its gradient must match the numerical one."""
    arch = Architecture((7, 6, 5, 4), ("relu", "relu"))
    rng = np.random.default_rng(4)
    params = init_params(arch, rng, np.float64)
    x = rng.uniform(0, 1, (9, 7))
    y = one_hot(rng.integers(0, 4, 9).astype(np.uint8), 4, np.float64)

    def dropped_loss() -> float:
        out = forward_cache(x, params, arch, 0.4, np.random.default_rng(11))[-1]
        return loss(out, y, arch)

    outs = forward_cache(x, params, arch, 0.4, np.random.default_rng(11))
    assert (outs[1] == 0).mean() > 0.3  # the mask really dropped units
    grads = backward(outs, y, params, arch, dropout=0.4)
    numeric = []
    for p in params.arrays():
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            saved = p[idx]
            p[idx] = saved + STEP
            up = dropped_loss()
            p[idx] = saved - STEP
            down = dropped_loss()
            p[idx] = saved
            g[idx] = (up - down) / (2 * STEP)
        numeric.append(g)
    _assert_gradients_match(grads.arrays(), numeric, _gradient_tolerance(dropped_loss(), arch, 9))


def test_backprop_with_smoothed_targets_matches_numerical_gradient() -> None:
    arch = Architecture((7, 6, 4), ("relu",))
    rng = np.random.default_rng(5)
    params = init_params(arch, rng, np.float64)
    x = rng.uniform(0, 1, (9, 7))
    y = one_hot(rng.integers(0, 4, 9).astype(np.uint8), 4, np.float64) * 0.9 + 0.1 / 4
    grads = backward(forward_cache(x, params, arch), y, params, arch)
    numeric = _numerical_gradient(params, arch, x, y, STEP)
    tolerance = _gradient_tolerance(loss(forward_cache(x, params, arch)[-1], y, arch), arch, 9)
    _assert_gradients_match(grads.arrays(), numeric, tolerance)


def test_dropout_without_a_generator_is_refused() -> None:
    arch = Architecture((7, 6, 4), ("relu",))
    params = init_params(arch, np.random.default_rng(0))
    with pytest.raises(ValueError, match="generator"):
        forward_cache(np.zeros((2, 7), np.float32), params, arch, 0.5)


def test_training_forward_is_the_shared_forward() -> None:
    arch = Architecture((784, 32, 16, 10), ("tanh", "tanh"))
    params = init_params(arch, np.random.default_rng(0))
    x = np.random.default_rng(1).uniform(0, 1, (5, 784)).astype(np.float32)
    ours = forward_cache(x, params, arch)[-1]
    shared = forward(x, params.weights, params.biases, arch.activations, arch.output)
    np.testing.assert_array_equal(ours, shared)
    assert ours.dtype == np.float32


def test_init_scale_suits_the_activation() -> None:
    rng = np.random.default_rng(0)
    relu = init_params(Architecture((784, 512, 10), ("relu",)), rng)
    tanh = init_params(Architecture((784, 512, 10), ("tanh",)), rng)
    assert relu.weights[0].std() == pytest.approx(np.sqrt(2 / 784), rel=0.05)  # He
    assert tanh.weights[0].std() == pytest.approx(np.sqrt(2 / (784 + 512)), rel=0.05)  # Xavier
    assert all(not b.any() for b in relu.biases)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_optimizers_fit_a_small_problem_and_keep_float32(name: str) -> None:
    rng = np.random.default_rng(0)
    arch = Architecture((20, 16, 3), ("relu",))
    params = init_params(arch, rng)
    x = rng.uniform(0, 1, (60, 20)).astype(np.float32)
    labels = (x[:, :3].argmax(axis=1)).astype(np.uint8)
    y = one_hot(labels, 3)
    opt = make_optimizer(name, params, l2=1e-4)
    lr = {"sgd": 0.5, "momentum": 0.1, "adam": 0.01}[name]
    first = loss(forward_cache(x, params, arch)[-1], y, arch)
    for _ in range(300):
        opt.step(params, backward(forward_cache(x, params, arch), y, params, arch), lr)
    assert loss(forward_cache(x, params, arch)[-1], y, arch) < first / 3
    assert all(p.dtype == np.float32 for p in params.arrays())


def test_l2_decays_weights_not_biases() -> None:
    params = Params([np.ones((2, 2), np.float32)], [np.ones(2, np.float32)])
    zero = Params([np.zeros((2, 2), np.float32)], [np.zeros(2, np.float32)])
    SGD(l2=0.5).step(params, zero, lr=0.1)
    np.testing.assert_allclose(params.weights[0], 0.95)
    np.testing.assert_array_equal(params.biases[0], 1.0)


def test_momentum_and_adam_first_steps() -> None:
    p = Params([np.zeros((1, 1), np.float32)], [np.zeros(1, np.float32)])
    m = Momentum(p, momentum=0.9)
    for _ in range(2):
        m.step(p, Params([np.ones((1, 1), np.float32)], [np.ones(1, np.float32)]), lr=1.0)
    assert p.weights[0][0, 0] == pytest.approx(-(1 + 1.9))
    q = Params([np.zeros((1, 1), np.float32)], [np.zeros(1, np.float32)])
    Adam(q).step(q, Params([np.full((1, 1), 3.0, np.float32)], [np.ones(1, np.float32)]), 0.01)
    assert q.weights[0][0, 0] == pytest.approx(-0.01, rel=1e-4)  # Adam's first step is lr


def test_cosine_schedule() -> None:
    assert learning_rate("cosine", 1.0, 0, 100) == 1.0
    assert learning_rate("cosine", 1.0, 50, 100) == pytest.approx(0.5)
    assert learning_rate("cosine", 1.0, 100, 100) == pytest.approx(0.0)
    assert learning_rate("constant", 0.3, 99, 100) == 0.3
    with pytest.raises(ValueError, match="schedule"):
        learning_rate("step", 1.0, 0, 1)


def test_random_shift_moves_each_image_by_its_own_offset() -> None:
    rng = np.random.default_rng(0)
    images = np.zeros((50, 28, 28), np.uint8)
    images[:, 5:23, 5:23] = rng.integers(1, 255, (50, 18, 18))
    shifted = random_shift(images, 3, np.random.default_rng(7))
    replay = np.random.default_rng(7)
    dy = replay.integers(-3, 4, size=50)
    dx = replay.integers(-3, 4, size=50)
    for i in range(50):  # the reference: np.roll, valid because the borders are empty
        np.testing.assert_array_equal(shifted[i], np.roll(images[i], (dy[i], dx[i]), (0, 1)))
    assert len({(a, b) for a, b in zip(dy, dx, strict=True)}) > 10


def test_random_shift_fills_with_background_and_zero_is_identity() -> None:
    images = np.full((4, 28, 28), 200, np.uint8)
    shifted = random_shift(images, 2, np.random.default_rng(1))
    assert shifted.dtype == np.uint8
    assert set(np.unique(shifted)) <= {0, 200}
    assert random_shift(images, 0, np.random.default_rng(1)) is images


def test_flat_and_per_array_updates_agree() -> None:
    """The flat-buffer fast path computes the same update as array-by-array."""
    arch = Architecture((12, 6, 3), ("relu",))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (8, 12)).astype(np.float32)
    y = one_hot(rng.integers(0, 3, 8).astype(np.uint8), 3)
    flat = init_params(arch, np.random.default_rng(1))
    loose = Params([w.copy() for w in flat.weights], [b.copy() for b in flat.biases])
    assert flat.flat is not None
    assert loose.flat is None
    for name in ("sgd", "momentum", "adam"):
        opt_flat = make_optimizer(name, flat, l2=1e-3)
        opt_loose = make_optimizer(name, loose, l2=1e-3)
        for _ in range(3):
            opt_flat.step(flat, backward(forward_cache(x, flat, arch), y, flat, arch), 0.01)
            grads = backward(forward_cache(x, loose, arch), y, loose, arch)
            opt_loose.step(loose, Params(list(grads.weights), list(grads.biases)), 0.01)
        for a, b in zip(flat.arrays(), loose.arrays(), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_flat_parameters_accept_per_array_gradients() -> None:
    flat = init_params(Architecture((4, 3, 2), ("tanh",)), np.random.default_rng(0))
    before = [a.copy() for a in flat.arrays()]
    ones = Params([np.ones_like(w) for w in flat.weights], [np.ones_like(b) for b in flat.biases])
    make_optimizer("adam", flat).step(flat, ones, 0.01)
    for a, b in zip(flat.arrays(), before, strict=True):
        np.testing.assert_allclose(a, b - 0.01, rtol=1e-4)
