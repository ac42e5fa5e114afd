"""SiLU-gated MLP activation (SwiGLU), the element-wise middle of Llama's MLP:

    g = m Wg^T, u = m Wu^T     (the two linears live in linear.py)
    act = silu(g) * u,  silu(g) = g * sigmoid(g)                       (..., F)
backward: dg = dact * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)));  du = dact * silu(g)
Saves for backward: g and u (..., F). act itself is saved only by down_proj when its weight
gradient (or an adapter on it) needs it; the sigmoid is recomputed, not kept.
"""
import numpy as np

from minilars.saved import Keep


def swiglu_saves(shape: tuple, dtype) -> list[Keep]:
    """What SwiGLU keeps: g and u, the outputs of gate_proj and up_proj (..., F)."""
    return [Keep("swiglu", "g", shape, dtype, "dg and du need silu(g) and its derivative"),
            Keep("swiglu", "u", shape, dtype, "dg = dact * u * silu'(g)")]


def _sigmoid(g: np.ndarray) -> np.ndarray:
    """sigmoid(g) with e = exp(-|g|): 1/(1+e) for g >= 0, e/(1+e) for g < 0. Exp of a
    non-positive number only, so no overflow, and full relative precision on both sides
    (the tanh form loses digits to cancellation for large negative g)."""
    e = np.exp(-np.abs(g))
    s = 1.0 / (1.0 + e)
    s *= np.where(g < 0, e, 1.0).astype(g.dtype, copy=False)
    return s.astype(g.dtype, copy=False)


def swiglu_forward(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    return g * _sigmoid(g) * u


def swiglu_backward(dact: np.ndarray, g: np.ndarray, u: np.ndarray):
    """Returns (dg, du)."""
    sig = _sigmoid(g)
    silu = g * sig
    du = dact * silu
    dg = dact * u * (sig * (1.0 + g * (1.0 - sig)))
    return dg, du
