"""C kernels against their NumPy twins, argument checks at the boundary, path selection.

The twins are the specification (minilars.ops.lars_gate for the LARS gate,
minilars.ops.mlp for SwiGLU, minilars.ops.attention_tiles for the attention tiles,
minilars.kernels.matmul_*_numpy for the matmuls, kernels.dequantize_numpy (so
minilars.quant.dequantize) for dequantization, frozen.rows_to_float for gather_rows).
Frozen weights in every form: float16 ndarrays and Packed bf16, q8_0, q4_0, q4_1. Tests that
need the compiled module are skipped when it is not built; the NumPy-path tests always run.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars import frozen, kernels, quant
from minilars.frozen import Packed, bf16_bits, bf16_values
from minilars.lab.bench import _temporary_bytes
from minilars.ops import attention_tiles as attention_spec
from minilars.ops import lars_gate as lars_spec
from minilars.ops import mlp as mlp_spec

needs_c = pytest.mark.skipif(not kernels.c_available(), reason="minilars._cext not built")
MAX_EXAMPLES = int(os.environ.get("MINILARS_HYPOTHESIS_EXAMPLES", "30"))


def rel_err(a, b):
    """Norm-wise relative error (robust where single entries cancel to near zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def close(got, want, size, rtol=1e-5):
    """|got - want| within rtol of the larger of |want| and `size` (norm-wise): size is the
    same computation on absolute values, the scale of float32 rounding in cancelling sums."""
    got, want, size = (np.asarray(a, np.float64) for a in (got, want, size))
    scale = max(np.linalg.norm(want), np.linalg.norm(size), 1e-30)
    return np.linalg.norm(got - want) <= rtol * scale


@st.composite
def lars_case(draw):
    rows = draw(st.sampled_from([1, 2, 3, 7, 17, 64]))
    block = draw(st.sampled_from([1, 2, 3, 5, 8, 32]))
    groups = draw(st.integers(1, 12))
    rank = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 9, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    lead = draw(st.sampled_from([None, 2]))           # optional leading batch dimension
    return rows, groups * block, block, rank, seed, lead


def lars_tensors(rows, in_features, rank, block, seed, lead=None, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shape = (lead, rows, in_features) if lead else (rows, in_features)
    x = rng.normal(size=shape).astype(dtype)
    dxt = rng.normal(size=shape).astype(dtype)
    U = (rng.uniform(-1, 1, size=(in_features, rank)) / np.sqrt(in_features)).astype(dtype)
    V = rng.normal(0, 0.5, size=(rank, in_features // block)).astype(dtype)
    alpha = np.array([rng.uniform(0.05, 1.0)], dtype=dtype)
    return x, dxt, U, V, alpha


# ------------------------------------------------------------------ C equals its twin

@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(shape=st.sampled_from([(1,), (3, 5), (2, 7, 33), (1, 64, 1536), (40, 1000)]),
       scale=st.sampled_from([0.5, 3.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_swiglu_c_equals_twin(shape, scale, seed):
    """Within a few float32 ulp of the twin (whose float32 steps round six times), both
    directions; (40, 1000) and (1, 64, 1536)
    are large enough for the kernel's threads."""
    rng = np.random.default_rng(seed)
    g = (scale * rng.standard_normal(shape)).astype(np.float32)
    u, d = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    with kernels.use_c(True):
        act = kernels.swiglu_forward(g, u)
        dg, du = kernels.swiglu_backward(d, g, u)
    want_act = mlp_spec.swiglu_forward(g, u)
    want_dg, want_du = mlp_spec.swiglu_backward(d, g, u)
    for got, want in ((act, want_act), (du, want_du), (dg, want_dg)):
        assert got.shape == shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-6,   # subnormals: the twin's lose digits
                                   atol=2e-6 * float(np.abs(want).max()) + np.finfo(np.float32).tiny)


@needs_c
def test_swiglu_c_sigmoid_is_accurate_over_the_whole_range():
    """act = silu(g) for u = 1 over g in [-120, 120] against float64: within 1 ulp of
    float32 everywhere (the kernel works in double and rounds once), subnormal tail too."""
    g = np.linspace(-120, 120, 2_000_001).astype(np.float32)
    with kernels.use_c(True):
        act = kernels.swiglu_forward(g, np.ones_like(g))
    g64 = g.astype(np.float64)
    truth = g64 / (1 + np.exp(-g64))
    ulp = np.spacing(np.abs(truth).astype(np.float32)).astype(np.float64)
    ulps = np.abs(act - truth) / ulp
    assert ulps.max() <= 1.0, ulps.max()


@needs_c
def test_swiglu_c_writes_dg_over_dact_and_keeps_non_finite_values():
    rng = np.random.default_rng(3)
    g, u, d = (rng.standard_normal((5, 70, 96)).astype(np.float32) for _ in range(3))
    g[0, 0, :3] = [np.inf, np.nan, -np.inf]
    with kernels.use_c(True):
        dg, du = kernels.swiglu_backward(d, g, u)
        d_again = d.copy()
        dg2, du2 = kernels.swiglu_backward(d_again, g, u, dg_out=d_again)
        act = kernels.swiglu_forward(g, u)
    assert np.shares_memory(dg2, d_again)
    np.testing.assert_array_equal(dg2, dg)
    np.testing.assert_array_equal(du2, du)
    assert not np.isfinite(act[0, 0, :3]).any()          # no non-finite g turns finite
    assert np.isfinite(act[1:]).all()


def attention_tile_case(heads, tq, tk, hd, seed, first):
    """Scores (heads, tq, tk) as the tiled attention makes them, and a row state: a row's
    first tile (max -inf, sum 0, acc 0) or a later one (a finite running max and sum)."""
    rng = np.random.default_rng(seed)
    S = (3 * rng.standard_normal((heads, tq, tk))).astype(np.float32)
    if first:
        row_max = np.full((heads, tq), -np.inf, np.float32)
        row_sum, acc = np.zeros((heads, tq), np.float32), np.zeros((heads, tq, hd), np.float32)
    else:
        row_max = (3 * rng.standard_normal((heads, tq))).astype(np.float32)
        row_sum = rng.uniform(1, 50, (heads, tq)).astype(np.float32)
        acc = rng.standard_normal((heads, tq, hd)).astype(np.float32)
    return S, row_max, row_sum, acc


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(heads=st.sampled_from([1, 3, 6]), tq=st.sampled_from([1, 2, 5, 64, 128]),
       hd=st.sampled_from([1, 8, 64]), diagonal=st.booleans(), first=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_attention_tile_kernels_c_equal_twin(heads, tq, hd, diagonal, first, seed):
    """All three tile kernels against their twins, on and off the causal diagonal (where
    tk = tq), for a row's first key tile and a later one: within a few float32 ulp."""
    tk = tq if diagonal else tq + 3
    S, row_max, row_sum, acc = attention_tile_case(heads, tq, tk, hd, seed, first)
    lse = (np.log(np.exp(S.astype(np.float64)).sum(-1)) + 0.5).astype(np.float32)
    dP = np.random.default_rng(seed + 1).standard_normal(S.shape).astype(np.float32)
    D = dP.mean(-1).astype(np.float32)
    got = [a.copy() for a in (S, row_max, row_sum, acc, S, dP)]
    want = [a.copy() for a in got]
    with kernels.use_c(True):
        kernels.attention_tile_softmax(got[0], got[1], got[2], got[3], diagonal)
        kernels.attention_tile_probs(got[4], lse, diagonal)
        kernels.attention_tile_dscores(got[4], got[5], D)
    R = heads * tq
    attention_spec.tile_softmax(want[0].reshape(R, tk), want[1].reshape(R), want[2].reshape(R),
                                want[3].reshape(R, hd), diagonal)
    attention_spec.tile_probs(want[4].reshape(R, tk), lse.reshape(R), diagonal)
    attention_spec.tile_dscores(want[4].reshape(R, tk), want[5].reshape(R, tk), D.reshape(R))
    for name, g, w in zip(["P", "row_max", "row_sum", "acc", "probs", "dS"], got, want):
        np.testing.assert_allclose(g, w, rtol=4e-6, atol=1e-6 * float(np.abs(w).max()) + 1e-30,
                                   err_msg=name)
    if diagonal:                         # hidden scores are exactly 0 in both
        hidden = np.triu(np.ones((tq, tq), bool), k=1)
        assert (got[0][:, hidden] == 0).all() and (got[4][:, hidden] == 0).all()


@needs_c
def test_attention_tile_exp_is_accurate_over_the_whole_range():
    """P = exp(S - lse) over S - lse in [-120, 0.01] against float64: within 2 float32 ulp
    above -87; 0 below it (e^-87 = 1.6e-38, next to float32's smallest normal number)."""
    x = np.linspace(-120, 0.01, 1_000_001).astype(np.float32)
    S = x.reshape(1, -1).copy()
    with kernels.use_c(True):
        kernels.attention_tile_probs(S, np.zeros(1, np.float32), diagonal=False)
    truth = np.exp(x.astype(np.float64))
    normal = x >= -87.0
    ulps = np.abs(S[0][normal] - truth[normal]) / np.spacing(truth[normal].astype(np.float32))
    assert ulps.max() <= 2.0, ulps.max()
    assert (S[0][~normal] == 0).all() and truth[~normal].max() <= np.exp(-87.0)


@needs_c
def test_attention_tile_kernels_keep_non_finite_scores_and_ignore_threads():
    """A NaN or +inf score does not turn finite (its row's sum and output follow it), and
    the rows come out the same on 1 and 2 threads (a block large enough for 2)."""
    S, row_max, row_sum, acc = attention_tile_case(6, 128, 400, 16, seed=5, first=False)
    S[0, 0, 7], S[0, 1, 9] = np.nan, np.inf
    with kernels.use_c(True):
        kernels.attention_tile_softmax(S, row_max, row_sum, acc, diagonal=False)
    assert np.isnan(row_sum[0, 0]) and np.isnan(S[0, 0]).any() and not np.isfinite(S[0, 1]).all()
    assert np.isfinite(S[1:]).all() and np.isfinite(row_sum[1:]).all()
    lib, ffi = kernels._lib, kernels._ffi
    results = []
    for threads in (1, 2):
        S, row_max, row_sum, acc = attention_tile_case(6, 128, 400, 16, seed=6, first=False)
        rc = lib.minilars_attention_tile_softmax(
            ffi.from_buffer("float[]", S), 6 * 128, 400, 0, ffi.from_buffer("float[]", row_max),
            ffi.from_buffer("float[]", row_sum), ffi.from_buffer("float[]", acc), 16, threads)
        assert rc == lib.MINILARS_OK
        results.append((S, row_max, row_sum, acc))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call, match", [
    (lambda S, m, l, a: kernels.attention_tile_softmax(S, m[:, :-1], l, a, False), "row_max"),
    (lambda S, m, l, a: kernels.attention_tile_softmax(S, m, l.astype(np.float64), a, False),
     "row_sum"),
    (lambda S, m, l, a: kernels.attention_tile_softmax(S, m, l, a[:, :-1], False), "acc"),
    (lambda S, m, l, a: kernels.attention_tile_softmax(S[:, :, ::2], m, l, a, False), "S"),
    (lambda S, m, l, a: kernels.attention_tile_softmax(np.ascontiguousarray(S[..., :3]), m, l,
                                                       a, True), "diagonal"),   # 8 rows, 3 cols
    (lambda S, m, l, a: kernels.attention_tile_probs(S, m[:1], False), "lse"),
    (lambda S, m, l, a: kernels.attention_tile_probs(S.astype(np.float16), m, False), "S"),
    (lambda S, m, l, a: kernels.attention_tile_dscores(S[..., :-1], S, m), "P"),
    (lambda S, m, l, a: kernels.attention_tile_dscores(S, S, m[..., None]), "D"),
])
def test_attention_tile_bad_arguments_raise_before_c(c_must_not_run, call, match):
    S, row_max, row_sum, acc = attention_tile_case(2, 4, 4, 3, seed=0, first=True)
    with pytest.raises(ValueError, match=match):
        call(S, row_max, row_sum, acc)


@pytest.mark.parametrize("name,args", [
    ("u", lambda g: (g, g[:, :-1])),                      # shapes differ
    ("u", lambda g: (g, g.astype(np.float64))),
    ("g", lambda g: (g.astype(np.float16), g.astype(np.float16))),
    ("g", lambda g: (g[:, ::2], np.ascontiguousarray(g[:, ::2]))),   # non-contiguous
    ("g", lambda g: (g[:0], g[:0])),
])
def test_swiglu_bad_arguments_raise_before_c(c_must_not_run, name, args):
    g, u = args(np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match=f"swiglu_forward: {name}"):
        kernels.swiglu_forward(g, u)
    with pytest.raises(ValueError, match="swiglu_backward: "):
        kernels.swiglu_backward(np.ones_like(u), g, u)


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(lars_case())
def test_lars_forward_c_equals_twin(case):
    rows, in_features, block, rank, seed, lead = case
    x, _, U, V, alpha = lars_tensors(rows, in_features, rank, block, seed, lead)
    with kernels.use_c(True):
        got = kernels.lars_gate_forward(x, U, V, alpha, block)
    want = lars_spec.lars_gate_forward(x, U, V, alpha, block)
    assert got.shape == x.shape and got.dtype == np.float32
    assert rel_err(got, want) < 1e-5


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(lars_case(), st.booleans())
def test_lars_backward_c_equals_twin(case, need_dx):
    rows, in_features, block, rank, seed, lead = case
    x, dxt, U, V, alpha = lars_tensors(rows, in_features, rank, block, seed, lead)
    with kernels.use_c(True):
        dx, dU, dV, dalpha = kernels.lars_gate_backward(dxt, x, U, V, alpha, block,
                                                        need_dx=need_dx)
    # the twin in float64 is the reference. Sums that cancel (s = zU V, dzU = ds V^T,
    # dalpha = sum dgate s) have float32 rounding relative to the size of their terms, not
    # of their result: the twin run on |inputs| gives that size.
    as64 = lambda arrays, f=lambda a: a: [f(a.astype(np.float64)) for a in arrays]
    want = lars_spec.lars_gate_backward(*as64((dxt, x, U, V, alpha)), block)
    size = lars_spec.lars_gate_backward(*as64((dxt, x, U, V, alpha), np.abs), block)
    if need_dx:
        assert dx.shape == x.shape and dx.dtype == np.float32
        assert close(dx, want[0], size[0])
    else:
        assert dx is None
    assert dU.shape == U.shape and dV.shape == V.shape
    assert close(dU, want[1], size[1])
    assert close(dV, want[2], size[2])
    assert close(dalpha, want[3], size[3])


@needs_c
def test_lars_backward_matches_float32_twin_on_model_shape():
    x, dxt, U, V, alpha = lars_tensors(128, 1536, 8, 32, seed=0)
    with kernels.use_c(True):
        got = kernels.lars_gate_backward(dxt, x, U, V, alpha, 32)
    want = lars_spec.lars_gate_backward(dxt, x, U, V, alpha, 32)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@needs_c
def test_lars_c_detects_a_wrong_result():
    """The comparison can fail: a 0.1% change of V shows in dU (which is linear in V)."""
    x, dxt, U, V, alpha = lars_tensors(9, 96, 8, 32, seed=1)
    with kernels.use_c(True):
        got = kernels.lars_gate_backward(dxt, x, U, V * np.float32(1.001), alpha, 32)
    want = lars_spec.lars_gate_backward(dxt, x, U, V, alpha, 32)
    assert rel_err(got[1], want[1]) > 1e-5


FORMATS = ("f16", "bf16") + quant.FORMATS          # every form of a frozen W
FREEZE_NAME = {"f16": "float16", "bf16": "bfloat16"}


def frozen_weight(shape, fmt, rng):
    """A random (out, in) frozen weight in form `fmt` (in a multiple of 32 for the blocks)."""
    return frozen.freeze(rng.normal(size=shape).astype(np.float32), FREEZE_NAME.get(fmt, fmt))


@st.composite
def matmul_case(draw):
    """(rows, in, out, fmt, tile_floats, seed): one row to many, one-block-wide (in = 32)
    to several tiles, widths that are not multiples of the tile."""
    rows = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 31, 64, 100]))
    fmt = draw(st.sampled_from(FORMATS))
    if fmt in quant.FORMATS:
        in_f = draw(st.sampled_from([32, 64, 96, 160, 288, 576]))
    else:
        in_f = draw(st.sampled_from([1, 3, 16, 17, 31, 32, 33, 255, 257, 576]))
    out_f = draw(st.sampled_from([1, 5, 15, 31, 32, 33, 70, 300, 700]))
    # the tile budget: small ones make many tiles, tiles narrower than the matrix, and
    # (for dx = dy W on a tall W) the row tiles summed into dx
    tile_floats = draw(st.sampled_from([32, 100, 32 * 40, 5000, kernels._TILE_FLOATS]))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, in_f, out_f, fmt, tile_floats, seed


class tile_floats:
    """Set kernels._TILE_FLOATS inside a with block (hypothesis and fixtures don't mix)."""

    def __init__(self, floats):
        self.floats, self.saved = floats, kernels._TILE_FLOATS

    def __enter__(self):
        kernels._TILE_FLOATS = self.floats

    def __exit__(self, *exc):
        kernels._TILE_FLOATS = self.saved


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(matmul_case())
def test_matmul_xwT_c_equals_twin(case):
    """Same tiles, same BLAS calls on the same (exactly dequantized) numbers: equal bits.
    Fewer than _FEW_ROWS rows go through minilars_matvec_xwT, whose sums run in another
    order: there the twin is matched to float32 rounding, 1e-5 of the size of the sum
    (|x| |W|^T). Both match the float64 product to that bound."""
    rows, in_f, out_f, fmt, floats, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, in_f)).astype(np.float32)
    W = frozen_weight((out_f, in_f), fmt, rng)
    with tile_floats(floats):
        with kernels.use_c(True):
            got = kernels.matmul_xwT(x, W)
        twin = kernels.matmul_xwT_numpy(x, W)
    assert got.shape == (rows, out_f) and got.dtype == np.float32
    W64 = frozen.to_float(W, np.float64)
    size = np.abs(x.astype(np.float64)) @ np.abs(W64).T
    if rows >= kernels._FEW_ROWS:
        np.testing.assert_array_equal(got, twin)
    else:
        assert close(got, twin, size)
    assert close(got, x.astype(np.float64) @ W64.T, size)


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(matmul_case())
def test_matmul_dyW_c_equals_twin(case):
    rows, in_f, out_f, fmt, floats, seed = case
    rng = np.random.default_rng(seed)
    dy = rng.normal(size=(rows, out_f)).astype(np.float32)
    W = frozen_weight((out_f, in_f), fmt, rng)
    with tile_floats(floats):
        with kernels.use_c(True):
            got = kernels.matmul_dyW(dy, W)
        twin = kernels.matmul_dyW_numpy(dy, W)
    assert got.shape == (rows, in_f) and got.dtype == np.float32
    np.testing.assert_array_equal(got, twin)
    W64 = frozen.to_float(W, np.float64)
    size = np.abs(dy.astype(np.float64)) @ np.abs(W64)
    assert close(got, dy.astype(np.float64) @ W64, size)


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_is_the_same_on_one_thread_and_many(fmt):
    """Each y[n, c] is one thread's dot product in a fixed order, so the threads a W's
    size selects (kernels._MATVEC_ONE_THREAD) do not change a bit."""
    rng = np.random.default_rng(4)
    W = frozen_weight((301, 96), fmt, rng)
    x = rng.normal(size=(3, 96)).astype(np.float32)
    saved = kernels._MATVEC_ONE_THREAD
    try:
        with kernels.use_c(True):
            kernels._MATVEC_ONE_THREAD = 1 << 40                        # one thread
            one = kernels.matmul_xwT(x, W)
            kernels._MATVEC_ONE_THREAD = 0                              # all of them
            many = kernels.matmul_xwT(x, W)
    finally:
        kernels._MATVEC_ONE_THREAD = saved
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_twins_equal_plain_float_products(fmt):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 608)).astype(np.float32)
    dy = rng.normal(size=(5, 300)).astype(np.float32)
    W = frozen_weight((300, 608), fmt, rng)
    W32 = frozen.to_float(W)
    with tile_floats(5000):                    # several tiles, a summed row tile in dy W
        np.testing.assert_allclose(kernels.matmul_xwT_numpy(x, W), x @ W32.T,
                                   rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(kernels.matmul_dyW_numpy(dy, W), dy @ W32,
                                   rtol=1e-5, atol=1e-4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 6000))
