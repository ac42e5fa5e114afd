"""LARS (Low-memory Activation-Rank Subspace) on a frozen linear: the gate, in NumPy.

For a frozen linear y = W x~ (+ b) with `in` inputs, block size Bk (in % Bk == 0),
g = in / Bk blocks and rank r:

    z    = x * rsqrt(mean(x^2, -1) + eps)          (N, in)   rmsnorm without a weight
    s    = (z U) V                                 (N, g)    U (in, r), V (r, g)
    gate = 1 + alpha * s                           (N, g)
    x~   = x with block j (features j*Bk .. (j+1)*Bk - 1) multiplied by gate[:, j]

The gate needs nothing saved but x: backward recomputes rstd, z, zU and s from x. With
xb = x as (N, g, Bk):

    dgate = sum_k dx~b * xb              (N, g)     ds    = alpha * dgate
    dalpha = sum(dgate * s)                         dV    = (zU)^T ds        (r, g)
    dzU   = ds V^T                       (N, r)     dU    = z^T dzU          (in, r)
    dz    = dzU U^T                      (N, in)
    dx    = gate (broadcast over blocks) * dx~ + rstd * (dz - z * mean(dz * z, -1))

The functions here are the specification of the fused C kernels (cext/minilars_kernels.c);
`minilars.kernels` dispatches to one or the other.
"""
from __future__ import annotations

import numpy as np


def init_lars(in_features: int, rank: int, block: int, rng=0, u_init: str = "in",
              alpha: float = 0.1, dtype=np.float32):
    """New LARS tensors: U (in, r) uniform in +-1/sqrt(in) (u_init="in", minilars's default)
    or +-1/sqrt(r) (u_init="rank", the authors' other variant); V (r, g) normal with std
    1e-4; alpha (1,) filled with `alpha`. `rng` is a seed or a numpy Generator.
    Returns (U, V, alpha)."""
    if block < 1 or in_features % block:
        raise ValueError(f"init_lars: block {block} does not divide in_features {in_features}")
    if rank < 1:
        raise ValueError(f"init_lars: rank must be at least 1, got {rank}")
    if u_init not in ("in", "rank"):
        raise ValueError(f"init_lars: u_init must be 'in' or 'rank', got {u_init!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    groups = in_features // block
    bound = 1.0 / np.sqrt(in_features if u_init == "in" else rank)
    U = rng.uniform(-bound, bound, size=(in_features, rank)).astype(dtype)   # (in, r)
    V = rng.normal(0.0, 1e-4, size=(rank, groups)).astype(dtype)            # (r, g)
    alpha_array = np.full((1,), alpha, dtype=dtype)                          # (1,)
    return U, V, alpha_array


def lars_gate_statistics(x2d: np.ndarray, U: np.ndarray, V: np.ndarray, alpha, eps: float):
    """Reads x (N, in), U, V, alpha; returns (rstd (N, 1), z (N, in), zU (N, r), s (N, g),
    gate (N, g)). Shared by forward and backward (which recomputes all of it)."""
    ms = np.mean(np.square(x2d), axis=-1, keepdims=True)            # (N, 1)
    rstd = 1.0 / np.sqrt(ms + eps)                                   # (N, 1)
    z = x2d * rstd                                                   # (N, in)
    zU = z @ U                                                       # (N, r)
    s = zU @ V                                                       # (N, g)
    gate = 1.0 + _alpha_value(alpha, x2d.dtype) * s                  # (N, g)
    return rstd, z, zU, s, gate


def _alpha_value(alpha, dtype):
    """alpha as a scalar of `dtype` (accepts a float, a 0-d or a (1,) array)."""
    return np.asarray(alpha, dtype=dtype).reshape(())


def lars_gate_forward(x: np.ndarray, U: np.ndarray, V: np.ndarray, alpha, block: int,
                      eps: float = 1e-5) -> np.ndarray:
    """x (..., in) -> x~ (..., in): each block of `block` features scaled by its gate.
    Reads x, U (in, r), V (r, g), alpha; writes a new array."""
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features)                                 # (N, in)
    groups = in_features // block
    _, _, _, _, gate = lars_gate_statistics(x2d, U, V, alpha, eps)   # (N, g)
    xb = x2d.reshape(-1, groups, block)                              # (N, g, Bk)
    x_tilde = xb * gate[:, :, None]                                  # (N, g, Bk)
    return x_tilde.reshape(x.shape)


def lars_gate_backward(dx_tilde: np.ndarray, x: np.ndarray, U: np.ndarray, V: np.ndarray,
                       alpha, block: int, eps: float = 1e-5, need_dx: bool = True):
    """Gradients of the gate from dx~ (..., in) and x (..., in) alone.
    Returns (dx (..., in) or None, dU (in, r), dV (r, g), dalpha (scalar of x's dtype))."""
    in_features = x.shape[-1]
    groups = in_features // block
    x2d = x.reshape(-1, in_features)                                 # (N, in)
    dxt2d = dx_tilde.reshape(-1, in_features)                        # (N, in)
    rstd, z, zU, s, gate = lars_gate_statistics(x2d, U, V, alpha, eps)
    a = _alpha_value(alpha, x2d.dtype)

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


