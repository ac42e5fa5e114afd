"""Causal grouped-query attention, plain and tiled: forward against a naive reference
(kv heads repeated as HF's repeat_kv does), backward of both forms vs finite differences,
and the two forms agree to rounding. Tiny tiles (1, 2, 3, 5) make T span many tiles,
including T that is not a multiple of the tile and T = 1."""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars import kernels
from minilars.ops.attention import (PARALLEL_QUERY_TILES, _dealt_query_tiles,
                                    attention_op_backward_workspace, attention_plain_backward,
                                    attention_plain_forward, attention_tiled_backward,
                                    attention_tiled_forward)
from tests.gradcheck import assert_grad_close, examples, numeric_grad, rel_err

# (nh, nkv): GQA ratios 1 and 3 (and 2)
HEADS = [(1, 1), (2, 2), (3, 1), (6, 2), (4, 2)]


def _reference(q, k, v):
    """(B, nh, T, hd) x 3 -> (B, T, nh, hd), with an explicit repeat of kv heads."""
    B, nh, T, hd = q.shape
    rep = nh // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    S = q @ k.swapaxes(-1, -2) / np.sqrt(hd)
    S = np.where(np.tril(np.ones((T, T), dtype=bool)), S, -np.inf)
    P = np.exp(S - S.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    return (P @ v).transpose(0, 2, 1, 3)


def _inputs(B, nh, nkv, T, hd, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal((B, nh, T, hd))
    k = scale * rng.standard_normal((B, nkv, T, hd))
    v = rng.standard_normal((B, nkv, T, hd))
    R = rng.standard_normal((B, T, nh, hd))
    return q, k, v, R


def _check_grads(loss, inputs, grads):
    """Each of dq, dk, dv vs finite differences, relative to the largest gradient entry of
    the three (at T = 1, dq and dk are exactly zero: the softmax over one key is constant)."""
    floor = max(np.max(np.abs(g)) for g in grads)
    for name, x, d in zip(("dq", "dk", "dv"), inputs, grads):
        assert_grad_close(d, numeric_grad(loss, x), what=name, floor=floor)


shapes = dict(B=st.integers(1, 2), heads=st.sampled_from(HEADS), T=st.integers(1, 9),
              hd=st.sampled_from([2, 3, 4]), scale=st.sampled_from([0.5, 2.0]),
              seed=st.integers(0, 2**32 - 1))


@settings(max_examples=examples(15))
@given(**shapes)
def test_plain_attention_backward_matches_finite_differences(B, heads, T, hd, scale, seed):
    nh, nkv = heads
    q, k, v, R = _inputs(B, nh, nkv, T, hd, seed, scale)
    out, P = attention_plain_forward(q, k, v)
    assert out.shape == (B, T, nh, hd) and P.shape == (B, nh, T, T)
    np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-12, atol=1e-12)
    dq, dk, dv = attention_plain_backward(R, q, k, v, P)
    loss = lambda: float(np.sum(attention_plain_forward(q, k, v)[0] * R))
    _check_grads(loss, (q, k, v), (dq, dk, dv))


@settings(max_examples=examples(15))
@given(tile=st.sampled_from([1, 2, 3, 5, 64]), **shapes)
def test_tiled_attention_backward_matches_finite_differences(tile, B, heads, T, hd, scale, seed):
    nh, nkv = heads
    q, k, v, R = _inputs(B, nh, nkv, T, hd, seed, scale)
    out, lse = attention_tiled_forward(q, k, v, tile)
    assert out.shape == (B, T, nh, hd) and lse.shape == (B, nh, T)
    np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-12, atol=1e-12)
    dq, dk, dv = attention_tiled_backward(R, q, k, v, out, lse, tile)
    loss = lambda: float(np.sum(attention_tiled_forward(q, k, v, tile)[0] * R))
    _check_grads(loss, (q, k, v), (dq, dk, dv))


@settings(max_examples=examples(25))
@given(tile=st.sampled_from([1, 2, 3, 5, 7]), B=st.integers(1, 2), heads=st.sampled_from(HEADS),
       T=st.integers(1, 23), hd=st.sampled_from([2, 4, 8]), scale=st.sampled_from([0.5, 3.0]),
       seed=st.integers(0, 2**32 - 1))