def test_tiles_cover_the_matrix_within_the_budget(n, most):
    pieces = kernels._split(n, most)
    assert pieces[0][0] == 0 and pieces[-1][1] == n
    assert all(a1 == b0 for (_, a1), (b0, _) in zip(pieces, pieces[1:]))
    size = pieces[0][1] - pieces[0][0]
    assert size <= max(most, kernels._TILE_ALIGN)
    assert all(a0 % kernels._TILE_ALIGN == 0 for a0, _ in pieces)
    assert all(a1 - a0 == size for a0, a1 in pieces[:-1])
    assert len(pieces) == -(-n // max(most // kernels._TILE_ALIGN * kernels._TILE_ALIGN,
                                      kernels._TILE_ALIGN))


@pytest.mark.parametrize("out_f,in_f", [(1536, 576), (576, 1536), (49152, 576), (7, 70000)])
def test_dyW_tiles_cover_W_once(out_f, in_f):
    seen = np.zeros((out_f, in_f), np.int8)
    for k0, k1, c0, c1 in kernels._dyW_tiles(out_f, in_f):
        seen[k0:k1, c0:c1] += 1
        assert c0 % quant.BLOCK == 0 and (c1 % quant.BLOCK == 0 or c1 == in_f)
        if in_f <= kernels._TILE_FLOATS // kernels._TILE_ALIGN:
            assert (k1 - k0) * (c1 - c0) <= kernels._TILE_FLOATS
    assert (seen == 1).all()


