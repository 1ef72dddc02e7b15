"""The MLP being trained: initialisation, forward pass with cache, vectorized backprop.

Every step works on a whole mini-batch at once: one matrix product per layer forward and
two backward (one for the first layer, whose input gradient nobody needs). The hidden
activations are the shared in-place ones from service.model, so the network trained here
computes exactly what the service's forward pass computes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.model import ACTIVATIONS, HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS

COSTS = ("cross_entropy", "mse")
Array = npt.NDArray[Any]  # float32 in training, float64 in the gradient check


@dataclass
class Params:
    """Per-layer weights and biases (or their gradients), updated in place.

    Built by `allocate`, every array is a view into one contiguous `flat` buffer, so an
    optimizer updates all parameters with a handful of NumPy calls per step instead of a
    handful per array, and gradients are written into the same preallocated layout.
    """

    weights: list[Array]
    biases: list[Array]
    flat: Array | None = None

    @classmethod
    def allocate(cls, layer_sizes: Sequence[int], dtype: Any = np.float32) -> Params:
        shapes = list(itertools.pairwise(layer_sizes))
        total = sum(i * o + o for i, o in shapes)
        flat = np.zeros(total, dtype=dtype)
        weights, biases, at = [], [], 0
        for fan_in, fan_out in shapes:
            weights.append(flat[at : at + fan_in * fan_out].reshape(fan_in, fan_out))
            at += fan_in * fan_out
        for _, fan_out in shapes:
            biases.append(flat[at : at + fan_out])
            at += fan_out
        return cls(weights, biases, flat)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return (self.weights[0].shape[0], *(w.shape[1] for w in self.weights))

    def arrays(self) -> list[Array]:
        return [*self.weights, *self.biases]

    def zeros_like(self) -> Params:
        return Params.allocate(self.layer_sizes, self.weights[0].dtype)

    def copy(self) -> Params:
        if self.flat is None:
            return Params([w.copy() for w in self.weights], [b.copy() for b in self.biases])
        twin = self.zeros_like()
        assert twin.flat is not None
        twin.flat[...] = self.flat
        return twin


@dataclass(frozen=True)
class Architecture:
    layer_sizes: tuple[int, ...]
    activations: tuple[str, ...]  # one per hidden layer
    output: str = "softmax"
    cost: str = "cross_entropy"

    def __post_init__(self) -> None:
        if len(self.layer_sizes) < 2 or any(s < 1 for s in self.layer_sizes):
            raise ValueError(f"layer sizes must be positive, got {list(self.layer_sizes)}")
        if len(self.activations) != len(self.layer_sizes) - 2:
            raise ValueError("one activation per hidden layer")
        for a in self.activations:
            if a not in HIDDEN_ACTIVATIONS:
                raise ValueError(f"activation must be one of {HIDDEN_ACTIVATIONS}, got {a!r}")
        if self.output not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output must be one of {OUTPUT_ACTIVATIONS}, got {self.output!r}")
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {self.cost!r}")


def init_params(arch: Architecture, rng: np.random.Generator, dtype: type = np.float32) -> Params:
    """He-normal before ReLU, Glorot-uniform before sigmoid/tanh and for the output layer.

    Matching the scale to the activation keeps the variance of the signal roughly constant
    through the layers, which is what lets a deep ReLU stack train from the first step.
    """
    params = Params.allocate(arch.layer_sizes, dtype)
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(arch.layer_sizes)):
        act = arch.activations[i] if i < len(arch.activations) else arch.output
        if act == "relu":
            w = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        else:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, (fan_in, fan_out))
        params.weights[i][...] = w
    return params


def forward_cache(
    x: Array, params: Params, arch: Architecture, dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> list[Array]:
    """Every layer's output, input first; the last is the output layer's activation.

    The derivatives of relu, sigmoid, tanh and the outputs are all functions of the
    activation itself, so the pre-activations need not be kept. With `dropout` > 0 (training
    only, ReLU only) each hidden unit is zeroed with that probability and the survivors are
    scaled by 1 / (1 - dropout) ("inverted" dropout), so the saved model needs no change.
    """
    outs = [x]
    a = x
    last = len(params.weights) - 1
    for i, (w, b) in enumerate(zip(params.weights, params.biases, strict=True)):
        z = a @ w
        z += b
        a = ACTIVATIONS[arch.activations[i] if i < last else arch.output](z)
        if dropout and i < last:
            if rng is None:
                raise ValueError("dropout needs a random generator")
            a *= rng.random(a.shape, dtype=a.dtype) >= dropout
            a *= a.dtype.type(1.0 / (1.0 - dropout))
        outs.append(a)
    return outs


def loss(out: Array, y: Array, arch: Architecture) -> float:
    """Mean cost per example for the output activations `out` and one-hot targets `y`."""
    n = out.shape[0]
    if arch.cost == "mse":
        return float(0.5 * np.square(out - y).sum() / n)
    tiny = np.finfo(out.dtype).tiny
    if arch.output == "softmax":  # y may be smoothed: any distribution over the classes
        return float(-(y * np.log(np.maximum(out, tiny))).sum() / n)
    # Sigmoid outputs with cross-entropy: ten independent binary cross-entropies.
    ce = y * np.log(np.maximum(out, tiny)) + (1 - y) * np.log(np.maximum(1 - out, tiny))
    return float(-ce.sum() / n)


def backward(
    outs: Sequence[Array], y: Array, params: Params, arch: Architecture,
    out: Params | None = None, dropout: float = 0.0,
) -> Params:
    """Gradients of the mean cost for the whole batch, written into `out` when given.

    `dropout` must be the rate `forward_cache` used: a dropped ReLU unit's output is 0, so
    `prev > 0` already carries the mask and only the survivors' 1 / (1 - dropout) remains.
    """
    a = outs[-1]
    n = a.shape[0]
    delta = a - y
    if arch.cost == "mse":
        if arch.output == "sigmoid":
            delta *= a * (1 - a)
        else:  # softmax Jacobian applied to dC/da = a - y
            delta = a * (delta - (delta * a).sum(axis=1, keepdims=True))
    # (softmax or sigmoid) + cross-entropy: delta = a - y exactly.
    delta *= a.dtype.type(1.0 / n)
    grads = out if out is not None else params.zeros_like()
    for i in range(len(params.weights) - 1, -1, -1):
        prev = outs[i]
        np.matmul(prev.T, delta, out=grads.weights[i])
        np.sum(delta, axis=0, out=grads.biases[i])
        if i == 0:
            break
        delta = delta @ params.weights[i].T
        act = arch.activations[i - 1]
        if act == "relu":
            delta *= prev > 0
            if dropout:
                delta *= delta.dtype.type(1.0 / (1.0 - dropout))
        elif act == "sigmoid":
            delta *= prev * (1 - prev)
        else:  # tanh
            delta *= 1 - prev * prev
    return grads


def one_hot(labels: npt.NDArray[np.uint8], n_classes: int, dtype: type = np.float32) -> Array:
    y: Array = np.zeros((labels.shape[0], n_classes), dtype=dtype)
    y[np.arange(labels.shape[0]), labels] = 1
    return y
