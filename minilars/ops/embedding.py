"""Token embedding lookup.

forward:  h = E[tokens]          tokens (B, T) int, E (V, C)  ->  h (B, T, C)
backward: dE[v] += sum of dh over positions whose token is v
Saves for backward: the token ids only (B*T integers); E is a parameter, not a saved tensor.
"""
import numpy as np

from minilars import kernels
from minilars.frozen import Packed


def check_tokens(tokens: np.ndarray, vocab_size: int) -> None:
    """Token ids must be integers in [0, vocab_size): a clear error instead of an IndexError
    (or, worse, a silent wrap-around for negative ids)."""
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)].ravel()[0]
        raise ValueError(f"token id {int(bad)} is out of range for a vocabulary of "
                         f"{vocab_size} (valid ids are 0..{vocab_size - 1})")


def embedding_forward(tokens: np.ndarray, E, dtype=None) -> np.ndarray:
    """(B, T) ids -> (B, T, C) rows of E in `dtype` (default: E's own float dtype): a copy,
    whatever form E is held in. A float16 or Packed E goes through kernels.gather_rows,
    which dequantizes only the rows asked for (its twin, frozen.rows_to_float, is the
    specification)."""
    B, T = tokens.shape
    dtype = dtype or (E.dtype if isinstance(E, np.ndarray) else np.float32)
    ids = tokens.reshape(-1)
    if isinstance(E, Packed) or E.dtype == np.float16:
        rows = kernels.gather_rows(E, ids).astype(dtype, copy=False)   # exact: float32 values
    else:
        rows = E[ids].astype(dtype, copy=False)
    return rows.reshape(B, T, E.shape[1])


def embedding_backward(dh: np.ndarray, tokens: np.ndarray, dE: np.ndarray) -> None:
    """Accumulate into dE (V, C): rows of dh (B, T, C) scattered to their token ids."""
    np.add.at(dE, tokens.ravel(), dh.reshape(-1, dh.shape[-1]).astype(dE.dtype, copy=False))