def _every_bit_pattern(fmt):
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    return bits.view(np.float16) if fmt == "f16" else Packed("bf16", bits.shape, bits)


def _same_values(got, want):
    """Equal float32 bits, NaN for NaN (payloads aside)."""
    assert got.dtype == np.float32 and got.shape == want.shape
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@needs_c
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_dequantize_in_c_is_exact_for_every_bit_pattern(fmt):
    W = _every_bit_pattern(fmt)
    want = W.astype(np.float32) if fmt == "f16" else bf16_values(W.data)
    with kernels.use_c(True):
        _same_values(kernels.dequantize(W), want)
        _same_values(kernels.dequantize(W, rows=(3, 250), cols=(17, 255)), want[3:250, 17:255])
        _same_values(kernels.dequantize(W, rows=(255, 256), cols=(0, 1)), want[255:, :1])
    _same_values(kernels.dequantize_numpy(W, 0, 256, 0, 256), want)


@needs_c
def test_f16_nan_payloads_and_signs_survive():
    """Each NaN keeps its sign and payload (F16C, __fp16 and the bit manipulation agree)."""
    W = _every_bit_pattern("f16")
    with kernels.use_c(True):
        got = kernels.dequantize(W).view(np.uint32)
    bits = W.view(np.uint16).astype(np.uint32)
    nan = ((bits >> 10) & 0x1F == 0x1F) & (bits & 0x3FF != 0)
    want = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13)
    np.testing.assert_array_equal(got[nan] & ~np.uint32(0x00400000), want[nan] & ~np.uint32(0x00400000))


