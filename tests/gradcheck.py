"""Shared helpers for gradient checks: central finite differences in float64.

    numeric_grad(f, x)          d f / d x by (f(x + eps e_i) - f(x - eps e_i)) / (2 eps),
                                perturbing x in place (and restoring it) one entry at a time
    rel_err(a, b)               max|a - b| / max(max|a|, max|b|, tiny): one number per tensor,
                                scale-free, and 0 only when a == b
    projection_loss(out, R)     sum(out * R): a random linear functional of an op's output,
                                so every output entry carries weight in the scalar loss
"""
from __future__ import annotations

import os

import numpy as np

TINY = 1e-300
EXAMPLES_SCALE = int(os.environ.get("MINILARS_EXAMPLES_SCALE", "1"))


def examples(n: int) -> int:
    """Hypothesis max_examples for a test: n by default, scaled up on request."""
    return n * EXAMPLES_SCALE


def rel_err(a, b, floor: float = TINY) -> float:
    """max|a - b| / max(max|a|, max|b|, floor). `floor` is the scale of the whole
    computation's gradients when one of its tensors is legitimately all zeros (dq of a
    single-position attention, say), where a ratio of two roundoff noises means nothing."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    if a.size == 0:
        return 0.0
    scale = max(np.max(np.abs(a)), np.max(np.abs(b)), floor)
    return float(np.max(np.abs(a - b)) / scale)


def projection_loss(out: np.ndarray, R: np.ndarray) -> float:
    return float(np.sum(out * R))


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6, indices=None) -> np.ndarray:
    """Central differences of the scalar f() with respect to the array x, which f reads
    (x is perturbed in place and restored). With `indices` (a list of index tuples into x)
    only those entries are computed and a 1-D array in that order is returned; otherwise
    the full gradient, shaped like x."""
    assert x.dtype == np.float64, "finite differences are only meaningful in float64"
    if indices is None:
        grad = np.zeros_like(x)
        it = np.nditer(x, flags=["multi_index"])
        idx_list = [it.multi_index for _ in it]
    else:
        idx_list = [tuple(i) for i in indices]
        grad = np.zeros(len(idx_list))
    for n, idx in enumerate(idx_list):
        old = x[idx]
        x[idx] = old + eps
        fp = f()
        x[idx] = old - eps
        fm = f()
        x[idx] = old
        val = (fp - fm) / (2 * eps)
        if indices is None:
            grad[idx] = val
        else:
            grad[n] = val
    return grad


def assert_grad_close(analytic, numeric, tol: float = 1e-6, what: str = "",
                      floor: float = TINY) -> None:
    err = rel_err(analytic, numeric, floor)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"