# ---------------------------------------------------------------- the adapter on a frozen linear

from dataclasses import dataclass  # noqa: E402  (kept next to the adapter it serves)

from minilars.ops.linear import linear_backward, linear_forward  # noqa: E402


@dataclass
class LARS:
    """Hyper-parameters of one LARS linear. U, V, alpha live in model.params as
    <module>.lars_U, <module>.lars_V, <module>.lars_alpha.

    save: how the backward gets z and s.
      "recompute" (default): keep only x. The backward recomputes rstd, z, zU and s from x
          (one (N, in) x (in, r) product, ~r/out of the linear's own cost). x is the same
          buffer for every linear that reads it (q, k, v share one; gate and up share one),
          so the attention and MLP inputs cost one (T, C) tensor each, however many linears
          are adapted. Gradients are identical.
      "keep": keep x and also rstd (N, 1), z (N, in), zU (N, r), s (N, g) of each linear. Saves the
          recompute, but each adapted linear adds its own (T, in) z: three more for q, k, v.
    """
    rank: int = 8
    block: int = 32
    eps: float = 1e-5
    train_alpha: bool = True
    save: str = "recompute"

    def __post_init__(self):
        if self.save not in ("recompute", "keep"):
            raise ValueError(f"LARS save must be 'recompute' or 'keep', got {self.save!r}")


def lars_forward(x, W, b, U, V, alpha, cfg: LARS, keep):
    """x (..., in) -> y (..., out) = W x~ (+ b). `keep(name, array)` records what the
    backward needs: x (always) and, with save="keep", rstd, z, zU and s."""
    in_features = x.shape[-1]
    x2d = x.reshape(-1, in_features)                                 # (N, in)
    keep("x", x)
    if cfg.save == "keep":
        rstd, z, zU, s, gate = lars_gate_statistics(x2d, U, V, alpha, cfg.eps)
        keep("rstd", rstd)
        keep("z", z)
        keep("zU", zU)
        keep("s", s)
        groups = in_features // cfg.block
        x_tilde = (x2d.reshape(-1, groups, cfg.block) * gate[:, :, None]).reshape(x.shape)
    else:
        from minilars import kernels
        x_tilde = kernels.lars_gate_forward(x2d, U, V, alpha, cfg.block, cfg.eps).reshape(x.shape)
    return linear_forward(x_tilde, W, b)


def lars_backward(dy, W, U, V, alpha, cfg: LARS, get, need_dx=True, need_db=False):
    """Returns (dx or None, dU, dV, dalpha (1,), db or None). dx~ = dy W is always needed:
    the gate's gradients come from it, even when dx is not."""
    x = get("x")
    in_features = x.shape[-1]
    dx_tilde, _, _ = linear_backward(dy, None, W, need_dx=True)     # (..., in)
    x2d, dxt2d = x.reshape(-1, in_features), dx_tilde.reshape(-1, in_features)
    if cfg.save == "keep":
        dx, dU, dV, dalpha = _gate_backward_kept(dxt2d, x2d, get("rstd"), get("z"), get("zU"),
                                                  get("s"), U, V, alpha, cfg.block, need_dx)
    else:
        from minilars import kernels
        dx, dU, dV, dalpha = kernels.lars_gate_backward(dxt2d, x2d, U, V, alpha, cfg.block,
                                                        cfg.eps, need_dx)
    db = dy.reshape(-1, dy.shape[-1]).sum(axis=0) if need_db else None
    dx = dx.reshape(x.shape) if dx is not None else None
    return dx, dU, dV, np.reshape(dalpha, (1,)), db


def _gate_backward_kept(dxt2d, x2d, rstd, z, zU, s, U, V, alpha, block, need_dx):
    """lars_gate_backward with z, zU and s taken from the forward instead of recomputed."""
    N, in_features = x2d.shape
    groups = in_features // block
    a = _alpha_value(alpha, x2d.dtype)
    gate = 1.0 + a * s                                               # (N, g)
    xb, dxtb = x2d.reshape(N, groups, block), dxt2d.reshape(N, groups, block)
    dgate = np.sum(dxtb * xb, axis=-1)                               # (N, g)
    ds = a * dgate
    dalpha = np.sum(dgate * s).astype(x2d.dtype)
    dV = zU.T @ ds                                                   # (r, g)
    dzU = ds @ V.T                                                   # (N, r)
    dU = z.T @ dzU                                                   # (in, r)
    if not need_dx:
        return None, dU, dV, dalpha
    dz = dzU @ U.T
    dx = (dxtb * gate[:, :, None]).reshape(N, in_features)
    dx += rstd * (dz - z * np.mean(dz * z, axis=-1, keepdims=True))
    return dx, dU, dV, dalpha