def random_blocks(fmt, rows, in_f, rng):
    """Random bytes as a Packed matrix: every scale (NaN, Inf, subnormal) and nibble."""
    data = rng.integers(0, 256, size=(rows, quant.row_bytes(fmt, in_f)), dtype=np.uint8)
    return Packed(fmt, (rows, in_f), data)


@needs_c
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_c_dequantizes_random_blocks_like_quant(fmt):
    """Random bytes (4096 x 8 blocks): the C kernel gives quant.dequantize's float32 bits."""
    W = random_blocks(fmt, 4096, 256, np.random.default_rng(1))
    with np.errstate(invalid="ignore", over="ignore"):
        want = quant.dequantize(W.data, fmt, 256)
    with kernels.use_c(True):
        _same_values(kernels.dequantize(W), want)
        _same_values(kernels.gather_rows(W, np.arange(4096)[::-1]), want[::-1])


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(st.sampled_from(FORMATS), st.integers(1, 40), st.integers(1, 9), st.data())
def test_dequantize_c_equals_twin_on_any_tile(fmt, rows, blocks, data):
    """Any rows [r0, r1) and block-aligned columns [c0, c1), random bytes for the GGUF
    formats: C and its twin give the same bits."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    step = quant.BLOCK if fmt in quant.FORMATS else 1
    in_f = blocks * quant.BLOCK if step > 1 else data.draw(st.integers(1, 300))
    W = random_blocks(fmt, rows, in_f, rng) if step > 1 else frozen_weight((rows, in_f), fmt, rng)
    r0 = data.draw(st.integers(0, rows - 1))
    r1 = data.draw(st.integers(r0 + 1, rows))
    c0 = data.draw(st.integers(0, in_f // step - 1)) * step
    c1 = data.draw(st.integers(c0 // step + 1, in_f // step)) * step
    with kernels.use_c(True), np.errstate(invalid="ignore", over="ignore"):
        got = kernels.dequantize(W, rows=(r0, r1), cols=(c0, c1))
    with np.errstate(invalid="ignore", over="ignore"):
        _same_values(got, kernels.dequantize_numpy(W, r0, r1, c0, c1))
        _same_values(got, frozen.to_float(W)[r0:r1, c0:c1])


def test_block_products_are_exact_in_float32():
    """Why FMA contraction could not change a GGUF weight: for every float16 scale d and
    every q (int8 for Q8_0, 0..15 and -8..7 for the 4-bit formats) d * q is exact in
    float32 (11 significant bits times at most 8), so d * q + m rounds once either way.
    The module is still built with -ffp-contract=off: the C means what it writes."""
    d = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    d = d[np.isfinite(d)][:, None]                                     # (finite halves, 1)
    q = np.arange(-128, 128, dtype=np.float32)[None, :]                # (1, 256)
    exact = d.astype(np.float64) * q.astype(np.float64)
    np.testing.assert_array_equal((d * q).astype(np.float64), exact)


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(st.sampled_from(FORMATS), st.integers(1, 50), st.integers(1, 6), st.integers(0, 80),
       st.integers(0, 2**31 - 1))
def test_gather_rows_c_equals_twin(fmt, rows, blocks, n, seed):
    """Rows in any order, repeated, or none: C equals frozen.rows_to_float bit for bit."""
    rng = np.random.default_rng(seed)
    in_f = blocks * quant.BLOCK
    E = frozen_weight((rows, in_f), fmt, rng)
    index = rng.integers(0, rows, size=n)
    with kernels.use_c(True):
        got = kernels.gather_rows(E, index)
    assert got.shape == (n, in_f)
    _same_values(got, frozen.rows_to_float(E, index, np.float32))
    with kernels.use_c(False):
        _same_values(kernels.gather_rows(E, index), got)


# ------------------------------------------------------------------ bfloat16 (frozen.bf16_bits)

def test_bf16_bits_rounds_to_nearest_even():
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5,
                       np.inf, -np.inf, 3.4e38, 0.0, -0.0], dtype=np.float32)
    got = bf16_values(bf16_bits(values))
    want = np.array([1.0, 1.0, 1.0 + 4 * 2**-8, 1.0 + 2 * 2**-8, -2.5,
                     np.inf, -np.inf, np.inf, 0.0, -0.0], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[-1])
    assert np.isnan(bf16_values(bf16_bits(np.array([np.nan], np.float32))))[0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1,
                max_size=50))
def test_bf16_round_trip_error_is_half_an_ulp(values):
    f32 = np.array(values, dtype=np.float32)
    back = bf16_values(bf16_bits(f32)).astype(np.float64)
    finite = np.isfinite(back)
    # half a bfloat16 ulp: 2^-8 relative, or 2^-134 absolute among the subnormals
    err = np.abs(back[finite] - f32[finite]) / np.maximum(np.abs(f32[finite]), 2.0**-126)
    assert (err <= 2.0**-8 + 1e-12).all()


# ------------------------------------------------------------------ boundary checks

class _Exploding:
    """Stand-in for the C library: any call fails the test, so a check must come first."""

    def __getattr__(self, name):
        if name.startswith("MINILARS_"):
            return {"MINILARS_OK": 0, "MINILARS_ERR_ARGS": -1,
                    "MINILARS_WEIGHT_F16": 1, "MINILARS_WEIGHT_BF16": 2, "MINILARS_WEIGHT_Q8_0": 3,
                    "MINILARS_WEIGHT_Q4_0": 4, "MINILARS_WEIGHT_Q4_1": 5}[name]
        raise AssertionError(f"C function {name} was called with bad arguments")


@pytest.fixture
def c_must_not_run(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", _Exploding())
    monkeypatch.setattr(kernels, "_enabled", True)


def _good_lars():
    x, dxt, U, V, alpha = lars_tensors(4, 12, 2, 3, seed=0)
    return x, dxt, U, V, alpha


BAD_LARS_FORWARD = [
    ("x", lambda x, U, V: (x.astype(np.float16), U, V, 3)),
    ("x", lambda x, U, V: (x[:, ::2], U[::2], V[:, :2], 3)),             # non-contiguous
    ("x", lambda x, U, V: (x[:0], U, V, 3)),                            # N = 0
    ("x", lambda x, U, V: (x[:, :0], U[:0], V[:, :0], 3)),              # in = 0
    ("x", lambda x, U, V: (x.tolist(), U, V, 3)),
    ("U", lambda x, U, V: (x, U.astype(np.float64), V, 3)),
    ("U", lambda x, U, V: (x, U[:5], V, 3)),
    ("U", lambda x, U, V: (x, np.asfortranarray(U), V, 3)),
    ("V", lambda x, U, V: (x, U, V[:, :3], 3)),
    ("V", lambda x, U, V: (x, U, V[:1], 3)),
    ("block", lambda x, U, V: (x, U, V, 5)),
    ("block", lambda x, U, V: (x, U, V, 0)),
]


@pytest.mark.parametrize("name,make", BAD_LARS_FORWARD)
def test_lars_forward_bad_arguments_raise_before_c(c_must_not_run, name, make):
    x, _, U, V, alpha = _good_lars()
    args = make(x, U, V)
    with pytest.raises(ValueError, match=name):
        kernels.lars_gate_forward(args[0], args[1], args[2], alpha, args[3])


def test_lars_bad_alpha_and_dx_tilde_raise_before_c(c_must_not_run):
    x, dxt, U, V, alpha = _good_lars()
    with pytest.raises(ValueError, match="alpha"):
        kernels.lars_gate_forward(x, U, V, np.ones(2, np.float32), 3)
    with pytest.raises(ValueError, match="dx_tilde"):
        kernels.lars_gate_backward(dxt[:2], x, U, V, alpha, 3)
    with pytest.raises(ValueError, match="dx_tilde"):
        kernels.lars_gate_backward(dxt.astype(np.float64), x, U, V, alpha, 3)
    with pytest.raises(ValueError, match="dx_tilde"):
        kernels.lars_gate_backward(np.asfortranarray(dxt), x, U, V, alpha, 3)
    with pytest.raises(ValueError, match="block"):
        kernels.lars_gate_backward(dxt, x, U, V, alpha, 5)


def _q8(rows, in_f):
    return frozen.freeze(np.ones((rows, in_f), np.float32), "q8_0")


def _strided_packed(rows, in_f):
    """A Packed q8_0 whose data has the right shape but is not C-contiguous."""
    wide = np.zeros((rows, 2 * quant.row_bytes("q8_0", in_f)), np.uint8)
    return Packed("q8_0", (rows, in_f), wide[:, ::2])


BAD_MATMUL = [
    ("x", lambda x, W: (x.astype(np.float16), W)),
    ("x", lambda x, W: (x[:, ::2], W[:, ::2].copy())),
    ("x", lambda x, W: (x[:0], W)),
    ("x", lambda x, W: (x.reshape(1, *x.shape), W)),
    ("W", lambda x, W: (x, W[:, :5])),
    ("W", lambda x, W: (x, W.astype(np.int16))),
    ("W", lambda x, W: (x, W.view(np.uint16))),                          # no bits-means-bf16 pun
    ("W", lambda x, W: (x, W.T)),                                       # non-contiguous
    ("W", lambda x, W: (x, W[:0])),
    ("W", lambda x, W: (x, W.astype(np.float64))),                      # float W of another dtype
    ("W", lambda x, W: (x, W.tolist())),
    ("W has shape \\(6, 64\\)", lambda x, W: (x, _q8(6, 64))),           # Packed of another width
    ("W.data", lambda x, W: (np.ones((4, 32), np.float32), _strided_packed(6, 32))),
]


@pytest.mark.parametrize("name,make", BAD_MATMUL)
def test_matmul_xwT_bad_arguments_raise_before_c(c_must_not_run, name, make):
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float16)
    a, w = make(x, W)
    with pytest.raises(ValueError, match=name):
        kernels.matmul_xwT(a, w)


def test_matmul_dyW_bad_arguments_raise_before_c(c_must_not_run):
    rng = np.random.default_rng(0)
    dy, W = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float16)
    with pytest.raises(ValueError, match="dy"):
        kernels.matmul_dyW(dy[:, :5], W)
    with pytest.raises(ValueError, match="dy"):
        kernels.matmul_dyW(np.asfortranarray(dy), W)
    with pytest.raises(ValueError, match="W"):
        kernels.matmul_dyW(dy, W[::2])
    with pytest.raises(ValueError, match="W has shape \\(5, 64\\)"):
        kernels.matmul_dyW(dy, _q8(5, 64))
    with pytest.raises(ValueError, match="W.data"):
        kernels.matmul_dyW(dy, _strided_packed(6, 32))


def test_a_packed_matrix_whose_data_does_not_match_its_shape_is_refused():
    """Packed checks its own bytes against its shape, so the kernels can trust it."""
    with pytest.raises(ValueError, match="q8_0 matrix of shape \\(6, 64\\)"):
        Packed("q8_0", (6, 64), np.zeros((6, 34), np.uint8))
    with pytest.raises(ValueError, match="bf16 matrix"):
        Packed("bf16", (6, 64), np.zeros((6, 64), np.float16))
    with pytest.raises(ValueError, match="multiple of 32"):
        Packed("q4_1", (6, 40), np.zeros((6, 25), np.uint8))


BAD_DEQUANTIZE = [
    ("W", lambda W: (W.astype(np.float32), None, None)),
    ("W", lambda W: (W.view(np.uint16), None, None)),                    # no bits-means-bf16 pun
    ("W", lambda W: (W.T, None, None)),                                 # non-contiguous
    ("W", lambda W: (W.reshape(-1), None, None)),
    ("W", lambda W: (W[:0], None, None)),
    ("W.data", lambda W: (_strided_packed(6, 32), None, None)),
    ("rows", lambda W: (W, (0, 7), None)),
    ("rows", lambda W: (W, (3, 3), None)),
    ("rows", lambda W: (W, (-1, 2), None)),
    ("rows", lambda W: (W, 2, None)),
    ("cols", lambda W: (W, None, (0, 9))),
    ("cols", lambda W: (W, None, (0.0, 2))),
    ("cols", lambda W: (W, None, (1, 2, 3))),
    ("cols", lambda W: (_q8(6, 64), None, (0, 40))),                    # not on a block edge
    ("cols", lambda W: (_q8(6, 64), None, (16, 64))),
]


@pytest.mark.parametrize("name,make", BAD_DEQUANTIZE)
def test_dequantize_bad_arguments_raise_before_c(c_must_not_run, name, make):
    W = np.ones((6, 8), np.float16)
    a, rows, cols = make(W)
    with pytest.raises(ValueError, match=name):
        kernels.dequantize(a, rows=rows, cols=cols)


BAD_GATHER = [
    ("E", lambda E, i: (np.ones((6, 32), np.float32), i)),
    ("E", lambda E, i: (E.data, i)),                                    # raw bytes, no format
    ("E.data", lambda E, i: (_strided_packed(6, 32), i)),
    ("index", lambda E, i: (E, i.astype(np.float64))),
    ("index", lambda E, i: (E, i.reshape(1, -1))),
    ("index holds -1", lambda E, i: (E, np.array([0, -1, 2]))),
    ("index holds 6", lambda E, i: (E, np.array([6, 0]))),
]


@pytest.mark.parametrize("name,make", BAD_GATHER)
def test_gather_rows_bad_arguments_raise_before_c(c_must_not_run, name, make):
    E, index = make(_q8(6, 32), np.array([0, 5, 5, 1]))
    with pytest.raises(ValueError, match=name):
        kernels.gather_rows(E, index)


@needs_c
def test_c_dequantize_refuses_bad_ranges_and_writes_nothing():
    """The kernel's own range checks (a second line behind the Python ones)."""
    lib, ffi = kernels._lib, kernels._ffi
    W = np.arange(24, dtype=np.float16).reshape(4, 6)
    tile = np.full(24, 7.0, np.float32)
    args = lambda *a: (ffi.from_buffer("uint16_t[]", W), *a, ffi.from_buffer("float[]", tile))
    for fmt, bounds in [(lib.MINILARS_WEIGHT_F16, (4, 6, 0, 5, 0, 6)),     # r1 > rows
                        (lib.MINILARS_WEIGHT_F16, (4, 6, 2, 2, 0, 6)),     # empty rows
                        (lib.MINILARS_WEIGHT_F16, (4, 6, 0, 4, 3, 7)),     # c1 > cols
                        (lib.MINILARS_WEIGHT_F16, (4, 6, -1, 4, 0, 6)),
                        (lib.MINILARS_WEIGHT_F16, (0, 6, 0, 1, 0, 6)),     # no rows at all
                        (99, (4, 6, 0, 4, 0, 6))]:                         # unknown format
        assert lib.minilars_dequantize(*args(fmt, *bounds)) == lib.MINILARS_ERR_ARGS
    assert (tile == 7.0).all()
    assert lib.minilars_dequantize(*args(lib.MINILARS_WEIGHT_F16, 4, 6, 1, 3, 2, 5)) == lib.MINILARS_OK
    np.testing.assert_array_equal(tile[:6], W[1:3, 2:5].astype(np.float32).ravel())
    assert (tile[6:] == 7.0).all()


