"""Float32 in, float32 out, for every op's forward, saved tensors and backward. Under
NumPy 2's promotion rules (NEP 50) one np.float64 scalar silently turns a float32 array
into float64: twice the bytes of a saved tensor, and a float64 gradient that the
half-precision-weight kernels then reject."""
import numpy as np

from minilars.ops.attention import (attention_decode, attention_plain_backward,
                                    attention_plain_forward, attention_tiled_backward,
                                    attention_tiled_forward)
from minilars.ops.embedding import embedding_backward, embedding_forward
from minilars.ops.linear import linear_backward, linear_forward
from minilars.ops.loss import cross_entropy_chunked, cross_entropy_plain
from minilars.ops.mlp import swiglu_backward, swiglu_forward
from minilars.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from minilars.ops.rope import rope_backward, rope_forward, rope_tables

F32 = np.float32


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


def _all_f32(*arrays):
    for a in arrays:
        if a is not None:
            assert a.dtype == F32, a.dtype


def test_attention_float32():
    q, k, v, dout = _r(1, 3, 5, 4), _r(1, 1, 5, 4, seed=1), _r(1, 1, 5, 4, seed=2), _r(1, 5, 3, 4, seed=3)
    out, P = attention_plain_forward(q, k, v)
    _all_f32(out, P, *attention_plain_backward(dout, q, k, v, P))
    out, lse = attention_tiled_forward(q, k, v, 2)
    _all_f32(out, lse, *attention_tiled_backward(dout, q, k, v, out, lse, 2))
    _all_f32(attention_decode(q[:, :, -1:], k, v, 4))


def test_other_ops_float32():
    x, w = _r(2, 3, 8), _r(8, seed=1)
    y, rstd = rmsnorm_forward(x, w, 1e-5)
    _all_f32(y, rstd, *rmsnorm_backward(x, x, rstd, w))
    W, b = _r(5, 8, seed=2), _r(5, seed=3)
    y = linear_forward(x, W, b)
    _all_f32(y, *linear_backward(y, x, W, need_dW=True, need_db=True))
    g, u = _r(2, 3, 5, seed=4), _r(2, 3, 5, seed=5)
    _all_f32(swiglu_forward(g, u), *swiglu_backward(g, g, u))
    cos, sin = rope_tables(3, 8, 10000.0, F32)
    h = _r(2, 1, 3, 8)
    _all_f32(cos, sin, rope_forward(h, cos, sin), rope_backward(h, cos, sin))
    E = _r(7, 8, seed=6)
    tokens = np.array([[1, 2, 6]])
    dE = np.zeros_like(E)
    embedding_backward(embedding_forward(tokens, E), tokens, dE)
    _all_f32(embedding_forward(tokens, E), dE)
    t = np.array([1, 0, 6, -100, 3, 2])
    loss, dx, dW = cross_entropy_plain(x.reshape(6, 8), E, t, need_dW=True)
    _all_f32(dx, dW)
    dW = np.zeros_like(E)
    _, dx = cross_entropy_chunked(x.reshape(6, 8), E, t, dW=dW, chunk=4)
    _all_f32(dx, dW)


def test_linear_and_embedding_with_frozen_weights_float32():
    """A frozen W in every form (float16, Packed bf16/q8_0/q4_0/q4_1), through the C path
    and its twin, with many rows (tiles and BLAS) and one row (the streaming kernel):
    float32 out, forward and back; the embedding's rows too."""
    from minilars import kernels
    from minilars.frozen import freeze
    paths = (True, False) if kernels.c_available() else (False,)
    for name in ("float16", "bfloat16", "q8_0", "q4_0", "q4_1"):
        W = freeze(_r(70, 64, seed=7), name)
        for x in (_r(2, 3, 64), _r(1, 1, 64, seed=9)):
            for enabled in paths:
                with kernels.use_c(enabled):
                    y = linear_forward(x, W)
                    dx, _, _ = linear_backward(y, None, W)
                    h = embedding_forward(np.array([[1, 69, 1]]), W, F32)
                _all_f32(y, dx, h)
                assert y.shape == x.shape[:-1] + (70,) and dx.shape == x.shape
                assert h.shape == (1, 3, 64)
