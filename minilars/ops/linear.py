"""Linear layer y = x W^T (+ b), Hugging Face layout: W is (out, in).

forward:  x (..., in), W (out, in), b (out,)  ->  y (..., out)
backward: dx = dy W;  dW = dy^T x;  db = sum of dy over rows
Saves for backward: x, but only when dW is needed. A frozen weight needs no weight
gradient, and then the backward needs nothing from the forward at all (dx = dy W uses only
W): that is why frozen layers cost no saved activations unless an adapter asks for them.
A frozen weight stored narrow (a float16 array, or a Packed matrix: bfloat16 bits or GGUF
Q8_0/Q4_0/Q4_1 blocks) goes through minilars.kernels (dequantized a tile at a time, float32
BLAS, no float32 copy of W); a float32/float64 weight of x's dtype goes to NumPy's BLAS.
"""
import numpy as np

from minilars import kernels
from minilars.saved import Keep


def _matmul_xwT(x2d: np.ndarray, W) -> np.ndarray:
    """x2d (N, in) W^T: W (out, in) an ndarray of x's dtype, or any frozen form."""
    if isinstance(W, np.ndarray) and W.dtype == x2d.dtype:
        return x2d @ W.T
    return kernels.matmul_xwT(np.ascontiguousarray(x2d), W)


def _matmul_dyW(dy2d: np.ndarray, W) -> np.ndarray:
    """dy2d (N, out) W: W (out, in) as in _matmul_xwT."""
    if isinstance(W, np.ndarray) and W.dtype == dy2d.dtype:
        return dy2d @ W
    return kernels.matmul_dyW(np.ascontiguousarray(dy2d), W)


def linear_saves(op: str, x_buffer: str, x_shape: tuple, dtype, need_dW: bool) -> list[Keep]:
    """What a linear keeps: its input (buffer `x_buffer`) when its weight trains, else nothing."""
    return [Keep(op, "x", x_shape, dtype, "dW = dy^T x needs the input", buffer=x_buffer)] \
        if need_dW else []


def linear_backward_workspace(rows: int, in_features: int, out_features: int, itemsize: int,
                              need_dW: bool) -> int:
    """Bytes linear_backward allocates: dx (rows, in), and dW (out, in) when W trains."""
    return (rows * in_features + (out_features * in_features if need_dW else 0)) * itemsize


def linear_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    lead = x.shape[:-1]
    y = _matmul_xwT(x.reshape(-1, x.shape[-1]), W)   # (N, out)
    if b is not None:
        y += b.astype(y.dtype, copy=False)
    return y.reshape(*lead, W.shape[0])


def linear_backward(dy: np.ndarray, x: np.ndarray | None, W: np.ndarray,
                    need_dx: bool = True, need_dW: bool = False, need_db: bool = False):
    """Returns (dx, dW, db), each None when not asked for. `x` may be None when dW is not
    needed: the point of not saving it."""
    dy2d = dy.reshape(-1, dy.shape[-1])                               # (N, out)
    dx = _matmul_dyW(dy2d, W).reshape(*dy.shape[:-1], W.shape[1]) if need_dx else None
    dW = None
    if need_dW:
        if x is None:
            raise ValueError("linear_backward: dW was asked for but the input x was not saved")
        dW = dy2d.T @ x.reshape(-1, x.shape[-1])                      # (out, in)
    db = dy2d.sum(axis=0) if need_db else None
    return dx, dW, db