@needs_c
@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_c_dequantize_refuses_columns_off_the_blocks_and_writes_nothing(fmt):
    lib, ffi = kernels._lib, kernels._ffi
    W = frozen.freeze(np.ones((4, 64), np.float32), fmt)
    code = getattr(lib, kernels._PACKED_CODES[fmt])
    tile = np.full(4 * 64, 7.0, np.float32)
    args = lambda *a: (ffi.from_buffer("char[]", W.data), code, *a, ffi.from_buffer("float[]", tile))
    for bounds in [(4, 64, 0, 4, 0, 40), (4, 64, 0, 4, 16, 64), (4, 64, 0, 4, 1, 33),
                   (4, 48, 0, 4, 0, 32),                                 # cols not whole blocks
                   (4, 64, 0, 4, 0, 96)]:                                 # c1 > cols
        assert lib.minilars_dequantize(*args(*bounds)) == lib.MINILARS_ERR_ARGS
    assert (tile == 7.0).all()
    assert lib.minilars_dequantize(*args(4, 64, 1, 3, 32, 64)) == lib.MINILARS_OK
    np.testing.assert_array_equal(tile[:64], frozen.to_float(W)[1:3, 32:].ravel())
    assert (tile[64:] == 7.0).all()


@needs_c
def test_c_gather_refuses_an_index_out_of_range_and_writes_nothing():
    """Every index is checked before the first row is written."""
    lib, ffi = kernels._lib, kernels._ffi
    E = frozen.freeze(np.ones((4, 32), np.float32), "q4_1")
    out = np.full((3, 32), 7.0, np.float32)
    for index in ([0, 1, 4], [0, -1, 2], [9, 0, 0]):
        index = np.array(index, np.int64)
        rc = lib.minilars_gather_rows(ffi.from_buffer("char[]", E.data), lib.MINILARS_WEIGHT_Q4_1,
                                      4, 32, ffi.from_buffer("int64_t[]", index), 3,
                                      ffi.from_buffer("float[]", out))
        assert rc == lib.MINILARS_ERR_ARGS and (out == 7.0).all()


