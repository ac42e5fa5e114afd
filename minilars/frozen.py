"""How frozen weight matrices may be stored, and the one rule about it.

A frozen matrix (an embedding or a linear's weight that does not train) may be held in a
narrower form than the compute dtype; activations, norms, biases and everything that
trains stay in the compute dtype. The forms:

    float16                NumPy float16 (out, in)
    bfloat16               Packed("bf16"): the top 16 bits of each float32, uint16 (out, in)
    q8_0, q4_0, q4_1       Packed(fmt): GGUF blocks, uint8 (out, in/32 * block bytes)
                           (minilars.quant: layout, llama.cpp's quantizer, dequantization)

A Packed matrix is never expanded whole: the C kernels dequantize it a tile at a time
inside the matmul (minilars.kernels), and the ledger counts its real bytes. Full
fine-tuning trains every weight, so it has no frozen matrices to narrow: asking for both
is refused, by train, memory and every other command alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilars import quant

FROZEN_DTYPES = ("float16", "bfloat16") + quant.FORMATS


@dataclass(frozen=True)
class Packed:
    """A frozen (out, in) matrix in a form NumPy has no dtype for: bfloat16 bits ("bf16")
    or GGUF blocks ("q8_0", "q4_0", "q4_1"). data holds the bytes, one row per row of W."""
    format: str
    shape: tuple
    data: np.ndarray

    def __post_init__(self):
        out_features, in_features = self.shape
        want = ((out_features, in_features), np.uint16) if self.format == "bf16" else \
            ((out_features, quant.row_bytes(self.format, in_features)), np.uint8)
        if self.data.shape != want[0] or self.data.dtype != want[1]:
            raise ValueError(f"a {self.format} matrix of shape {self.shape} holds {want[1].__name__} "
                             f"{want[0]}, got {self.data.dtype} {self.data.shape}")

    ndim = 2

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def rows(self, index) -> "Packed":
        """The rows `index` (a slice or an integer array) as a Packed of their own."""
        data = self.data[index]
        return Packed(self.format, (data.shape[0], self.shape[1]), np.ascontiguousarray(data))


def parse_frozen_dtype(name: str | None) -> str | None:
    """A frozen-dtype name (None: as stored); unknown names are refused."""
    if name is None or name in FROZEN_DTYPES:
        return name
    raise ValueError(f"unknown frozen dtype {name!r}; expected one of {', '.join(FROZEN_DTYPES)}")


def check_frozen_dtype(method: str, name: str | None) -> None:
    """The rule: narrowed frozen weights go with adapter methods only."""
    parse_frozen_dtype(name)
    if name is not None and method == "full":
        raise ValueError(f"--frozen-dtype {name} applies to adapter methods: full fine-tuning "
                         "trains every weight, so none is frozen (and trained weights are float)")


BF16_CHUNK = 1 << 20     # values converted at once: the uint32 temporaries stay a few MiB


def bf16_bits(W: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest, ties to even; NaN stays a
    (quiet) NaN, overflow rounds to infinity as IEEE rounding does. BF16_CHUNK values at
    a time, in uint32 (a finite value's bits + 0x8000 stay below 2^32; NaNs, which could
    wrap, are set afterwards), so a (T, C) checkpoint or an embedding needs no copies of
    itself."""
    f32 = np.ascontiguousarray(W, dtype=np.float32).reshape(-1)
    out = np.empty(f32.shape, dtype=np.uint16)
    for c0 in range(0, f32.size, BF16_CHUNK):
        part = f32[c0:c0 + BF16_CHUNK]
        bits = part.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF)
        rounded += (bits >> np.uint32(16)) & np.uint32(1)
        out[c0:c0 + BF16_CHUNK] = rounded >> np.uint32(16)
        nan = np.isnan(part)
        if nan.any():
            out[c0:c0 + BF16_CHUNK][nan] = (bits[nan] >> np.uint32(16)) | np.uint32(0x0040)
    return out.reshape(np.shape(W))


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly (the bits are the top half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def freeze(W: np.ndarray, name: str):
    """A float (out, in) matrix in frozen form `name` (see FROZEN_DTYPES)."""
    parse_frozen_dtype(name)
    if name == "float16":
        return np.asarray(W).astype(np.float16)
    if name == "bfloat16":
        return Packed("bf16", W.shape, bf16_bits(W))
    return Packed(name, W.shape, quant.quantize(W, name))


def to_float(W, dtype=np.float32) -> np.ndarray:
    """A frozen matrix expanded whole to `dtype`: for merging, plain references and tests,
    never for a training step."""
    if isinstance(W, np.ndarray):
        return W.astype(dtype, copy=False)
    if W.format == "bf16":
        return bf16_values(W.data).astype(dtype, copy=False)
    return quant.dequantize(W.data, W.format, W.shape[1]).astype(dtype, copy=False)


def rows_to_float(W, index: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows `index` (1-D ints) of a frozen matrix, expanded to `dtype`: (len(index), in).
    Only those rows are dequantized (an embedding lookup)."""
    if isinstance(W, np.ndarray):
        return W[index].astype(dtype, copy=False)
    return to_float(W.rows(index), dtype)


def storage(W) -> np.ndarray:
    """The array that holds a parameter's bytes (what the ledger counts)."""
    return W if isinstance(W, np.ndarray) else W.data


def freeze_named(key: str, matrix: np.ndarray, name: str):
    """freeze(matrix, name), with a refusal (a block size that does not divide the width)
    naming the parameter `key`."""
    try:
        return freeze(matrix, name)
    except quant.QuantError as e:
        raise ValueError(f"{key}: {e}") from None