def test_plain_and_tiled_attention_agree(tile, B, heads, T, hd, scale, seed):
    nh, nkv = heads
    q, k, v, R = _inputs(B, nh, nkv, T, hd, seed, scale)
    out_p, P = attention_plain_forward(q, k, v)
    out_t, lse = attention_tiled_forward(q, k, v, tile)
    assert rel_err(out_p, out_t) < 1e-12
    # lse is the log-sum-exp of each row's scaled, masked scores
    rep = nh // nkv
    S = q @ np.repeat(k, rep, axis=1).swapaxes(-1, -2) / np.sqrt(hd)
    S = np.where(np.tril(np.ones((T, T), dtype=bool)), S, -np.inf)
    m = S.max(-1)
    assert rel_err(lse, m + np.log(np.exp(S - m[..., None]).sum(-1))) < 1e-12
    grads_p = attention_plain_backward(R, q, k, v, P)
    grads_t = attention_tiled_backward(R, q, k, v, out_t, lse, tile)
    floor = max(np.max(np.abs(g)) for g in grads_p)
    for name, a, b in zip(("dq", "dk", "dv"), grads_p, grads_t):
        assert rel_err(a, b, floor) < 1e-12, name
    if T == 1:                      # one key: the softmax is constant, q and k get nothing
        assert np.max(np.abs(grads_t[0])) < 1e-12 * floor


@pytest.mark.parametrize("use_c", [pytest.param(True, marks=pytest.mark.skipif(
    not kernels.c_available(), reason="minilars._cext not built")), False])
@pytest.mark.parametrize("T, tile", [(300, 128), (64, 16), (7, 3)])
def test_float32_tiled_attention_on_both_paths_matches_float64(use_c, T, tile):
    """float32 inputs take the C tile kernels (or their twins, with the C core off): the
    output, lse and gradients stay within float32 rounding of the float64 plain form."""
    q, k, v, R = _inputs(1, 9, 3, T, 64, seed=T, scale=1.5)
    out_p, P = attention_plain_forward(q, k, v)
    grads_p = attention_plain_backward(R, q, k, v, P)
    f32 = [a.astype(np.float32) for a in (q, k, v, R)]
    with kernels.use_c(use_c):
        out_t, lse = attention_tiled_forward(*f32[:3], tile)
        grads_t = attention_tiled_backward(f32[3], *f32[:3], out_t, lse, tile)
    assert out_t.dtype == lse.dtype == np.float32
    assert rel_err(out_p, out_t) < 1e-5
    floor = max(np.max(np.abs(g)) for g in grads_p)
    for name, a, b in zip(("dq", "dk", "dv"), grads_p, grads_t):
        assert b.dtype == np.float32 and rel_err(a, b, floor) < 1e-5, name


