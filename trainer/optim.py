"""Optimizers and learning-rate schedules, updating the parameters in place.

In-place updates keep every array float32 and allocate nothing per step beyond a few
temporaries, which matters because the update runs once per mini-batch.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from trainer.network import Params

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine")
Array = npt.NDArray[Any]


class Optimizer(Protocol):
    def step(self, params: Params, grads: Params, lr: float) -> None:
        """Apply one update for the gradients of the mean cost (`grads` may be overwritten)."""


def _add_l2(params: Params, grads: Params, l2: float) -> None:
    # L2 on weights only: shrinking biases does not reduce overfitting, it only shifts units.
    if l2:
        for g, w in zip(grads.weights, params.weights, strict=True):
            g += w.dtype.type(l2) * w


def _pairs(params: Params, grads: Params) -> list[tuple[Array, Array]]:
    """(parameter, gradient) arrays laid out like `_state`: flat when the parameters are."""
    if params.flat is None:
        return list(zip(params.arrays(), grads.arrays(), strict=True))
    if grads.flat is None:  # gradients from elsewhere: gather them into the same layout
        gathered = params.zeros_like()
        for dst, src in zip(gathered.arrays(), grads.arrays(), strict=True):
            dst[...] = src
        grads = gathered
    assert grads.flat is not None
    return [(params.flat, grads.flat)]


def _state(params: Params) -> list[Array]:
    """Zeroed optimizer state matching `_pairs`' arrays."""
    if params.flat is not None:
        return [np.zeros_like(params.flat)]
    return [np.zeros_like(p) for p in params.arrays()]


class SGD:
    """Plain mini-batch gradient descent, the classic notebook recipe."""

    def __init__(self, l2: float = 0.0) -> None:
        self.l2 = l2

    def step(self, params: Params, grads: Params, lr: float) -> None:
        _add_l2(params, grads, self.l2)
        for p, g in _pairs(params, grads):
            g *= p.dtype.type(lr)
            p -= g


class Momentum:
    """SGD with (heavy-ball) momentum: v = mu v - lr g; p += v."""

    def __init__(self, params: Params, momentum: float = 0.9, l2: float = 0.0) -> None:
        self.mu = momentum
        self.l2 = l2
        self.velocity = _state(params)

    def step(self, params: Params, grads: Params, lr: float) -> None:
        _add_l2(params, grads, self.l2)
        for (p, g), v in zip(_pairs(params, grads), self.velocity, strict=True):
            v *= p.dtype.type(self.mu)
            g *= p.dtype.type(lr)
            v -= g
            p += v


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction folded into the step size.

    Every operation writes into preallocated buffers: per step that is a dozen NumPy calls
    over the flat parameter buffer and no allocation.
    """

    def __init__(
        self,
        params: Params,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        l2: float = 0.0,
    ) -> None:
        self.beta1, self.beta2, self.eps, self.l2 = beta1, beta2, eps, l2
        self.m = _state(params)
        self.v = _state(params)
        self.tmp = _state(params)
        self.t = 0

    def step(self, params: Params, grads: Params, lr: float) -> None:
        _add_l2(params, grads, self.l2)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        # eps scaled by the same correction keeps it equivalent to eps on the corrected v.
        eps = self.eps * math.sqrt(1 - b2**self.t)
        for (p, g), m, v, tmp in zip(_pairs(params, grads), self.m, self.v, self.tmp,
                                     strict=True):
            f = p.dtype.type
            m *= f(b1)
            np.multiply(g, f(1 - b1), out=tmp)
            m += tmp
            np.square(g, out=g)
            g *= f(1 - b2)
            v *= f(b2)
            v += g
            np.sqrt(v, out=tmp)
            tmp += f(eps)
            np.divide(m, tmp, out=tmp)
            tmp *= f(step)
            p -= tmp


def make_optimizer(
    name: str,
    params: Params,
    *,
    l2: float = 0.0,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.999,
) -> Optimizer:
    if name == "sgd":
        return SGD(l2)
    if name == "momentum":
        return Momentum(params, momentum, l2)
    if name == "adam":
        return Adam(params, beta1, beta2, l2=l2)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def learning_rate(schedule: str, base: float, step: int, total_steps: int) -> float:
    """The rate for `step` of `total_steps`: constant, or cosine-annealed towards zero."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