@needs_c
def test_c_matvec_refuses_a_short_workspace_and_writes_nothing():
    lib, ffi = kernels._lib, kernels._ffi
    x, W = np.ones((2, 8), np.float32), np.ones((5, 8), np.float16)
    y = np.full((2, 5), 7.0, np.float32)
    need = lib.minilars_matvec_xwT_workspace(8, 2)
    assert need == 16 and lib.minilars_matvec_xwT_workspace(0, 2) == -1
    work = np.empty(need - 1, np.float32)
    rc = lib.minilars_matvec_xwT(ffi.from_buffer("float[]", x), ffi.from_buffer("uint16_t[]", W),
                                 lib.MINILARS_WEIGHT_F16, 2, 8, 5, ffi.from_buffer("float[]", y),
                                 2, ffi.from_buffer("float[]", work), work.size)
    assert rc == lib.MINILARS_ERR_ARGS and (y == 7.0).all()
    work = np.empty(need, np.float32)
    rc = lib.minilars_matvec_xwT(ffi.from_buffer("float[]", x), ffi.from_buffer("uint16_t[]", W),
                                 lib.MINILARS_WEIGHT_F16, 2, 8, 5, ffi.from_buffer("float[]", y),
                                 0, ffi.from_buffer("float[]", work), work.size)   # no threads
    assert rc == lib.MINILARS_ERR_ARGS and (y == 7.0).all()