@pytest.mark.parametrize("T, tile", [(64, 4), (100, 6)])
def test_forward_with_query_tiles_split_over_workers_matches_one_worker(T, tile):
    """16 or more query tiles and workers > 1: the tiles are dealt to threads, each on one
    BLAS thread. Each tile is computed as it is alone, so out and lse match the one-worker
    forward (to rounding: a product on one BLAS thread may sum differently from two)."""
    q, k, v, _ = _inputs(2, 6, 2, T, 8, seed=T, scale=1.5)
    q, k, v = (a.astype(np.float32) for a in (q, k, v))
    assert -(-T // tile) >= PARALLEL_QUERY_TILES
    one = attention_tiled_forward(q, k, v, tile, workers=1)
    for workers in (2, 3):
        split = attention_tiled_forward(q, k, v, tile, workers=workers)
        for a, b in zip(one, split):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_tiled_backward_accepts_a_noncontiguous_dout():
    """In the model dout arrives as a reshape of o_proj's dx; a transposed view must work too."""
    q, k, v, R = _inputs(1, 3, 1, 7, 4, seed=3)
    out, lse = attention_tiled_forward(q, k, v, 3)
    dout_view = np.ascontiguousarray(R.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not dout_view.flags.c_contiguous
    a = attention_tiled_backward(R, q, k, v, out, lse, 3)
    b = attention_tiled_backward(dout_view, q, k, v, out, lse, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_attention_is_causal():
    """Changing a later key/value must not change earlier outputs."""
    q, k, v, _ = _inputs(1, 2, 2, 6, 4, seed=0)
    out0, _ = attention_tiled_forward(q, k, v, 2)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 4:] += 1.0
    v2[:, :, 4:] -= 1.0
    out1, _ = attention_tiled_forward(q, k2, v2, 2)
    np.testing.assert_array_equal(out0[:, :4], out1[:, :4])
    assert not np.allclose(out0[:, 4:], out1[:, 4:])


@pytest.mark.parametrize("fwd", [attention_plain_forward, attention_tiled_forward])
def test_attention_rejects_bad_head_counts(fwd):
    q = np.zeros((1, 3, 4, 2))
    k = v = np.zeros((1, 2, 4, 2))
    with pytest.raises(ValueError, match="not a multiple of 2 kv heads"):
        fwd(q, k, v)
    with pytest.raises(ValueError, match="do not agree"):
        fwd(q, np.zeros((1, 1, 5, 2)), np.zeros((1, 1, 5, 2)))


@pytest.mark.parametrize("T, tile", [(64, 4), (100, 6)])
def test_backward_with_query_tiles_split_over_workers_matches_one_worker(T, tile):
    """Split over workers, each adds into a dk and dv of its own, summed in worker order:
    dq, dk and dv match the one-worker backward to rounding, and repeat bit for bit."""
    q, k, v, R = _inputs(2, 6, 2, T, 8, seed=T + 1, scale=1.5)
    q, k, v, R = (a.astype(np.float32) for a in (q, k, v, R))
    assert -(-T // tile) >= PARALLEL_QUERY_TILES
    out, lse = attention_tiled_forward(q, k, v, tile)
    one = attention_tiled_backward(R, q, k, v, out, lse, tile, workers=1)
    for workers in (2, 3):
        split = attention_tiled_backward(R, q, k, v, out, lse, tile, workers=workers)
        for a, b in zip(one, split):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        again = attention_tiled_backward(R, q, k, v, out, lse, tile, workers=workers)
        for a, b in zip(split, again):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_split_attentions_tile_kernels_run_on_one_thread_each(monkeypatch, workers):
    """Each worker of a split owns one core, so its tile kernels are told to use one thread:
    OpenMP, asked from a thread it did not start, would take the machine's default count
    (a team per worker, more threads than cores at tiles of 512). Unsplit, they take the
    step's count (None)."""
    asked = []                                   # (kernel, the threads it was given)

    def spy(name, real):
        def call(*args):                         # the callers pass the threads last
            asked.append((name, args[-1]))
            return real(*args)
        return call

    for name in ("attention_tile_softmax", "attention_tile_probs", "attention_tile_dscores"):
        monkeypatch.setattr(kernels, name, spy(name, getattr(kernels, name)))
    q, k, v, R = (a.astype(np.float32) for a in _inputs(1, 4, 2, 64, 8, seed=3, scale=1.0))
    assert -(-64 // 4) >= PARALLEL_QUERY_TILES
    out, lse = attention_tiled_forward(q, k, v, 4, workers=workers)
    attention_tiled_backward(R, q, k, v, out, lse, 4, workers=workers)
    assert {name for name, _ in asked} == {"attention_tile_softmax", "attention_tile_probs",
                                           "attention_tile_dscores"}
    assert {threads for _, threads in asked} == {1 if workers > 1 else None}


@given(T=st.integers(1, 5000), tile=st.sampled_from([32, 64, 128, 256]),
       workers=st.integers(1, 8))
def test_query_tiles_are_dealt_once_each_and_the_workers_loads_even(T, tile, workers):
    """Every query tile goes to one worker, and with at least as many tiles as workers the
    workers' loads (a tile's key tiles, up to its diagonal) differ by less than the worker
    count: longest first, each to the least loaded. Alternate dealing fails this (16 tiles
    on 2 workers: 72 against 64)."""
    shares = _dealt_query_tiles(T, tile, workers)
    assert len(shares) == workers
    assert sorted(i0 for share in shares for i0 in share) == list(range(0, T, tile))
    loads = [sum(i0 // tile + 1 for i0 in share) for share in shares]
    if -(-T // tile) >= workers:
        assert max(loads) - min(loads) < workers


SHAPES = [(9, 3, 64, 1024), (4, 4, 16, 256), (8, 2, 32, 320), (8, 2, 32, 96)]


@pytest.mark.parametrize("form, workers, nh, nkv, hd, T",
                         [(form, 1, *shape) for form in ("plain", "tiled") for shape in SHAPES]
                         + [("tiled", workers, 9, 3, 64, 2048) for workers in (1, 2)]
                         + [("tiled", 2, 9, 3, 64, T) for T in (896, 1024)])
def test_the_declared_backward_workspace_is_what_the_backward_allocates(form, workers,
                                                                       nh, nkv, hd, T):
    """tracemalloc's peak over the backward against the declaration the planner reads: an
    overstatement of 2.3 (T, C) floats (12 MiB at T=4096 on SmolLM2) once made the
    planner's peak RSS 5% high where this moment is the step's peak (--mlp-rows).
    At T=1024 and 2048 (8 and 16 tiles of 128) two workers split the tiled backward, each
    further one with its own tiles, dk and dv; at T=896 (7 tiles) `workers` changes nothing."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, nh, T, hd), dtype=np.float32)
    k, v = (rng.standard_normal((1, nkv, T, hd), dtype=np.float32) for _ in range(2))
    dout = rng.standard_normal((1, T, nh, hd), dtype=np.float32)
    if form == "plain":
        out, P = attention_plain_forward(q, k, v)
        run = lambda: attention_plain_backward(dout, q, k, v, P)
    else:
        out, lse = attention_tiled_forward(q, k, v, tile=128)
        run = lambda: attention_tiled_backward(dout, q, k, v, out, lse, 128, workers)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        run()
        traced = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    declared = attention_op_backward_workspace(form, 1, nh, nkv, T, hd, 128, 4, workers)
    assert 0.95 * declared <= traced <= 1.01 * declared, (traced, declared)
