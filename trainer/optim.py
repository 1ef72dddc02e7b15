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
    def step(self, params: Params, grad_w: list[Array], grad_b: list[Array], lr: float) -> None:
        """Apply one update for the gradients of the mean cost."""


def _add_l2(params: Params, grad_w: list[Array], l2: float) -> None:
    # L2 on weights only: shrinking biases does not reduce overfitting, it only shifts units.
    if l2:
        for g, w in zip(grad_w, params.weights, strict=True):
            g += w.dtype.type(l2) * w


class SGD:
    """Plain mini-batch gradient descent, the classic notebook recipe."""

    def __init__(self, l2: float = 0.0) -> None:
        self.l2 = l2

    def step(self, params: Params, grad_w: list[Array], grad_b: list[Array], lr: float) -> None:
        _add_l2(params, grad_w, self.l2)
        for p, g in zip(params.arrays(), [*grad_w, *grad_b], strict=True):
            p -= p.dtype.type(lr) * g


class Momentum:
    """SGD with (heavy-ball) momentum: v = mu v - lr g; p += v."""

    def __init__(self, params: Params, momentum: float = 0.9, l2: float = 0.0) -> None:
        self.mu = momentum
        self.l2 = l2
        self.velocity = [np.zeros_like(p) for p in params.arrays()]

    def step(self, params: Params, grad_w: list[Array], grad_b: list[Array], lr: float) -> None:
        _add_l2(params, grad_w, self.l2)
        for p, g, v in zip(params.arrays(), [*grad_w, *grad_b], self.velocity, strict=True):
            v *= p.dtype.type(self.mu)
            v -= p.dtype.type(lr) * g
            p += v


class Adam:
    """Adam (Kingma & Ba 2015) with bias correction folded into the step size."""

    def __init__(
        self,
        params: Params,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        l2: float = 0.0,
    ) -> None:
        self.beta1, self.beta2, self.eps, self.l2 = beta1, beta2, eps, l2
        self.m = [np.zeros_like(p) for p in params.arrays()]
        self.v = [np.zeros_like(p) for p in params.arrays()]
        self.t = 0

    def step(self, params: Params, grad_w: list[Array], grad_b: list[Array], lr: float) -> None:
        _add_l2(params, grad_w, self.l2)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step = lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        # eps scaled by the same correction keeps it equivalent to eps on the corrected v.
        eps = self.eps * math.sqrt(1 - b2**self.t)
        for p, g, m, v in zip(params.arrays(), [*grad_w, *grad_b], self.m, self.v, strict=True):
            f = p.dtype.type
            m *= f(b1)
            m += f(1 - b1) * g
            g *= g
            v *= f(b2)
            v += f(1 - b2) * g
            denom = np.sqrt(v)
            denom += f(eps)
            np.divide(m, denom, out=denom)
            denom *= f(step)
            p -= denom


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
