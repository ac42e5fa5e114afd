"""LARS on a frozen linear (interim: the gate math is minilars.ops.lars_gate)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilars import kernels
from minilars.ops.lars_gate import lars_gate_backward, lars_gate_statistics, apply_gate
from minilars.ops.linear import linear_backward, linear_forward


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


# ---------------------------------------------------------------- the adapter on a frozen linear



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
        x_tilde = apply_gate(x2d, gate).reshape(x.shape)
    else:
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
        stats = tuple(get(n) for n in ("rstd", "z", "zU", "s"))
        dx, dU, dV, dalpha = lars_gate_backward(dxt2d, x2d, U, V, alpha, cfg.block, cfg.eps,
                                                need_dx, statistics=stats)
    else:
        dx, dU, dV, dalpha = kernels.lars_gate_backward(dxt2d, x2d, U, V, alpha, cfg.block,
                                                        cfg.eps, need_dx)
    db = dy.reshape(-1, dy.shape[-1]).sum(axis=0) if need_db else None
    dx = dx.reshape(x.shape) if dx is not None else None
    return dx, dU, dV, np.reshape(dalpha, (1,)), db