def test_good_arguments_do_reach_c(c_must_not_run):
    """The fixture itself works: valid float32 arguments do call into C."""
    x, _, U, V, alpha = _good_lars()
    with pytest.raises(AssertionError, match="C function minilars_"):
        kernels.lars_gate_forward(x, U, V, alpha, 3)


def test_float64_always_takes_numpy_path(c_must_not_run):
    x, dxt, U, V, alpha = lars_tensors(3, 12, 2, 3, seed=0, dtype=np.float64)
    y = kernels.lars_gate_forward(x, U, V, alpha, 3)
    np.testing.assert_array_equal(y, lars_spec.lars_gate_forward(x, U, V, alpha, 3))
    dx = kernels.lars_gate_backward(dxt, x, U, V, alpha, 3)[0]
    assert dx.dtype == np.float64
    for W in (np.ones((5, 12), np.float16), Packed("bf16", (5, 12), np.ones((5, 12), np.uint16))):
        assert kernels.matmul_xwT(x, W).dtype == np.float64
        assert kernels.matmul_dyW(np.ones((3, 5)), W).dtype == np.float64
    W = frozen.freeze(np.ones((5, 32), np.float32), "q4_1")
    assert kernels.matmul_xwT(np.ones((3, 32)), W).dtype == np.float64


