"""Embedding lookup: backward (scatter-add into dE) vs finite differences, with repeated ids."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars import frozen, kernels
from minilars.ops.embedding import check_tokens, embedding_backward, embedding_forward
from tests.gradcheck import assert_grad_close, examples, numeric_grad


@settings(max_examples=examples(15))
@given(B=st.integers(1, 3), T=st.integers(1, 7), V=st.integers(1, 6), C=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_embedding_backward_matches_finite_differences(B, T, V, C, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(B, T))        # small V: ids repeat, so rows accumulate
    E = rng.standard_normal((V, C))
    R = rng.standard_normal((B, T, C))
    h = embedding_forward(tokens, E)
    assert h.shape == (B, T, C)
    np.testing.assert_array_equal(h, E[tokens])
    dE = np.zeros_like(E)
    embedding_backward(R, tokens, dE)
    num = numeric_grad(lambda: float(np.sum(embedding_forward(tokens, E) * R)), E)
    assert_grad_close(dE, num, what="dE")


def test_embedding_backward_accumulates():
    rng = np.random.default_rng(0)
    tokens = np.array([[1, 1, 2]])
    E = rng.standard_normal((4, 3))
    dh = rng.standard_normal((1, 3, 3))
    dE = np.ones_like(E)
    embedding_backward(dh, tokens, dE)
    np.testing.assert_allclose(dE[1], 1 + dh[0, 0] + dh[0, 1])
    np.testing.assert_allclose(dE[2], 1 + dh[0, 2])
    np.testing.assert_array_equal(dE[[0, 3]], 1.0)


def test_embedding_forward_casts_to_compute_dtype():
    E = np.arange(12, dtype=np.float16).reshape(4, 3)
    h = embedding_forward(np.array([[3, 0]]), E, np.float32)
    assert h.dtype == np.float32
    np.testing.assert_array_equal(h[0], E[[3, 0]].astype(np.float32))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "q8_0", "q4_0", "q4_1"])
def test_embedding_of_a_frozen_matrix_is_its_rows_expanded(name):
    """float16 and Packed E go through kernels.gather_rows (C when built, else its twin):
    the rows equal frozen.rows_to_float's, in float32 and, exactly, in float64."""
    rng = np.random.default_rng(1)
    E = frozen.freeze(rng.standard_normal((50, 64)).astype(np.float32), name)
    tokens = rng.integers(0, 50, size=(2, 9))
    want = frozen.rows_to_float(E, tokens.reshape(-1)).reshape(2, 9, 64)
    paths = (True, False) if kernels.c_available() else (False,)
    for enabled in paths:
        with kernels.use_c(enabled):
            h = embedding_forward(tokens, E, np.float32)
            h64 = embedding_forward(tokens, E, np.float64)
        assert h.dtype == np.float32 and h64.dtype == np.float64
        np.testing.assert_array_equal(h, want)
        np.testing.assert_array_equal(h64, want.astype(np.float64))


def test_embedding_of_a_packed_matrix_names_a_bad_id():
    E = frozen.freeze(np.ones((5, 32), np.float32), "q8_0")
    with pytest.raises(ValueError, match="index holds 5"):
        embedding_forward(np.array([[0, 5]]), E, np.float32)


@pytest.mark.parametrize("bad, msg", [(-1, "token id -1 is out of range"),
                                      (10, "token id 10 is out of range")])
def test_check_tokens_names_the_bad_id(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_tokens(np.array([[0, bad, 1]]), 10)


def test_check_tokens_rejects_float_ids():
    with pytest.raises(ValueError, match="must be integers"):
        check_tokens(np.array([[0.0, 1.0]]), 10)
