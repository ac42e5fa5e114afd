"""Linear y = x W^T + b: backward vs finite differences for x, W and b, and the
need_dx / need_dW / need_db flags (a frozen weight needs no saved input)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars.ops.linear import linear_backward, linear_forward
from tests.gradcheck import assert_grad_close, examples, numeric_grad


@settings(max_examples=examples(20))
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), n_in=st.integers(1, 7),
       n_out=st.integers(1, 7), with_bias=st.booleans(), need_dW=st.booleans(),
       need_db=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_linear_backward_matches_finite_differences(lead, n_in, n_out, with_bias, need_dW,
                                                    need_db, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_in))
    W = rng.standard_normal((n_out, n_in))
    b = rng.standard_normal(n_out) if with_bias else None
    R = rng.standard_normal((*lead, n_out))
    need_db = need_db and with_bias

    y = linear_forward(x, W, b)
    np.testing.assert_allclose(y, np.einsum("...i,oi->...o", x, W) + (0 if b is None else b),
                               rtol=1e-12, atol=1e-12)

    dx, dW, db = linear_backward(R, x if need_dW else None, W, need_dx=True,
                                 need_dW=need_dW, need_db=need_db)
    loss = lambda: float(np.sum(linear_forward(x, W, b) * R))
    assert_grad_close(dx, numeric_grad(loss, x), what="dx")
    if need_dW:
        assert_grad_close(dW, numeric_grad(loss, W), what="dW")
    else:
        assert dW is None
    if need_db:
        assert_grad_close(db, numeric_grad(loss, b), what="db")
    else:
        assert db is None


def test_linear_no_dx():
    rng = np.random.default_rng(0)
    x, W, dy = rng.standard_normal((2, 3)), rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
    dx, dW, db = linear_backward(dy, x, W, need_dx=False, need_dW=True)
    assert dx is None and db is None
    np.testing.assert_allclose(dW, dy.T @ x)


def test_linear_dW_without_saved_input_is_an_error():
    W = np.ones((2, 3))
    with pytest.raises(ValueError, match="input x was not saved"):
        linear_backward(np.ones((1, 2)), None, W, need_dW=True)
