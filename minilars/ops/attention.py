"""Causal grouped-query attention, in two forms with the same interface.

Shapes: q (B, nh, T, hd); k, v (B, nkv, T, hd); query head h reads kv head h // rep,
rep = nh / nkv (HF's repeat_kv order). We never repeat k and v: queries are viewed as
(B, nkv, rep, T, hd) and broadcast against (B, nkv, 1, T, hd).
The output is laid out (B, T, nh, hd), so that reshaped to (B, T, nh*hd) it is o_proj's
input without a copy, and one buffer serves both the attention's and o_proj's backward.

plain:  keeps the probabilities P (B, nh, T, T). Quadratic in T; the reference, and the
        easiest form to read.
tiled:  flash-style. The forward walks query tiles x key tiles with an online softmax and
        keeps only the output and the log-sum-exp L (B, nh, T) of each row's scores. The
        backward recomputes each tile's scores from q and k, rebuilds P = exp(S - L) tile by
        tile, and never holds more than one (tile x tile) block of scores per head.

Backward of softmax attention, for one row, with D = sum(dO * O) = sum(P * dP):
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = dS K * scale,  dK = dS^T Q * scale
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minilars import kernels, threads
from minilars.saved import Keep

DEFAULT_TILE = 128


def attention_saves(form: str, B: int, nh: int, nkv: int, T: int, hd: int, dtype,
                    out_buffer: str) -> list[Keep]:
    """What attention keeps: q, k, v, and the probabilities P (plain, quadratic in T) or
    the output and the log-sum-exp (tiled). The tiled output is o_proj's input too: its
    buffer is `out_buffer`."""
    keeps = [Keep("attention", "q", (B, nh, T, hd), dtype, "dk = dS^T q; and the scores "
                  "are recomputed"),
             Keep("attention", "k", (B, nkv, T, hd), dtype, "dq = dS k; and the scores"),
             Keep("attention", "v", (B, nkv, T, hd), dtype, "dP = dO v^T")]
    if form == "plain":
        return keeps + [Keep("attention", "P", (B, nh, T, T), dtype,
                             "the probabilities: dV = P^T dO, dS = P * (dP - D)")]
    return keeps + [Keep("attention", "out", (B, T, nh, hd), dtype,
                         "D = rowsum(dO * O) of the softmax backward", buffer=out_buffer),
                    Keep("attention", "lse", (B, nh, T), dtype,
                         "each row's log-sum-exp: P = exp(S - lse) is rebuilt tile by tile")]


def attention_op_backward_workspace(form: str, B: int, nh: int, nkv: int, T: int, hd: int,
                                    tile: int, itemsize: int, workers: int = 1) -> int:
    """Bytes the backward allocates at its peak: dq, dk and dv, and
    plain: dO's heads-first copy, dv before its sum over rep, and two (B, nh, T, T)
           arrays (dP, and dS beside it);
    tiled: D (B, nh, T) and, per tile (tq = tk = min(tile, T)): the scaled q tile, dO's
           tile, dq's tile and one product beside them (four (B, nh, tq, hd)), three
           score tiles (the previous tile's P and dS are still held while the next S and
           dP are made; two when T fits one tile) and the tile's lse and D (the causal
           mask is applied inside the tile kernels: no mask array). For tile < T < 2
           tiles this overstates: the second query tile is short. Split over workers
           (attention_tiled_backward), each further worker holds a set of tile arrays
           and a dk and dv of its own.
    tracemalloc's peak is within 5% below and 1% above this (tests/ops/test_attention.py)."""
    qkv = B * T * (nh + 2 * nkv) * hd                                  # dq, dk, dv
    if form == "plain":
        return (qkv + 2 * B * T * nh * hd + 2 * B * nh * T * T) * itemsize
    tq = min(tile, T)
    scores = 3 if T > tile else 2                  # one key tile per query tile: no previous
    tiles = 4 * B * nh * tq * hd + scores * B * nh * tq * tq + 2 * B * nh * tq
    further = (split_count(T, tile, workers) - 1) * (tiles + 2 * B * nkv * T * hd)  # tiles, dk, dv
    return (qkv + B * nh * T + tiles + further) * itemsize


def _grouped(q: np.ndarray, nkv: int) -> np.ndarray:
    """(B, nh, T, hd) -> (B, nkv, rep, T, hd) view."""
    B, nh, T, hd = q.shape
    return q.reshape(B, nkv, nh // nkv, T, hd)


def _out_heads_first(out: np.ndarray) -> np.ndarray:
    """(B, T, nh, hd) buffer -> (B, nh, T, hd) view."""
    return out.transpose(0, 2, 1, 3)


def check_attention_shapes(q, k, v):
    B, nh, T, hd = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, hd):
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree")
    if nh % k.shape[1]:
        raise ValueError(f"attention: {nh} query heads is not a multiple of {k.shape[1]} kv heads")


