"""Rotary embedding (HF rotate_half pairing): forward against an independent formula,
backward vs finite differences, and the rotation preserves norms."""
import numpy as np
from hypothesis import given, settings, strategies as st

from minilars.ops.rope import rope_backward, rope_forward, rope_tables
from tests.gradcheck import assert_grad_close, examples, numeric_grad


def _reference(x, T, hd, theta, start=0):
    """HF: inv_freq = 1/theta^(arange(0, hd, 2)/hd); emb = cat(freqs, freqs);
    x*cos + rotate_half(x)*sin with rotate_half(x) = cat(-x2, x1)."""
    pos = np.arange(start, start + T)
    out = np.empty_like(x)
    for t in range(T):
        for j in range(hd // 2):
            a = pos[t] * theta ** (-2.0 * j / hd)
            x1, x2 = x[..., t, j], x[..., t, j + hd // 2]
            out[..., t, j] = x1 * np.cos(a) - x2 * np.sin(a)
            out[..., t, j + hd // 2] = x2 * np.cos(a) + x1 * np.sin(a)
    return out


@settings(max_examples=examples(15))
@given(B=st.integers(1, 2), nh=st.integers(1, 3), T=st.integers(1, 9),
       half=st.integers(1, 4), theta=st.sampled_from([10000.0, 100000.0, 7.0]),
       start=st.sampled_from([0, 5]), seed=st.integers(0, 2**32 - 1))
def test_rope_forward_and_backward(B, nh, T, half, theta, start, seed):
    hd = 2 * half
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, nh, T, hd))
    R = rng.standard_normal((B, nh, T, hd))
    cos, sin = rope_tables(T, hd, theta, np.float64, start=start)
    assert cos.shape == sin.shape == (T, hd)
    y = rope_forward(x, cos, sin)
    np.testing.assert_allclose(y, _reference(x, T, hd, theta, start), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)

    dx = rope_backward(R, cos, sin)
    num = numeric_grad(lambda: float(np.sum(rope_forward(x, cos, sin) * R)), x)
    assert_grad_close(dx, num, what="dx")


def test_rope_position_zero_is_identity():
    x = np.random.default_rng(0).standard_normal((1, 2, 1, 6))
    cos, sin = rope_tables(1, 6, 10000.0, np.float64)
    np.testing.assert_array_equal(rope_forward(x, cos, sin), x)
