"""IA3 (Liu et al. 2022; Hugging Face PEFT layout): learned vectors, initialised to ones,
that scale a linear's output (k_proj, v_proj) or, for "feed-forward" targets (down_proj),
its input. PEFT's default for Llama: targets k_proj, v_proj, down_proj; feed-forward
down_proj.

  output scaling:  y = (x W^T + b) * l          l (out,)   stored (out, 1) as in PEFT
     saves y0 = x W^T + b (..., out): dl = sum over rows of dy * y0.   dx = (dy * l) W
  input scaling:   y = (x * l) W^T + b          l (in,)    stored (1, in) as in PEFT
     saves x (..., in): dl = sum over rows of x * (dy W).               dx = (dy W) * l

Few parameters, but each adapted linear keeps one (T, width) tensor for backward: the
paper's point that parameter efficiency is not memory efficiency.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilars.ops.linear import linear_backward, linear_forward


@dataclass
class IA3:
    feedforward: bool = False     # scale the input (down_proj) instead of the output


def ia3_forward(x, W, b, scale_vec, cfg: IA3, keep):
    l = scale_vec.reshape(-1)
    if cfg.feedforward:
        keep("x", x)
        return linear_forward(x * l, W, b)
    y0 = linear_forward(x, W, b)
    keep("y0", y0)
    return y0 * l


def ia3_backward(dy, W, scale_vec, cfg: IA3, get, need_dx=True, need_db=False):
    """Returns (dx or None, dl shaped like scale_vec, db or None)."""
    l = scale_vec.reshape(-1)
    dy2 = dy.reshape(-1, dy.shape[-1])
    if cfg.feedforward:
        x = get("x")
        dxs, _, _ = linear_backward(dy, None, W, need_dx=True)     # d(x * l)
        dl = np.einsum("nc,nc->c", dxs.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]))
        dx = dxs * l if need_dx else None
        db = dy2.sum(axis=0) if need_db else None
    else:
        y0 = get("y0")
        dl = np.einsum("nc,nc->c", dy2, y0.reshape(-1, y0.shape[-1]))
        dys = dy * l
        dx = linear_backward(dys, None, W, need_dx=True)[0] if need_dx else None
        db = dys.reshape(-1, dy.shape[-1]).sum(axis=0) if need_db else None
    return dx, dl.reshape(scale_vec.shape), db