# ---------------------------------------------------------------- plain (reference) form

def attention_plain_forward(q, k, v):
    """Returns (out (B, T, nh, hd), P (B, nh, T, T)). Saves q, k, v and P."""
    check_attention_shapes(q, k, v)
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    scale = 1.0 / math.sqrt(hd)    # a Python float: NumPy 2 would promote float32 by an np.float64
    qg = _grouped(q, nkv)                                              # (B, nkv, rep, T, hd)
    S = (qg @ k[:, :, None].swapaxes(-1, -2)) * scale                  # (B, nkv, rep, T, T)
    S[..., np.triu(np.ones((T, T), dtype=bool), k=1)] = -np.inf        # causal mask
    S -= S.max(axis=-1, keepdims=True)
    P = np.exp(S, out=S)
    P /= P.sum(axis=-1, keepdims=True)
    out = np.empty((B, T, nh, hd), dtype=q.dtype)
    _out_heads_first(out)[...] = (P @ v[:, :, None]).reshape(B, nh, T, hd)
    return out, P.reshape(B, nh, T, T)


def attention_plain_backward(dout, q, k, v, P):
    """dout (B, T, nh, hd) -> dq (B, nh, T, hd), dk, dv (B, nkv, T, hd)."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    scale = 1.0 / math.sqrt(hd)
    dO = _grouped(np.ascontiguousarray(_out_heads_first(dout)), nkv)   # (B, nkv, rep, T, hd)
    Pg = P.reshape(B, nkv, nh // nkv, T, T)
    dv = (Pg.swapaxes(-1, -2) @ dO).sum(axis=2)                        # (B, nkv, T, hd)
    dP = dO @ v[:, :, None].swapaxes(-1, -2)                           # (B, nkv, rep, T, T)
    dS = Pg * (dP - (dP * Pg).sum(axis=-1, keepdims=True))
    dq = (dS @ k[:, :, None]) * scale                                  # (B, nkv, rep, T, hd)
    dk = (dS.swapaxes(-1, -2) @ _grouped(q, nkv)).sum(axis=2) * scale  # (B, nkv, T, hd)
    return dq.reshape(B, nh, T, hd), dk, dv


# ---------------------------------------------------------------- tiled (flash-style) form
#
# Inside a tile the rep query heads that share a kv head are stacked as rows:
# q_tile (B, nkv, rep*tq, hd) against k_tile (B, nkv, tk, hd). One matmul per kv head, and
# the sums over rep in dk and dv happen inside the matmul.

def _query_tile(qg, i0, i1, scale: float = 1.0):
    """(B, nkv, rep, T, hd) -> rows i0..i1 of every head as (B, nkv, rep*tq, hd), a copy,
    times `scale` (1/sqrt(hd) on q: one pass over a tile of q instead of one over every
    tile of scores; exact for hd = 64, where the scale is 1/8)."""
    B, nkv, rep, _, hd = qg.shape
    rows = qg[:, :, :, i0:i1]
    tile = np.ascontiguousarray(rows) if scale == 1.0 else np.multiply(rows, scale, order="C")
    return tile.reshape(B, nkv, rep * (i1 - i0), hd)


PARALLEL_QUERY_TILES = 8    # at least this many query tiles: split them over the threads


def split_count(T: int, tile: int, workers: int) -> int:
    """Workers the tiled attention's query tiles are split over: `workers` from
    PARALLEL_QUERY_TILES tiles on, else 1."""
    return workers if workers > 1 and -(-T // tile) >= PARALLEL_QUERY_TILES else 1


def _dealt_query_tiles(T: int, tile: int, n: int) -> list[list[int]]:
    """The query tiles' starts dealt to n workers: longest rows first, each to the worker
    with the fewest key tiles so far (the first such), so the workers finish together (16
    tiles on 2 workers: 68 and 68 tile products; dealt alternately, 72 and 64)."""
    shares, work = [[] for _ in range(n)], [0] * n
    for i0 in reversed(range(0, T, tile)):
        w = work.index(min(work))
        shares[w].append(i0)
        work[w] += i0 // tile + 1                                     # key tiles up to the diagonal
    return shares


def _on_workers(work, shares: list) -> None:
    """work(share, kernel_threads) for each share: on the calling thread when there is one
    share (kernel_threads None: the tile kernels take the step's threads), else one thread
    each, every product on one BLAS thread and the tile kernels on one thread
    (kernel_threads 1). Re-raises a worker's error."""
    if len(shares) == 1:
        work(shares[0], None)
        return
    with threads.one_blas_thread(), ThreadPoolExecutor(len(shares)) as pool:
        for done in [pool.submit(work, share, 1) for share in shares]:
            done.result()


def _forward_query_tiles(q, k, v, tile: int, starts, out, lse, kernel_threads) -> None:
    """The tiled forward for the query tiles starting at `starts`, into their rows of out
    (B, T, nh, hd) and lse (B, nkv, rep, T). Each query tile is independent of the others.
    kernel_threads: the tile kernels' threads (1 on a worker of a split; None: the step's)."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    scale = 1.0 / math.sqrt(hd)
    qg = _grouped(q, nkv)
    og = _grouped(_out_heads_first(out), nkv)                          # (B, nkv, rep, T, hd) view
    for i0 in starts:
        i1 = min(i0 + tile, T)
        tq = i1 - i0
        q_tile = _query_tile(qg, i0, i1, scale)                        # (B, nkv, rep*tq, hd)
        row_max = np.full((B, nkv, rep * tq), -np.inf, dtype=q.dtype)
        row_sum = np.zeros_like(row_max)
        acc = np.zeros((B, nkv, rep * tq, hd), dtype=q.dtype)
        for j0 in range(0, i1, tile):                                  # causal: keys < i1
            j1 = min(j0 + tile, i1)
            S = q_tile @ k[:, :, j0:j1].swapaxes(-1, -2)               # (B, nkv, rep*tq, tk)
            kernels.attention_tile_softmax(S, row_max, row_sum, acc, j0 == i0, kernel_threads)
            acc += S @ v[:, :, j0:j1]                                  # S is now P
        acc /= row_sum[..., None]
        og[:, :, :, i0:i1] = acc.reshape(B, nkv, rep, tq, hd)
        lse[..., i0:i1] = (row_max + np.log(row_sum)).reshape(B, nkv, rep, tq)


def attention_tiled_forward(q, k, v, tile: int = DEFAULT_TILE, workers: int = 1):
    """Returns (out (B, T, nh, hd), lse (B, nh, T)). Saves q, k, v, out and lse.
    Query and key tiles share their edges, so only the diagonal tile (j0 == i0) crosses
    the causal diagonal; tiles left of it are whole, tiles right of it are never computed.
    The online softmax between the products is kernels.attention_tile_softmax.
    workers > 1 and at least PARALLEL_QUERY_TILES query tiles: the query tiles are dealt
    to `workers` threads (longest rows first, to the least loaded), each running its
    products on one BLAS thread. Each tile is computed as it would be alone, so `workers`
    changes the result only through how BLAS sums a product on one thread or on two (bit
    for bit the same on this machine's OpenBLAS; the tests allow 1e-6). It also holds one
    set of tile temporaries per worker (about 1.5 MiB each at SmolLM2's shapes). The
    products of one tile, (rep*tq, hd) x (hd, tk) per kv head, gain almost nothing from a
    second BLAS thread: at T=2048 on SmolLM2 2 workers ran the forward in 45 ms against
    68 ms; at T=512 (4 tiles) there was nothing to gain. Inside a step it needs BLAS's
    idle threads to sleep at once (OPENBLAS_THREAD_TIMEOUT, which `import minilars`
    sets): spinning after the step's two-thread products, they held the core a worker
    needs, and the split gained nothing."""
    check_attention_shapes(q, k, v)
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    out = np.empty((B, T, nh, hd), dtype=q.dtype)
    lse = np.empty((B, nkv, nh // nkv, T), dtype=q.dtype)
    dealt = _dealt_query_tiles(T, tile, split_count(T, tile, workers))
    _on_workers(lambda starts, kernel_threads: _forward_query_tiles(
        q, k, v, tile, starts, out, lse, kernel_threads), dealt)
    return out, lse.reshape(B, nh, T)


def _backward_query_tiles(dout, q, k, v, lse, D, tile: int, starts, dq, dk, dv,
                          kernel_threads) -> None:
    """The tiled backward for the query tiles starting at `starts`: writes their rows of dq
    (B, nkv, rep, T, hd) and adds their terms to dk and dv (B, nkv, T, hd). kernel_threads
    as in _forward_query_tiles."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    scale = 1.0 / math.sqrt(hd)
    qg = _grouped(q, nkv)
    dOg = _grouped(_out_heads_first(dout), nkv)                        # views, no copies
    lse_g = lse.reshape(B, nkv, rep, T)
    for i0 in starts:
        i1 = min(i0 + tile, T)
        tq = i1 - i0
        q_tile = _query_tile(qg, i0, i1, scale)                        # (B, nkv, rep*tq, hd)
        dO_tile = _query_tile(dOg, i0, i1)                             # (B, nkv, rep*tq, hd)
        lse_tile = np.ascontiguousarray(lse_g[..., i0:i1]).reshape(B, nkv, rep * tq)
        D_tile = np.ascontiguousarray(D[..., i0:i1]).reshape(B, nkv, rep * tq)
        dq_tile = np.zeros_like(q_tile)
        for j0 in range(0, i1, tile):
            j1 = min(j0 + tile, i1)
            P = q_tile @ k[:, :, j0:j1].swapaxes(-1, -2)               # (B, nkv, rep*tq, tk): S
            kernels.attention_tile_probs(P, lse_tile, j0 == i0, kernel_threads)   # now P
            dv[:, :, j0:j1] += P.swapaxes(-1, -2) @ dO_tile            # sums over rep too
            dS = dO_tile @ v[:, :, j0:j1].swapaxes(-1, -2)             # dP
            kernels.attention_tile_dscores(P, dS, D_tile, kernel_threads)  # now dS / scale
            dq_tile += dS @ k[:, :, j0:j1]
            dk[:, :, j0:j1] += dS.swapaxes(-1, -2) @ q_tile            # q_tile carries the scale
        dq_tile *= scale
        dq[:, :, :, i0:i1] = dq_tile.reshape(B, nkv, rep, tq, hd)


def attention_tiled_backward(dout, q, k, v, out, lse, tile: int = DEFAULT_TILE,
                             workers: int = 1):
    """dout (B, T, nh, hd) -> dq (B, nh, T, hd), dk, dv (B, nkv, T, hd); scores recomputed,
    P rebuilt by kernels.attention_tile_probs, dS by kernels.attention_tile_dscores.
    workers > 1 and at least PARALLEL_QUERY_TILES query tiles: the query tiles are dealt
    as in the forward. Each worker writes its own rows of dq, but every query tile adds to
    all of dk and dv up to its diagonal, so workers after the first add into dk and dv of
    their own (zeros, (workers - 1) x 2 (B, nkv, T, hd), declared in
    attention_op_backward_workspace), summed into the first's in worker order when all are
    done: the same result for the same worker count, and within float rounding of one
    worker's (the tests allow 1e-5 relative). At T=2048 on SmolLM2, 2 workers ran it in
    99 ms against 188 ms on one."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    D = np.einsum("btnd,btnd->bnt", dout, out).reshape(B, nkv, nh // nkv, T)  # rowsum(dO * O)
    dq = np.empty((B, nkv, nh // nkv, T, hd), dtype=q.dtype)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    dealt = [sorted(s) for s in _dealt_query_tiles(T, tile, split_count(T, tile, workers))]
    sums = [(dk, dv)] + [(np.zeros_like(k), np.zeros_like(v)) for _ in dealt[1:]]
    _on_workers(lambda share, kernel_threads: _backward_query_tiles(
        dout, q, k, v, lse, D, tile, share[0], dq, *share[1], kernel_threads),
        list(zip(dealt, sums)))
    for dk_w, dv_w in sums[1:]:
        dk += dk_w
        dv += dv_w
    return dq.reshape(B, nh, T, hd), dk, dv


# ---------------------------------------------------------------- inference with a KV cache

def attention_decode(q, k_cache, v_cache, start: int):
    """Forward only, for generation: q (B, nh, t, hd) holds positions start .. start+t-1;
    k_cache, v_cache (B, nkv, start+t, hd) hold every position so far. Returns
    out (B, t, nh, hd). Query j sees keys 0 .. start+j."""
    B, nh, t, hd = q.shape
    nkv, L = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(hd)
    S = (_grouped(q, nkv) @ k_cache[:, :, None].swapaxes(-1, -2)) * scale   # (B, nkv, rep, t, L)
    future = np.arange(L)[None, :] > (start + np.arange(t))[:, None]       # (t, L)
    S[..., future] = -np.inf
    S -= S.max(axis=-1, keepdims=True)
    P = np.exp(S, out=S)
    P /= P.sum(axis=-1, keepdims=True)
    out = np.empty((B, t, nh, hd), dtype=q.dtype)
    _out_heads_first(out)[...] = (P @ v_cache[:, :, None]).reshape(B, nh, t, hd)
    return out
