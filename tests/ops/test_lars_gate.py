"""The LARS gate's hand-derived backward against central finite differences (float64)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars.adapters.lars import LARS
from minilars.ops.lars_gate import lars_gate_backward, lars_gate_forward

EPS = 1e-5


def init_lars(in_features, rank, block, rng=0, u_init="in", dtype=np.float32):
    """(U, V, alpha) as the LARS adapter initialises them for one linear."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    t = LARS(rank=rank, block=block, u_init=u_init).init("q_proj", 1, in_features, rng, dtype)
    return t["lars_U"], t["lars_V"], t["lars_alpha"]


def _rel_err(analytic, numeric, floor=1e-30):
    """Norm-wise relative error, robust where single entries are near zero; `floor`: the
    scale of the op's gradients, for a tensor whose own gradient is far smaller."""
    scale = max(np.linalg.norm(numeric), np.linalg.norm(analytic), floor)
    return np.linalg.norm(analytic - numeric) / scale


def _numeric_grad(loss, array, h=1e-6):
    """Central differences of loss() with respect to every entry of `array` (in place)."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = loss()
        flat[i] = old - h
        down = loss()
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


@st.composite
def lars_case(draw):
    rows = draw(st.sampled_from([1, 2, 3, 5]))
    block = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    groups = draw(st.integers(1, 4))
    rank = draw(st.sampled_from([1, 2, 3, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, groups * block, block, rank, seed


def _tensors(rows, in_features, rank, block, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, in_features))
    U = rng.normal(size=(in_features, rank)) / np.sqrt(in_features)
    V = rng.normal(size=(rank, in_features // block))     # large, so every path matters
    alpha = np.array([rng.uniform(0.3, 1.5)])
    R = rng.normal(size=(rows, in_features))               # loss = sum(x~ * R)
    return x, U, V, alpha, R


@settings(max_examples=40, deadline=None)
@given(lars_case())
def test_gate_backward_matches_finite_differences(case):
    rows, in_features, block, rank, seed = case
    x, U, V, alpha, R = _tensors(rows, in_features, rank, block, seed)
    loss = lambda: float(np.sum(lars_gate_forward(x, U, V, alpha, block, EPS) * R))
    dx, dU, dV, dalpha = lars_gate_backward(R, x, U, V, alpha, block, EPS)
    # each at the scale of the op's largest gradient: a dV of 1e-4 beside a dx of 1 has
    # central-difference roundoff of 1e-6 of itself (hypothesis found one); a wrong one
    # of that size would still be off by about 1e-4 of the scale
    pairs = [(dx, x), (dU, U), (dV, V), (np.array([dalpha]), alpha)]
    scale = max(np.linalg.norm(g) for g, _ in pairs)
    for analytic, param in pairs:
        assert _rel_err(analytic, _numeric_grad(loss, param), floor=scale) < 1e-6


def test_need_dx_false_returns_none_and_same_weight_grads():
    x, U, V, alpha, R = _tensors(3, 12, 2, 4, seed=1)
    full = lars_gate_backward(R, x, U, V, alpha, 4, EPS)
    part = lars_gate_backward(R, x, U, V, alpha, 4, EPS, need_dx=False)
    assert part[0] is None
    for a, b in zip(full[1:], part[1:]):
        np.testing.assert_array_equal(a, b)


def test_leading_dims_are_kept():
    x, U, V, alpha, R = _tensors(6, 12, 2, 4, seed=2)
    y = lars_gate_forward(x.reshape(2, 3, 12), U, V, alpha, 4, EPS)
    assert y.shape == (2, 3, 12)
    np.testing.assert_allclose(y.reshape(6, 12), lars_gate_forward(x, U, V, alpha, 4, EPS))
    dx = lars_gate_backward(R.reshape(2, 3, 12), x.reshape(2, 3, 12), U, V, alpha, 4, EPS)[0]
    assert dx.shape == (2, 3, 12)


def test_gate_is_blockwise_scaling():
    """With V = 0 the gate is exactly 1; with a hand-made s the blocks scale as stated."""
    x, U, V, alpha, _ = _tensors(2, 6, 1, 3, seed=3)
    np.testing.assert_array_equal(lars_gate_forward(x, U, 0 * V, alpha, 3), x)
    z = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + EPS)
    s = (z @ U) @ V                                                   # (2, 2)
    expect = x.copy()
    expect[:, :3] *= (1 + alpha[0] * s[:, :1])
    expect[:, 3:] *= (1 + alpha[0] * s[:, 1:])
    np.testing.assert_allclose(lars_gate_forward(x, U, V, alpha, 3), expect, rtol=1e-12)


def test_init_lars_ranges_and_errors():
    U, V, a = init_lars(64, 8, 32, 0)
    assert U.shape == (64, 8) and V.shape == (8, 2) and a.shape == (1,) and U.dtype == np.float32
    assert np.abs(U).max() <= 1 / 8 and np.abs(U).max() > 1 / 16
    assert np.abs(V).max() < 1e-3 and a[0] == np.float32(0.1)
    U2, _, _ = init_lars(64, 4, 32, np.random.default_rng(0), u_init="rank")
    assert np.abs(U2).max() <= 0.5 and np.abs(U2).max() > 0.25
    np.testing.assert_array_equal(init_lars(64, 8, 32, 5)[0], init_lars(64, 8, 32, 5)[0])
    with pytest.raises(ValueError, match="block"):
        init_lars(63, 8, 32, 0)
    with pytest.raises(ValueError, match="u_init"):
        init_lars(64, 8, 32, 0, u_init="out")


def test_initial_gate_is_near_identity():
    """At init (V std 1e-4, alpha 0.1) the adapted input equals x to about 1e-5."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 576)).astype(np.float32)
    U, V, a = init_lars(576, 8, 32, 0)
    rel = np.abs(lars_gate_forward(x, U, V, a, 32) - x).max() / np.abs(x).max()
    assert 0 < rel < 1e-4
