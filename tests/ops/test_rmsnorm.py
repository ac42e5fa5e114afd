"""RMSNorm, with and without a weight: forward against the formula, backward vs finite
differences for x and w, and the need_dx / need_dw flags."""
import numpy as np
from hypothesis import given, settings, strategies as st

from minilars.ops.rmsnorm import rmsnorm_backward, rmsnorm_forward
from tests.gradcheck import assert_grad_close, examples, numeric_grad

EPS = 1e-5


@settings(max_examples=examples(20))
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), C=st.integers(1, 9),
       with_weight=st.booleans(), scale=st.sampled_from([1e-2, 1.0, 30.0]),
       seed=st.integers(0, 2**32 - 1))
def test_rmsnorm_backward_matches_finite_differences(lead, C, with_weight, scale, seed):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((*lead, C))
    w = rng.standard_normal(C) if with_weight else None
    R = rng.standard_normal((*lead, C))

    y, rstd = rmsnorm_forward(x, w, EPS)
    ref = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * (1.0 if w is None else w)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert rstd.shape == tuple(lead)

    dx, dw = rmsnorm_backward(R, x, rstd, w)
    loss = lambda: float(np.sum(rmsnorm_forward(x, w, EPS)[0] * R))
    # floor: the natural size of dx, rstd * |dy * w|. With C = 1, y = x / sqrt(x^2 + eps)
    # is nearly constant and its true derivative (~1e-8) is below what differences resolve.
    floor = np.max(rstd) * np.max(np.abs(R)) * (1.0 if w is None else np.max(np.abs(w)))
    assert_grad_close(dx, numeric_grad(loss, x, eps=1e-6 * scale), what="dx", floor=floor)
    if with_weight:
        assert_grad_close(dw, numeric_grad(loss, w), what="dw")
    else:
        assert dw is None


def test_rmsnorm_flags():
    rng = np.random.default_rng(1)
    x, w, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal((2, 3, 5))
    _, rstd = rmsnorm_forward(x, w, EPS)
    dx_full, dw_full = rmsnorm_backward(dy, x, rstd, w)
    dx, dw = rmsnorm_backward(dy, x, rstd, w, need_dx=False)
    assert dx is None
    np.testing.assert_array_equal(dw, dw_full)
    dx, dw = rmsnorm_backward(dy, x, rstd, w, need_dw=False)
    assert dw is None
    np.testing.assert_array_equal(dx, dx_full)


def test_rmsnorm_keeps_dtype_float32():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    y, rstd = rmsnorm_forward(x, np.ones(8, np.float32), EPS)
    assert y.dtype == np.float32 and rstd.dtype == np.float32
