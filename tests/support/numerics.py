"""How close a served answer must be to the exact one: a bound from float32, not a guess.

The server computes in float32 with whatever BLAS kernel the CPU picks, and batching changes the
summation order (one row alone vs 256 together), so two correct answers differ by rounding.
A fixed `rtol=1e-5` held on one kernel and may not on another; instead these helpers compute,
per row, a forward error bound by running error analysis. The worst case (Higham, "Accuracy and
Stability of Numerical Algorithms", 3.1: a dot product of length k is off by at most k*u times
the magnitudes it adds up) is useless here: 0.4 in probability for the default model, so it
would accept any answer. Rounding errors of a sum behave like independent random variables
(Higham & Mary, "A New Approach to Probabilistic Rounding Error Analysis", SISC 2019): with
probability at least 1 - 2 exp(-LAMBDA^2 / 2), the error is within LAMBDA * sqrt(k) * u of the
magnitudes, and errors carried in from the layer before add in quadrature through W. With
LAMBDA = 8 that fails once in ~10^14 sums, whatever the kernel's summation order. On uniform
random inputs (large activations) the bound is 2e-5..4e-4 per class for the test models and the
default model, 150-2000x the errors measured (1e-8..1.4e-6); two different models differ by
~1e-1. The answer is compared with the forward computed in float64 (exact for this purpose).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from service.model import ACTIVATIONS, Model

U32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32
LAMBDA = 8.0  # standard deviations of rounding the bound allows (see the module docstring)


def _gamma(k: int) -> float:
    """The probabilistic bound on the relative rounding error of a length-k sum."""
    return LAMBDA * np.sqrt(k) * U32


def exact_forward(model: Model, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The model's forward pass in float64, on the float32 inputs the server computes on."""
    a = np.asarray(x, dtype=np.float32).astype(np.float64)
    for w, b, act in zip(model.weights[:-1], model.biases[:-1], model.activations, strict=True):
        a = ACTIVATIONS[act](a @ w.astype(np.float64) + b)
    z = a @ model.weights[-1].astype(np.float64) + model.biases[-1]
    out = ACTIVATIONS[model.output](z)
    return out / out.sum(axis=1, keepdims=True) if model.output == "sigmoid" else out


def forward_error_bound(model: Model, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Per row and class, the most a float32 forward of `x` may differ from `exact_forward`."""
    a = np.asarray(x, dtype=np.float32).astype(np.float64)
    error = np.zeros_like(a)
    acts = (*model.activations, model.output)
    for w, b, act in zip(model.weights, model.biases, acts, strict=True):
        w64 = w.astype(np.float64)
        magnitude = np.abs(a) @ np.abs(w64) + np.abs(b)
        # Rounding of this layer's sums (+1 for the bias), and the inputs' error carried
        # through W (independent errors add in quadrature), then the activation's own rounding.
        error = np.sqrt((_gamma(w.shape[0] + 1) * magnitude) ** 2 + error**2 @ w64**2)
        z = a @ w.astype(np.float64) + b
        if act != model.output:
            a = ACTIVATIONS[act](z)
            error = error + 4 * U32 * np.abs(a)
    # First order in the logits' errors e: dp_i = p_i (dz_i - sum_j p_j dz_j)
    # = p_i sum_j p_j (dz_i - dz_j), so |dp_i| <= p_i sum_{j != i} p_j (e_i + e_j); a confident
    # answer (p_top near 1, the rest near 0) moves very little whatever the logits' size.
    if model.output == "softmax":
        p = ACTIVATIONS["softmax"](z.copy())
    else:  # normalised sigmoid scores: the same form, with the scores' slope s (1 - s) <= 1/4
        scores = 1 / (1 + np.exp(-z))
        p = scores / scores.sum(axis=1, keepdims=True)
        error = error * 0.25 / scores.sum(axis=1, keepdims=True) * p.shape[1]
    pair = error[:, :, None] + error[:, None, :]  # e_i + e_j
    np.einsum("nii->ni", pair)[:] = 0  # j != i
    moved = p * np.einsum("nj,nij->ni", p, pair)
    return moved + 8 * U32 * p + 1e-12  # the softmax's own rounding, relative to p_i


def assert_probabilities(actual: Any, model: Model, x: npt.ArrayLike) -> None:
    """`actual` (n, 10) is `model`'s answer for `x` up to float32 rounding, on any kernel."""
    actual = np.asarray(actual, dtype=np.float64)
    want = exact_forward(model, x)
    assert actual.shape == want.shape, f"shape {actual.shape}, expected {want.shape}"
    off = np.abs(actual - want)
    bound = forward_error_bound(model, x)
    bad = np.argwhere(off > bound)
    first = tuple(bad[:5].T)
    assert bad.size == 0, (
        f"(row, class) {bad[:5].tolist()} differ from the exact forward by "
        f"{off[first].tolist()}, beyond float32's bound {bound[first].tolist()}"
    )
