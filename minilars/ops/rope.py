"""Rotary position embedding, Hugging Face "rotate_half" convention: feature i of a head
is paired with feature i + hd/2 (not with i+1 as in the original paper's interleaving).

tables:   inv_freq_j = theta^(-2j/hd), angle[t, j] = t * inv_freq_j, j < hd/2,
          cos, sin = cos/sin of [angle, angle]                    (T, hd)
forward:  y = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
backward: the rotation is orthogonal, so dx = dy * cos + rotate_half^T(dy * sin),
          rotate_half^T([g1, g2]) = [g2, -g1]
Saves for backward: nothing. cos and sin depend only on positions; the model keeps one
pair of tables per step and the ledger counts them once.
"""
import numpy as np

from minilars.saved import Keep


def rope_saves(T: int, head_dim: int, dtype) -> list[Keep]:
    """The step's one pair of tables: cos and sin (T, hd), for every block's forward,
    recompute and backward."""
    why = "positions only: one pair per step serves every block, forward and backward"
    return [Keep("rope", "cos", (T, head_dim), dtype, why),
            Keep("rope", "sin", (T, head_dim), dtype, why)]


def rope_tables(T: int, head_dim: int, theta: float, dtype=np.float32, start: int = 0):
    """cos, sin of shape (T, hd) for positions start .. start+T-1 (float64 math, then cast)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angle = np.outer(np.arange(start, start + T, dtype=np.float64), inv_freq)   # (T, hd/2)
    angle = np.concatenate([angle, angle], axis=-1)                           # (T, hd)
    return np.cos(angle).astype(dtype), np.sin(angle).astype(dtype)


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (B, nh, T, hd) -> rotated (B, nh, T, hd), a new contiguous array."""
    half = x.shape[-1] // 2
    y = x * cos
    y[..., :half] -= x[..., half:] * sin[:, :half]
    y[..., half:] += x[..., :half] * sin[:, half:]
    return y


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """dy (B, nh, T, hd) -> dx (B, nh, T, hd)."""
    half = dy.shape[-1] // 2
    dx = dy * cos
    dx[..., :half] += dy[..., half:] * sin[:, half:]
    dx[..., half:] -= dy[..., :half] * sin[:, :half]
    return dx
