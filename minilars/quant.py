"""GGUF's block formats for frozen weights, in NumPy: the layout, quantization with
llama.cpp's rounding, and dequantization (the specification of the C kernels).

A weight W (out, in) is stored row by row; each row is in/32 blocks of 32 consecutive
inputs, each block a few bytes:

    Q8_0  34 bytes: d (float16), q[32] (int8)                  w = d * q
    Q4_0  18 bytes: d (float16), 16 bytes of 4-bit q           w = d * (q - 8)
    Q4_1  20 bytes: d (float16), m (float16), 16 bytes of q    w = d * q + m

A 4-bit block packs q[j] in the low nibble of byte j and q[j + 16] in its high nibble.
So a quantized matrix is a (out, in/32 * block_bytes) uint8 array: rows stay whole, and
reordering rows (undoing llama.cpp's q/k permutation) is exact. Products are float32 and
never fused: d * q + m rounds twice, as the `gguf` package computes it, and the C kernels
are built so that the compiler may not contract it into one FMA.

Quantization follows llama.cpp's reference quantizers (ggml-quants.c, and the `gguf`
package's NumPy versions of them): Q8_0 d = max|x| / 127, q = round-half-away(x / d);
Q4_0 d = (the value of largest magnitude) / -8, q = trunc(x / d + 8.5) clipped to 15;
Q4_1 d = (max - min) / 15, m = min, q = trunc((x - min) / d + 0.5) clipped to 15. The
divisions are multiplications by 1/d in float32, as there.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32                                     # weights per block, every format here
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FORMATS = tuple(BLOCK_BYTES)


class QuantError(ValueError):
    """A matrix that cannot be held in a block format (its width, its format)."""


def check_format(fmt: str) -> str:
    if fmt not in BLOCK_BYTES:
        raise QuantError(f"unknown block format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def row_bytes(fmt: str, in_features: int) -> int:
    """Bytes of one quantized row of `in_features` weights."""
    if in_features % BLOCK:
        raise QuantError(f"{fmt} needs a width that is a multiple of {BLOCK}, got {in_features}")
    return in_features // BLOCK * BLOCK_BYTES[check_format(fmt)]


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.round rounds them to even). Written without
    adding 0.5, which float32 would round up for the value just below a half."""
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(2 * (a - whole)))


def _half_bits(x: np.ndarray) -> np.ndarray:
    """float32 (n, 1) -> its float16 bits as 2 bytes per row (n, 2)."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) values 0..15 -> (n, 16) bytes: q[j] low nibble, q[j + 16] high nibble."""
    return (q[:, :16] | (q[:, 16:] << np.uint8(4))).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) values 0..15."""
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)


QUANTIZE_CHUNK = 1 << 20      # weights quantized at once: the temporaries are a few of these


def quantize(W: np.ndarray, fmt: str) -> np.ndarray:
    """W (out, in) float -> (out, row_bytes) uint8 blocks of `fmt`, as llama.cpp writes them.
    Rows go QUANTIZE_CHUNK weights at a time (blocks are independent), so the float32
    temporaries stay a few MiB even for a 49152 x 576 embedding."""
    out_features, in_features = W.shape
    blocks = np.empty((out_features, row_bytes(fmt, in_features)), dtype=np.uint8)
    rows = max(1, QUANTIZE_CHUNK // in_features)
    for r in range(0, out_features, rows):
        blocks[r:r + rows] = _quantize_rows(W[r:r + rows], fmt)
    return blocks


def _quantize_rows(W: np.ndarray, fmt: str) -> np.ndarray:
    """quantize's arithmetic on some whole rows: (rows, in) -> (rows, row_bytes)."""
    out_features = W.shape[0]
    x = np.asarray(W, dtype=np.float32).reshape(-1, BLOCK)             # (n, 32)
    with np.errstate(divide="ignore"):
        if fmt == "q8_0":
            d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = _round_half_away(x * inv).astype(np.int8).view(np.uint8)
            blocks = np.concatenate([_half_bits(d), q], axis=1)
        elif fmt == "q4_0":
            at = np.abs(x).argmax(axis=1)[:, None]
            d = np.take_along_axis(x, at, axis=1) / np.float32(-8)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
            blocks = np.concatenate([_half_bits(d), _pack_nibbles(q)], axis=1)
        else:
            lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
            q = np.trunc((x - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
            blocks = np.concatenate([_half_bits(d), _half_bits(lo), _pack_nibbles(q)], axis=1)
    return blocks.reshape(out_features, -1)


def dequantize(blocks: np.ndarray, fmt: str, in_features: int) -> np.ndarray:
    """(rows, row_bytes) uint8 blocks -> (rows, in_features) float32. The C kernels'
    specification: exactly these float32 operations, in this order."""
    rows = blocks.shape[0]
    if blocks.shape[1] != row_bytes(fmt, in_features):
        raise QuantError(f"{fmt} rows of {in_features} weights take {row_bytes(fmt, in_features)} "
                         f"bytes, got {blocks.shape[1]}")
    b = np.ascontiguousarray(blocks).reshape(-1, BLOCK_BYTES[fmt])      # (n, block bytes)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)            # (n, 1)
    if fmt == "q8_0":
        w = b[:, 2:].view(np.int8).astype(np.float32) * d
    elif fmt == "q4_0":
        q = _unpack_nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
        w = d * q.astype(np.float32)
    else:
        m = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        w = d * _unpack_nibbles(b[:, 4:]).astype(np.float32)
        w += m
    return w.reshape(rows, in_features)
