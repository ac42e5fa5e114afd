"""Cross-entropy fused with the LM head, plain and chunked: backward (dx and dW) vs finite
differences with ignored rows, chunked == plain for any chunk size (including chunks that
are entirely ignored and several vocabulary slabs), and the errors for bad targets."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minilars.ops.loss as loss_mod
from minilars.ops.loss import IGNORE, cross_entropy_chunked, cross_entropy_plain
from tests.gradcheck import assert_grad_close, examples, numeric_grad, rel_err


def _reference_loss(x, W, targets):
    logits = x @ W.T
    kept = targets != IGNORE
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return -logp[kept, targets[kept]].mean()


def _inputs(N, V, C, p_ignore, scale, seed):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal((N, C))
    W = rng.standard_normal((V, C))
    targets = rng.integers(0, V, size=N)
    targets[rng.random(N) < p_ignore] = IGNORE
    if (targets == IGNORE).all():               # keep one row: all-ignored is an error case
        targets[rng.integers(N)] = rng.integers(V)
    return x, W, targets


def _check(f, x, W, dx, dW, targets):
    """dx and dW vs finite differences. The floor of the relative error is the size the
    gradient has when the softmax is not saturated (|dlogits| ~ 1/n): a saturated row has a
    true gradient of ~1e-8 while the loss itself is lse - logit, a cancellation whose
    roundoff finite differences cannot resolve below ~1e-10."""
    n = int((targets != IGNORE).sum())
    assert_grad_close(dx, numeric_grad(f, x), what="dx", floor=np.max(np.abs(W)) / n)
    assert_grad_close(dW, numeric_grad(f, W), what="dW", floor=np.max(np.abs(x)) / n)


shapes = dict(N=st.integers(1, 9), V=st.integers(1, 7), C=st.integers(1, 5),
              p_ignore=st.sampled_from([0.0, 0.3, 0.7]), scale=st.sampled_from([0.3, 3.0]),
              seed=st.integers(0, 2**32 - 1))


@settings(max_examples=examples(20))
@given(**shapes)
def test_plain_cross_entropy_matches_finite_differences(N, V, C, p_ignore, scale, seed):
    x, W, targets = _inputs(N, V, C, p_ignore, scale, seed)
    loss, dx, dW = cross_entropy_plain(x, W, targets, need_dx=True, need_dW=True)
    assert abs(loss - _reference_loss(x, W, targets)) <= 1e-12 * max(1.0, abs(loss))
    f = lambda: cross_entropy_plain(x, W, targets, need_dx=False)[0]
    _check(f, x, W, dx, dW, targets)
    assert np.all(dx[targets == IGNORE] == 0.0)


@settings(max_examples=examples(20))
@given(chunk=st.sampled_from([1, 2, 3, 5, 128]), **shapes)
def test_chunked_cross_entropy_matches_finite_differences(chunk, N, V, C, p_ignore, scale, seed):
    x, W, targets = _inputs(N, V, C, p_ignore, scale, seed)
    dW = np.zeros_like(W)
    loss, dx = cross_entropy_chunked(x, W, targets, need_dx=True, dW=dW, chunk=chunk)
    assert abs(loss - _reference_loss(x, W, targets)) <= 1e-12 * max(1.0, abs(loss))
    f = lambda: cross_entropy_chunked(x, W, targets, need_dx=False, chunk=chunk)[0]
    _check(f, x, W, dx, dW, targets)
    assert np.all(dx[targets == IGNORE] == 0.0)


@settings(max_examples=examples(25))
@given(chunk=st.integers(1, 6), slab=st.sampled_from([1, 2, 3, 4096]), N=st.integers(1, 17),
       V=st.integers(1, 11), C=st.integers(1, 6), p_ignore=st.sampled_from([0.0, 0.5, 0.9]),
       seed=st.integers(0, 2**32 - 1))
def test_chunked_equals_plain(chunk, slab, N, V, C, p_ignore, seed):
    x, W, targets = _inputs(N, V, C, p_ignore, 1.0, seed)
    loss_p, dx_p, dW_p = cross_entropy_plain(x, W, targets, need_dW=True)
    start = np.random.default_rng(seed + 1).standard_normal(W.shape)
    dW_c = start.copy()                              # the chunked form accumulates into dW
    old = loss_mod.VOCAB_SLAB
    loss_mod.VOCAB_SLAB = slab                       # several vocabulary slabs in dW
    try:
        loss_c, dx_c = cross_entropy_chunked(x, W, targets, dW=dW_c, chunk=chunk)
    finally:
        loss_mod.VOCAB_SLAB = old
    assert abs(loss_p - loss_c) <= 1e-12 * max(1.0, abs(loss_p))
    assert rel_err(dx_p, dx_c) < 1e-12
    assert rel_err(dW_p, dW_c - start) < 1e-12


def test_chunked_without_gradients_returns_loss_only():
    x, W, targets = _inputs(5, 4, 3, 0.0, 1.0, 0)
    loss, dx = cross_entropy_chunked(x, W, targets, need_dx=False, chunk=2)
    assert dx is None
    assert abs(loss - _reference_loss(x, W, targets)) < 1e-12


def test_float32_large_logits_are_finite():
    rng = np.random.default_rng(0)
    x = (100 * rng.standard_normal((4, 8))).astype(np.float32)
    W = rng.standard_normal((16, 8)).astype(np.float32)
    t = np.array([0, 3, IGNORE, 15])
    loss, dx = cross_entropy_chunked(x, W, t, chunk=3)
    assert np.isfinite(loss) and np.all(np.isfinite(dx))
    assert abs(loss - _reference_loss(x.astype(np.float64), W.astype(np.float64), t)) < 1e-3 * loss


@pytest.mark.parametrize("fn", [lambda x, W, t: cross_entropy_plain(x, W, t),
                                lambda x, W, t: cross_entropy_chunked(x, W, t, chunk=2)])
def test_bad_targets(fn):
    x, W = np.ones((3, 2)), np.ones((5, 2))
    with pytest.raises(ValueError, match="every target is ignored"):
        fn(x, W, np.full(3, IGNORE))
    with pytest.raises(ValueError, match="target id 5 is out of range for a vocabulary of 5"):
        fn(x, W, np.array([0, 5, IGNORE]))
    with pytest.raises(ValueError, match="target id -3 is out of range"):
        fn(x, W, np.array([0, -3, 1]))
