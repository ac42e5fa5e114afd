"""LoRA on a frozen linear (Hu et al. 2021; Hugging Face PEFT layout).

    y = x W^T (+ b) + s * (drop(x) A^T) B^T,    s = alpha / r
    A (r, in) uniform in +-1/sqrt(in),  B (out, r) zeros,  so y starts equal to the base.

Saves for backward, and why:
    x   (..., in)  dA = (s dy B)^T drop(x) needs the layer input. This is the tensor that
                   makes LoRA's memory grow with T: one (T, in) input per adapted linear
                   (q, k and v share theirs, and gate and up theirs).
    xa  (..., r)   drop(x) A^T, for dB = s dy^T xa. Tiny (r = 8 numbers per token).
    With dropout, not the mask: the mask is regenerated in backward from its seed.
Backward: dxa = s dy B;  dB = s dy^T xa;  dA = dxa^T drop(x);  dx = dy W + drop'(dxa A).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilars.ops.linear import linear_backward, linear_forward


@dataclass
class LoRA:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    seed: int = 0          # dropout masks: seed + step + module, so a recompute sees the same
    step: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(in_features: int, out_features: int, rank: int, rng: np.random.Generator,
              dtype=np.float32):
    """A (r, in) uniform +-1/sqrt(in) (PEFT's kaiming-uniform with a=sqrt(5)), B (out, r) zeros."""
    bound = 1.0 / np.sqrt(in_features)
    A = rng.uniform(-bound, bound, size=(rank, in_features)).astype(dtype)
    B = np.zeros((out_features, rank), dtype=dtype)
    return A, B


def _dropout_mask(cfg: LoRA, module: str, shape) -> np.ndarray:
    """Keep-mask scaled by 1/(1-p); the same for a given (seed, step, module)."""
    key = [cfg.seed, cfg.step] + [ord(c) for c in module]
    keep = np.random.default_rng(key).random(shape) >= cfg.dropout
    return keep / (1.0 - cfg.dropout)


def lora_forward(x, W, b, A, B, cfg: LoRA, module: str, keep, training: bool = True):
    """x (..., in) -> y (..., out). `keep(name, array)` records what backward needs.
    Dropout applies only in training forwards (not in evaluation or generation)."""
    keep("x", x)
    use_dropout = training and cfg.dropout > 0
    xd = x * _dropout_mask(cfg, module, x.shape).astype(x.dtype) if use_dropout else x
    xa = linear_forward(xd, A)                                  # (..., r)
    keep("xa", xa)
    y = linear_forward(x, W, b)                                 # (..., out)
    y += cfg.scale * linear_forward(xa, B)
    return y


def lora_backward(dy, W, A, B, cfg: LoRA, module: str, get, need_dx=True, need_db=False):
    """Returns (dx or None, dA, dB, db or None)."""
    x, xa = get("x"), get("xa")
    dy2 = dy.reshape(-1, dy.shape[-1])                          # (N, out)
    dB = cfg.scale * (dy2.T @ xa.reshape(-1, xa.shape[-1]))     # (out, r)
    dxa = cfg.scale * (dy2 @ B)                                 # (N, r)
    mask = _dropout_mask(cfg, module, x.shape).astype(x.dtype) if cfg.dropout > 0 else None
    xd = x if mask is None else x * mask
    dA = dxa.T @ xd.reshape(-1, x.shape[-1])                    # (r, in)
    dx = None
    if need_dx:
        dx, _, _ = linear_backward(dy, None, W, need_dx=True)
        dxd = (dxa @ A).reshape(x.shape)
        dx += dxd if mask is None else dxd * mask
    db = dy2.sum(axis=0) if need_db else None
    return dx, dA, dB, db
