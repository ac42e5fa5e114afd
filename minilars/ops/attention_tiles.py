"""The element-wise steps of tiled attention (minilars.ops.attention), between its tile
products: the NumPy twins of the C kernels minilars.kernels.attention_tile_softmax,
attention_tile_probs and attention_tile_dscores, which the attention calls.

A block of scores comes as rows: S (R, tk), R = B * nkv * rep * tq, for one query tile
against one key tile (the rep query heads of a kv head stacked as rows). Row r is query
position r mod tq of its tile. `diagonal` is True for the tile on the causal diagonal
(key tile = query tile, so tk = tq): there row r sees key columns c <= r mod tq only.
Tiles left of the diagonal are seen whole; tiles right of it are never computed.

forward, per key tile (online softmax): m' = max(m, rowmax S); P = exp(S - m');
    l' = l exp(m - m') + rowsum P;  acc' = acc exp(m - m')      (the caller adds P V)
backward, per tile: P = exp(S - lse);  dS = P * (dP - D),  D = rowsum(dO * O)
Each updates its blocks in place: no (R, tk) temporary beyond the scores themselves.
The C kernels do each in one or two passes over a row, with their own float32 exp (within
2 ulp); these twins take a few NumPy passes (the two agree to a few float32 ulp).
"""
import numpy as np


def _mask_above_diagonal(S: np.ndarray) -> None:
    """S (R, tq), R a multiple of tq (rows of diagonal tiles): -inf where the key
    comes after the query."""
    tq = S.shape[-1]
    S.reshape(-1, tq, tq)[:, np.triu(np.ones((tq, tq), dtype=bool), k=1)] = -np.inf


def tile_softmax(S: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray, acc: np.ndarray,
                 diagonal: bool) -> None:
    """S (R, tk) -> P; row_max, row_sum (R,) and acc (R, hd) updated, all in place. A row's
    first tile comes with row_max -inf and row_sum 0 (its correction is then 0)."""
    if diagonal:
        _mask_above_diagonal(S)
    new_max = np.maximum(row_max, S.max(axis=-1))                      # (R,)
    correction = np.exp(row_max - new_max)                             # rescale what we had
    S -= new_max[:, None]
    np.exp(S, out=S)
    row_sum *= correction
    row_sum += S.sum(axis=-1)
    acc *= correction[:, None]
    row_max[...] = new_max


def tile_probs(S: np.ndarray, lse: np.ndarray, diagonal: bool) -> None:
    """S (R, tk) scores -> P = exp(S - lse) in place; lse (R,) from the forward."""
    if diagonal:
        _mask_above_diagonal(S)
    S -= lse[:, None]
    np.exp(S, out=S)


def tile_dscores(P: np.ndarray, dP: np.ndarray, D: np.ndarray) -> None:
    """dP (R, tk) -> dS = P * (dP - D) in place; D (R,) = rowsum(dO * O)."""
    dP -= D[:, None]
    np.multiply(P, dP, out=dP)
