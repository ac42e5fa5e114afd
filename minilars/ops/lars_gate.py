"""The LARS gate (Low-memory Activation-Rank Subspace), forward and backward in NumPy.

On a frozen linear y = W x~ (+ b) with `in` inputs, block size Bk (in % Bk == 0),
g = in / Bk blocks and rank r:

    z    = x * rsqrt(mean(x^2, -1) + eps)          (N, in)   rmsnorm without a weight
    s    = (z U) V                                 (N, g)    U (in, r), V (r, g)
    gate = 1 + alpha * s                           (N, g)
    x~   = x with block j (features j*Bk .. (j+1)*Bk - 1) multiplied by gate[:, j]

The gate needs nothing saved but x: its backward recomputes rstd, z, zU and s from x.
With xb = x as (N, g, Bk):

    dgate  = sum_k dx~b * xb             (N, g)     ds    = alpha * dgate
    dalpha = sum(dgate * s)                         dV    = (zU)^T ds        (r, g)
    dzU    = ds V^T                      (N, r)     dU    = z^T dzU          (in, r)
    dz     = dzU U^T                     (N, in)
    dx     = gate (broadcast over blocks) * dx~ + rstd * (dz - z * mean(dz * z, -1))

These functions are the specification of the fused C kernels (cext/minilars_kernels.c);
`minilars.kernels` checks arguments and dispatches to one or the other. The adapter
around the gate (its tensors, init and saved set) is minilars.adapters.lars.
"""
from __future__ import annotations

import numpy as np


def lars_gate_statistics(x2d: np.ndarray, U: np.ndarray, V: np.ndarray, alpha, eps: float):
    """Reads x (N, in), U, V, alpha; returns (rstd (N, 1), z (N, in), zU (N, r), s (N, g),
    gate (N, g)). The forward computes them once; the backward recomputes them from x."""
    ms = np.mean(np.square(x2d), axis=-1, keepdims=True)            # (N, 1)
    rstd = 1.0 / np.sqrt(ms + eps)                                   # (N, 1)
    z = x2d * rstd                                                   # (N, in)
    zU = z @ U                                                       # (N, r)
    s = zU @ V                                                       # (N, g)
    gate = 1.0 + alpha_value(alpha, x2d.dtype) * s                   # (N, g)
    return rstd, z, zU, s, gate


def alpha_value(alpha, dtype):
    """alpha as a scalar of `dtype` (accepts a float, a 0-d or a (1,) array)."""
    return np.asarray(alpha, dtype=dtype).reshape(())


def apply_gate(x2d: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """x (N, in) with each block of in/g features scaled by its gate (N, g): a new array."""
    N, in_features = x2d.shape
    groups = gate.shape[-1]
    xb = x2d.reshape(N, groups, in_features // groups)               # (N, g, Bk)
    return (xb * gate[:, :, None]).reshape(N, in_features)


def lars_gate_forward(x: np.ndarray, U: np.ndarray, V: np.ndarray, alpha, block: int,
                      eps: float = 1e-5) -> np.ndarray:
    """x (..., in) -> x~ (..., in): each block of `block` features scaled by its gate.
    Reads x, U (in, r), V (r, g), alpha; keeps nothing (the caller keeps x)."""
    x2d = x.reshape(-1, x.shape[-1])                                 # (N, in)
    gate = lars_gate_statistics(x2d, U, V, alpha, eps)[-1]           # (N, g)
    return apply_gate(x2d, gate).reshape(x.shape)


def lars_gate_backward(dx_tilde: np.ndarray, x: np.ndarray, U: np.ndarray, V: np.ndarray,
                       alpha, block: int, eps: float = 1e-5, need_dx: bool = True,
                       statistics=None):
    """Gradients of the gate from dx~ (..., in) and x (..., in).
    statistics: (rstd, z, zU, s) kept by the forward; None recomputes them from x (the
    default: then x is all the gate needs kept).
    Returns (dx (..., in) or None, dU (in, r), dV (r, g), dalpha (scalar of x's dtype))."""
    in_features = x.shape[-1]
    groups = in_features // block
    x2d = x.reshape(-1, in_features)                                 # (N, in)
    dxt2d = dx_tilde.reshape(-1, in_features)                        # (N, in)
    a = alpha_value(alpha, x2d.dtype)
    if statistics is None:
        rstd, z, zU, s, gate = lars_gate_statistics(x2d, U, V, alpha, eps)
    else:
        rstd, z, zU, s = statistics
        gate = 1.0 + a * s                                           # (N, g)

    xb = x2d.reshape(-1, groups, block)                              # (N, g, Bk)
    dxtb = dxt2d.reshape(-1, groups, block)                          # (N, g, Bk)
    dgate = np.sum(dxtb * xb, axis=-1)                               # (N, g)
    ds = a * dgate                                                   # (N, g)
    dalpha = np.sum(dgate * s).astype(x2d.dtype)                     # ()
    dV = zU.T @ ds                                                   # (r, g)
    dzU = ds @ V.T                                                   # (N, r)
    dU = z.T @ dzU                                                   # (in, r)
    if not need_dx:
        return None, dU, dV, dalpha
    dz = dzU @ U.T                                                   # (N, in)
    mean_dz_z = np.mean(dz * z, axis=-1, keepdims=True)              # (N, 1)
    dx = (dxtb * gate[:, :, None]).reshape(-1, in_features)          # (N, in) through the gate
    dx += rstd * (dz - z * mean_dz_z)                                # through the rmsnorm
    return dx.reshape(x.shape), dU, dV, dalpha
