"""RMSNorm, as Llama computes it.

forward:  y = x * rstd * w,   rstd = 1 / sqrt(mean(x^2, last axis) + eps)
          x (..., C), w (C,)  ->  y (..., C), rstd (...)
backward: with xhat = x * rstd and g = dy * w,
          dx = rstd * (g - xhat * mean(g * xhat))       dw = sum over rows of dy * xhat
Saves for backward: x (..., C) and rstd (...). rstd is tiny (one number per row) and
saves recomputing a reduction; xhat is not saved, it is recomputed from x and rstd.
"""
import numpy as np

from minilars.saved import Keep


def rmsnorm_saves(op: str, x_buffer: str, shape: tuple, dtype) -> list[Keep]:
    """What rmsnorm keeps: x (its input, buffer `x_buffer`) and rstd."""
    return [Keep(op, "x", shape, dtype, "dx and dw are functions of the input",
                 buffer=x_buffer),
            Keep(op, "rstd", shape[:-1], dtype, "one number per row, kept rather than "
                 "recomputed by a reduction")]


def rmsnorm_forward(x: np.ndarray, w: np.ndarray | None, eps: float):
    """Returns (y, rstd). `w=None` means no weight (LARS uses the bare normalisation)."""
    ms = np.mean(np.square(x), axis=-1)            # (...)
    rstd = 1.0 / np.sqrt(ms + eps)                 # (...)
    y = x * rstd[..., None]
    if w is not None:
        y *= w.astype(x.dtype, copy=False)
    return y, rstd


def rmsnorm_backward(dy: np.ndarray, x: np.ndarray, rstd: np.ndarray, w: np.ndarray | None,
                     need_dx: bool = True, need_dw: bool = True):
    """Returns (dx or None, dw or None). Allocates two (..., C) arrays, xhat and g (which
    becomes dx in place): rmsnorm_backward_workspace."""
    xhat = x * rstd[..., None]                                     # (..., C)
    dw = None
    if need_dw and w is not None:
        C = x.shape[-1]
        dw = np.einsum("nc,nc->c", dy.reshape(-1, C), xhat.reshape(-1, C))
    if not need_dx:
        return None, dw
    g = dy * w.astype(dy.dtype, copy=False) if w is not None else dy.copy()  # (..., C)
    mean_gx = np.einsum("...c,...c->...", g, xhat)[..., None] / x.shape[-1]  # (..., 1)
    xhat *= mean_gx
    g -= xhat
    g *= rstd[..., None]
    return g, dw                                                    # dx = g


def rmsnorm_backward_workspace(rows: int, width: int, itemsize: int) -> int:
    """Bytes rmsnorm_backward allocates at its peak for `rows` rows of `width`: xhat, and
    g, which it returns as dx."""
    return 2 * rows * width * itemsize