# ------------------------------------------------------------------ path selection

def test_numpy_path_when_switched_off():
    x, dxt, U, V, alpha = lars_tensors(5, 64, 8, 32, seed=4)
    with kernels.use_c(False):
        assert kernels.kernel_status()["active"] is False
        np.testing.assert_array_equal(kernels.lars_gate_forward(x, U, V, alpha, 32),
                                      lars_spec.lars_gate_forward(x, U, V, alpha, 32))
        for W in (np.ones((7, 64), np.float16), frozen.freeze(np.ones((7, 64), np.float32), "q8_0")):
            np.testing.assert_array_equal(kernels.matmul_xwT(x, W), kernels.matmul_xwT_numpy(x, W))
        E = frozen.freeze(np.ones((7, 64), np.float32), "q4_1")
        np.testing.assert_array_equal(kernels.gather_rows(E, [6, 0]), frozen.rows_to_float(E, [6, 0]))
    assert kernels.kernel_status()["active"] is kernels.c_available()


def test_use_c_true_without_module_raises(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.use_c(True)


def test_env_minilars_no_c_selects_numpy_path():
    code = ("import json; from minilars import kernels; "
            "print(json.dumps(kernels.kernel_status()))")
    env = dict(os.environ, MINILARS_NO_C="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    import json
    status = json.loads(out)
    assert status["active"] is False and "MINILARS_NO_C" in status["reason"]


@needs_c
def test_status_reports_c_path():
    status = kernels.kernel_status()
    assert status["active"] is True and status["threads"] >= 1
    assert isinstance(status["openmp"], bool) and status["reason"]


@needs_c
def test_c_refuses_a_short_workspace_and_writes_nothing():
    """The kernels' own size checks (a second line behind the Python ones)."""
    lib, ffi = kernels._lib, kernels._ffi
    x, _, U, V, _ = lars_tensors(3, 64, 8, 32, seed=0)
    threads = lib.minilars_max_threads()
    need = lib.minilars_lars_forward_workspace(64, 8, 32, threads)
    assert need > 0 and lib.minilars_lars_forward_workspace(64, 8, 5, threads) == -1
    out = np.full_like(x, 7.0)
    work = np.empty(need - 1, np.float32)
    rc = lib.minilars_lars_forward(ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", U),
                                   ffi.from_buffer("float[]", V), 0.1, 1e-5, 3, 64, 8, 32,
                                   ffi.from_buffer("float[]", out), threads,
                                   ffi.from_buffer("float[]", work), work.size)
    assert rc == lib.MINILARS_ERR_ARGS and (out == 7.0).all()
    g = np.ones(4, np.float32)
    act = np.full_like(g, 7.0)
    rc = lib.minilars_swiglu_forward(ffi.from_buffer("float[]", g), ffi.from_buffer("float[]", g),
                                     0, ffi.from_buffer("float[]", act), threads)
    assert rc == lib.MINILARS_ERR_ARGS and (act == 7.0).all()
    S, m = np.full((6, 4), 7.0, np.float32), np.zeros(6, np.float32)
    rc = lib.minilars_attention_tile_probs(ffi.from_buffer("float[]", S), 6, 4, 4,
                                           ffi.from_buffer("float[]", m), threads)
    assert rc == lib.MINILARS_ERR_ARGS and (S == 7.0).all()       # 6 rows: not whole 4x4 tiles


@needs_c
def test_c_temporaries_do_not_grow_with_rows():
    """Traced temporaries of the fused LARS kernels (workspace included: it is a NumPy
    array) are the same for 64 and 1024 rows (up to a few Python objects); the NumPy
    twin's grow with the rows."""

    def temporaries(rows, enabled):
        x, dxt, U, V, alpha = lars_tensors(rows, 576, 8, 32, seed=0)
        with kernels.use_c(enabled):
            fwd = _temporary_bytes(lambda: kernels.lars_gate_forward(x, U, V, alpha, 32))
            bwd = _temporary_bytes(lambda: kernels.lars_gate_backward(dxt, x, U, V, alpha, 32))
        return fwd, bwd

    small, large = temporaries(64, True), temporaries(1024, True)
    assert all(abs(a - b) < 1024 for a, b in zip(small, large))     # Python objects aside
    assert temporaries(1024, False)[1] > 4 * temporaries(64, False)[1]


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
def test_frozen_matmul_temporaries_are_one_tile(fmt):
    """The C path's only temporary is its tile buffer (at most _TILE_FLOATS floats), for
    any number of rows and any form of W. The twin's new tile per tile is freed before the
    next one: its peak is one tile too for float16, twice that for bfloat16 (a uint32
    copy first), more for the GGUF blocks (quant.dequantize's intermediates)."""
    rng = np.random.default_rng(0)
    W = frozen_weight((1536, 576), fmt, rng)
    for rows in (64, 512):
        x = rng.normal(size=(rows, 576)).astype(np.float32)
        dy = rng.normal(size=(rows, 1536)).astype(np.float32)
        for fn in (lambda: kernels.matmul_xwT(x, W), lambda: kernels.matmul_dyW(dy, W)):
            with kernels.use_c(True):
                c_bytes = _temporary_bytes(fn)
            with kernels.use_c(False):
                twin_bytes = _temporary_bytes(fn)
            assert 4 * kernels._TILE_FLOATS // 2 < c_bytes <= 4 * kernels._TILE_FLOATS + 4096
            assert c_bytes <= twin_bytes + 4096                    # Python objects aside
            if fmt != "f16":
                assert 2 * c_bytes < twin_bytes + 8192


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_rows_temporaries_are_the_index_only(fmt):
    """C: the rows out and an int64 copy of the index, nothing the size of E."""
    rng = np.random.default_rng(0)
    E = frozen_weight((4096, 576), fmt, rng)
    index = rng.integers(0, 4096, size=512)
    with kernels.use_c(True):
        assert _temporary_bytes(lambda: kernels.gather_rows(E, index)) <= 8 * 512 + 4096
