"""SwiGLU act = silu(g) * u: forward against the formula (stable for large |g|),
backward vs finite differences."""
import warnings

import numpy as np
from hypothesis import given, settings, strategies as st

from minilars.ops import mlp
from minilars.ops.mlp import swiglu_backward, swiglu_forward
from tests.gradcheck import assert_grad_close, examples, numeric_grad


@settings(max_examples=examples(20))
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       scale=st.sampled_from([0.1, 1.0, 8.0]), seed=st.integers(0, 2**32 - 1))
def test_swiglu_backward_matches_finite_differences(shape, scale, seed):
    rng = np.random.default_rng(seed)
    g = scale * rng.standard_normal(shape)
    u = rng.standard_normal(shape)
    R = rng.standard_normal(shape)
    act = swiglu_forward(g, u)
    np.testing.assert_allclose(act, g / (1 + np.exp(-g)) * u, rtol=1e-12, atol=1e-15)
    dg, du = swiglu_backward(R, g, u)
    loss = lambda: float(np.sum(swiglu_forward(g, u) * R))
    assert_grad_close(dg, numeric_grad(loss, g), what="dg")
    assert_grad_close(du, numeric_grad(loss, u), what="du")


def test_swiglu_large_inputs_no_overflow():
    g = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype=np.float32)
    u = np.ones_like(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        act = swiglu_forward(g, u)
        dg, du = swiglu_backward(np.ones_like(g), g, u)
    assert act.dtype == np.float32 and np.all(np.isfinite(act)) and np.all(np.isfinite(dg))
    np.testing.assert_allclose(act, [0.0, 0.0, 0.0, 50.0, 1000.0], atol=1e-6)


def test_row_blocks_change_nothing():
    """Over several ROWS-row blocks (and a ragged last one) the result is bit for bit the
    whole-array formula's."""
    rng = np.random.default_rng(5)
    n = 2 * mlp.ROWS + 17
    g, u, d = (rng.normal(size=(1, n, 24)).astype(np.float32) for _ in range(3))
    sig = 1 / (1 + np.exp(-g.astype(np.float64)))
    np.testing.assert_allclose(swiglu_forward(g, u), g * sig * u, rtol=1e-6)
    dg, du = swiglu_backward(d, g, u)
    whole_sig = mlp._sigmoid(g)
    np.testing.assert_array_equal(du, d * (g * whole_sig))
    np.testing.assert_array_equal(dg, d * u * (whole_sig * (1.0 + g * (1.0 - whole_sig))))
    np.testing.assert_array_equal(swiglu_forward(g, u), g * whole_sig * u)


def test_dg_may_take_dacts_place():
    rng = np.random.default_rng(6)
    g, u, d = (rng.normal(size=(3, mlp.ROWS + 5, 8)).astype(np.float32) for _ in range(3))
    dg, du = swiglu_backward(d, g, u)
    d_again = d.copy()
    dg2, du2 = swiglu_backward(d_again, g, u, dg_out=d_again)
    assert np.shares_memory(dg2, d_again)
    np.testing.assert_array_equal(dg2, dg)
    np.testing.assert_array_equal(du2, du)
