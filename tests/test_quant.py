"""GGUF block formats (minilars.quant) against the `gguf` package: quantization equals
llama.cpp's reference rounding and dequantization is bit-exact, on random and hostile
values (ties, zeros, constant blocks, huge and tiny magnitudes)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilars import quant
from tests.gradcheck import examples

gguf = pytest.importorskip("gguf")

TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
         "q4_1": gguf.GGMLQuantizationType.Q4_1}


def _hostile(rng, rows, width):
    x = rng.normal(size=(rows, width)).astype(np.float32)
    x[0, :32] = 0.0                                          # an all-zero block
    if rows > 1:
        x[1, :32] = 3.0                                      # a constant block
    x.reshape(-1)[5::97] = np.float32(0.5) * rng.integers(-8, 8, x.size)[5::97]  # exact halves
    x.reshape(-1)[7::89] *= 1e4                              # large
    x.reshape(-1)[9::83] *= 1e-6                             # tiny
    return x


@pytest.mark.parametrize("fmt", quant.FORMATS)
@settings(max_examples=examples(20), deadline=None)
@given(rows=st.integers(1, 6), blocks=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_quantize_and_dequantize_equal_gguf(fmt, rows, blocks, seed):
    x = _hostile(np.random.default_rng(seed), rows, 32 * blocks)
    ours = quant.quantize(x, fmt)
    theirs = gguf.quants.quantize(x, TYPES[fmt])
    assert ours.shape == (rows, quant.row_bytes(fmt, 32 * blocks)) == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    back = quant.dequantize(ours, fmt, 32 * blocks)
    np.testing.assert_array_equal(back.view(np.uint32),
                                  gguf.quants.dequantize(theirs, TYPES[fmt]).view(np.uint32))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_every_stored_value_dequantizes_like_gguf(fmt):
    """Random bytes as blocks (every scale and nibble pattern, NaN and Inf scales too):
    the same bits out as the gguf package."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(4096, quant.row_bytes(fmt, 64)), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        ours = quant.dequantize(raw, fmt, 64)
        theirs = gguf.quants.dequantize(raw, TYPES[fmt])
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    ok = ~np.isnan(ours)
    np.testing.assert_array_equal(ours.view(np.uint32)[ok], theirs.view(np.uint32)[ok])


def test_round_half_away_from_zero_like_c():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 126.5], dtype=np.float32)
    np.testing.assert_array_equal(quant._round_half_away(x), [1, 2, 3, -1, -3, 0, 127])


def test_bad_widths_and_formats_are_named():
    with pytest.raises(quant.QuantError, match="multiple of 32, got 48"):
        quant.quantize(np.zeros((2, 48), np.float32), "q8_0")
    with pytest.raises(quant.QuantError, match="unknown block format 'q5_k'"):
        quant.row_bytes("q5_k", 64)
    with pytest.raises(quant.QuantError, match="take 68 bytes, got 34"):
        quant.dequantize(np.zeros((1, 34), np.uint8), "q8_0", 64)
