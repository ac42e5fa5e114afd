"""C kernels against their NumPy twins, argument checks at the boundary, path selection.

The twins are the specification (minilars.ops.lars_gate for the LARS gate,
minilars.kernels.matmul_*_numpy for the matmuls). Tests that need the compiled module
are skipped when it is not built; the NumPy-path tests always run.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars import kernels
from minilars.ops import lars_gate as lars_spec

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


@st.composite
def matmul_case(draw):
    rows = draw(st.sampled_from([1, 2, 5, 6, 7, 8, 9, 13, 31, 64, 100]))
    depth = draw(st.sampled_from([1, 3, 16, 17, 255, 256, 257, 576]))
    cols = draw(st.sampled_from([1, 5, 15, 16, 31, 32, 33, 70, 300, 700]))
    fmt = draw(st.sampled_from(["f16", "bf16"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, depth, cols, fmt, seed


def half_weight(shape, fmt, rng):
    W32 = rng.normal(size=shape).astype(np.float32)
    return W32.astype(np.float16) if fmt == "f16" else kernels.f32_to_bf16(W32)


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(matmul_case())
def test_matmul_xwT_c_equals_twin(case):
    rows, in_f, out_f, fmt, seed = case
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, in_f)).astype(np.float32)
    W = half_weight((out_f, in_f), fmt, rng)
    with kernels.use_c(True):
        got = kernels.matmul_xwT(x, W)
    want = kernels.matmul_xwT_numpy(x.astype(np.float64), W)
    size = np.abs(x.astype(np.float64)) @ np.abs(kernels.half_to_float(W, np.float64)).T
    assert got.shape == (rows, out_f) and got.dtype == np.float32
    assert close(got, want, size)


@needs_c
@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(matmul_case())
def test_matmul_dyW_c_equals_twin(case):
    rows, out_f, in_f, fmt, seed = case
    rng = np.random.default_rng(seed)
    dy = rng.normal(size=(rows, out_f)).astype(np.float32)
    W = half_weight((out_f, in_f), fmt, rng)
    with kernels.use_c(True):
        got = kernels.matmul_dyW(dy, W)
    want = kernels.matmul_dyW_numpy(dy.astype(np.float64), W)
    size = np.abs(dy.astype(np.float64)) @ np.abs(kernels.half_to_float(W, np.float64))
    assert got.shape == (rows, in_f) and got.dtype == np.float32
    assert close(got, want, size)


def test_matmul_twins_equal_plain_float_products():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 600)).astype(np.float32)
    dy = rng.normal(size=(5, 300)).astype(np.float32)
    W16 = rng.normal(size=(300, 600)).astype(np.float16)
    np.testing.assert_allclose(kernels.matmul_xwT_numpy(x, W16), x @ W16.astype(np.float32).T,
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(kernels.matmul_dyW_numpy(dy, W16), dy @ W16.astype(np.float32),
                               rtol=1e-5, atol=1e-4)


@needs_c
def test_half_conversion_in_c_is_exact_for_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    f16 = bits.view(np.float16)
    got = kernels.half_to_f32_c(f16)
    want = f16.astype(np.float32)
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all()
    np.testing.assert_array_equal(kernels.half_to_f32_c(bits).view(np.uint32),
                                  kernels.bf16_to_f32(bits).view(np.uint32))


# ------------------------------------------------------------------ bfloat16 helpers

def test_f32_to_bf16_rounds_to_nearest_even():
    values = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5,
                       np.inf, -np.inf, 3.4e38, 0.0, -0.0], dtype=np.float32)
    got = kernels.bf16_to_f32(kernels.f32_to_bf16(values))
    want = np.array([1.0, 1.0, 1.0 + 4 * 2**-8, 1.0 + 2 * 2**-8, -2.5,
                     np.inf, -np.inf, np.inf, 0.0, -0.0], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.signbit(got[-1])
    assert np.isnan(kernels.bf16_to_f32(kernels.f32_to_bf16(np.array([np.nan], np.float32))))[0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1,
                max_size=50))
def test_bf16_round_trip_error_is_half_an_ulp(values):
    f32 = np.array(values, dtype=np.float32)
    back = kernels.bf16_to_f32(kernels.f32_to_bf16(f32)).astype(np.float64)
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
                    "MINILARS_WEIGHT_F16": 1, "MINILARS_WEIGHT_BF16": 2}[name]
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


BAD_MATMUL = [
    ("x", lambda x, W: (x.astype(np.float16), W)),
    ("x", lambda x, W: (x[:, ::2], W[:, ::2].copy())),
    ("x", lambda x, W: (x[:0], W)),
    ("x", lambda x, W: (x.reshape(1, *x.shape), W)),
    ("W", lambda x, W: (x, W[:, :5])),
    ("W", lambda x, W: (x, W.astype(np.int16))),
    ("W", lambda x, W: (x, W.T)),                                       # non-contiguous
    ("W", lambda x, W: (x, W[:0])),
    ("W", lambda x, W: (x, W.astype(np.float64))),                      # float W of another dtype
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
    W = np.ones((5, 12), np.float16)
    assert kernels.matmul_xwT(x, W).dtype == np.float64
    assert kernels.matmul_dyW(np.ones((3, 5)), W).dtype == np.float64


# ------------------------------------------------------------------ path selection

def test_numpy_path_when_switched_off():
    x, dxt, U, V, alpha = lars_tensors(5, 64, 8, 32, seed=4)
    with kernels.use_c(False):
        assert kernels.kernel_status()["active"] is False
        np.testing.assert_array_equal(kernels.lars_gate_forward(x, U, V, alpha, 32),
                                      lars_spec.lars_gate_forward(x, U, V, alpha, 32))
        W = np.ones((7, 64), np.float16)
        np.testing.assert_array_equal(kernels.matmul_xwT(x, W), kernels.matmul_xwT_numpy(x, W))
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
    assert lib.minilars_matmul_xwT_workspace(0, 8, 8, threads) == -1


@needs_c
def test_c_temporaries_do_not_grow_with_rows():
    """Traced temporaries of the fused LARS kernels (workspace included: it is a NumPy
    array) are the same for 64 and 1024 rows (up to a few Python objects); the NumPy
    twin's grow with the rows."""
    from minilars.bench import _temporary_bytes

    def temporaries(rows, enabled):
        x, dxt, U, V, alpha = lars_tensors(rows, 576, 8, 32, seed=0)
        with kernels.use_c(enabled):
            fwd = _temporary_bytes(lambda: kernels.lars_gate_forward(x, U, V, alpha, 32))
            bwd = _temporary_bytes(lambda: kernels.lars_gate_backward(dxt, x, U, V, alpha, 32))
        return fwd, bwd

    small, large = temporaries(64, True), temporaries(1024, True)
    assert all(abs(a - b) < 1024 for a, b in zip(small, large))     # Python objects aside
    assert temporaries(1024, False)[1] > 4 * temporaries(64, False)[1]
