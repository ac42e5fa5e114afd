"""Next-token cross-entropy over the vocabulary, fused with the LM head.

    logits = x W^T                        x (N, C) final normed hidden states, W (V, C)
    loss   = mean over kept rows of (logsumexp(logits) - logits[target])
    dlogits = (softmax(logits) - onehot(target)) / n_kept     (zero for ignored rows)
    dx = dlogits W,  dW = dlogits^T x

The whole (N, V) logits matrix is the single largest tensor of a small model's step
(T=2048 x 49152 x 4 bytes = 384 MiB). The chunked form never holds more than one
(chunk, V) block: for each chunk of rows it computes logits, the loss, and, since the loss
is the last op, the gradient right away, so nothing is saved for a later backward. The
plain form computes the full logits and is the reference.

Targets are aligned with positions: targets[t] is the token that position t must predict
(the caller shifts); IGNORE (-100, Hugging Face's value) marks rows without a loss.
"""
import numpy as np

from minilars.frozen import to_float
from minilars.saved import Keep

IGNORE = -100
DEFAULT_CHUNK = 128
VOCAB_SLAB = 4096


def loss_saves(rows: int, width: int, dtype) -> list[Keep]:
    """The chunked loss keeps nothing of its own: its backward runs inside the forward's
    chunk loop. What it hands on is dx (rows, C), which waits for the model's backward."""
    return [Keep("loss", "dx", (rows, width), dtype, "the loss's gradient, computed with "
                 "the loss, waits here for the backward")]


def loss_workspace(rows: int, vocab: int, width: int, chunk: int, itemsize: int) -> int:
    """Bytes the chunked loss allocates at its peak: one (chunk, V) block of logits and
    the (rows, C) gradient it returns."""
    return (min(chunk, rows) * vocab + rows * width) * itemsize


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp)) with one (rows, V) temporary."""
    m = logits.max(axis=-1)
    shifted = np.subtract(logits, m[:, None])
    np.exp(shifted, out=shifted)
    return m + np.log(shifted.sum(axis=-1))


def count_targets(targets: np.ndarray, vocab_size: int) -> int:
    kept = targets != IGNORE
    n = int(kept.sum())
    if n == 0:
        raise ValueError("cross-entropy: every target is ignored (-100); nothing to learn from")
    bad = kept & ((targets < 0) | (targets >= vocab_size))
    if bad.any():
        raise ValueError(f"cross-entropy: target id {int(targets[bad][0])} is out of range "
                         f"for a vocabulary of {vocab_size}")
    return n


def cross_entropy_plain(x, W, targets, need_dx=True, need_dW=False):
    """Reference: materialises the (N, V) logits (and W in x's dtype, whatever form it is
    held in). Returns (loss, dx, dW)."""
    n = count_targets(targets, W.shape[0])
    W = to_float(W, x.dtype)
    logits = x @ W.T                                                   # (N, V)
    kept = targets != IGNORE
    rows = np.nonzero(kept)[0]
    lse = logsumexp(logits)
    loss = float((lse[rows] - logits[rows, targets[rows]]).sum() / n)
    dlogits = np.exp(logits - lse[:, None])
    dlogits[rows, targets[rows]] -= 1.0
    dlogits[~kept] = 0.0
    dlogits /= n
    dx = dlogits @ W if need_dx else None
    dW = dlogits.T @ x if need_dW else None
    return loss, dx, dW


def cross_entropy_chunked(x, W, targets, need_dx=True, dW=None, chunk=DEFAULT_CHUNK,
                          matmul_xwT=None, matmul_dyW=None):
    """Returns (loss, dx). Accumulates into `dW` (V, C) when given. One (chunk, V) block of
    logits is alive at a time, and it becomes its softmax and then its gradient in place.
    `matmul_xwT`/`matmul_dyW` let a float16-stored W go through the C kernels."""
    N = x.shape[0]
    n = count_targets(targets, W.shape[0])
    xwT = matmul_xwT or (lambda a, w: a @ w.T)
    dyW = matmul_dyW or (lambda a, w: a @ w)
    total = 0.0
    dx = np.empty_like(x) if need_dx else None
    for r0 in range(0, N, chunk):
        r1 = min(r0 + chunk, N)
        t = targets[r0:r1]
        kept = t != IGNORE
        if not kept.any():
            if need_dx:
                dx[r0:r1] = 0.0
            continue
        logits = xwT(x[r0:r1], W)                                      # (chunk, V)
        rows = np.nonzero(kept)[0]
        target_logits = logits[rows, t[rows]]
        peak = logits.max(axis=-1)
        np.subtract(logits, peak[:, None], out=logits)                 # in place: no second
        np.exp(logits, out=logits)                                     # (chunk, V) block
        sums = logits.sum(axis=-1)
        total += float((peak[rows] + np.log(sums[rows]) - target_logits).sum())
        if not need_dx and dW is None:
            del logits                    # before the next chunk's block is allocated
            continue
        logits /= sums[:, None]                                        # softmax: now dlogits
        logits[rows, t[rows]] -= 1.0
        logits[~kept] = 0.0
        logits /= n
        if need_dx:
            dx[r0:r1] = dyW(logits, W)
        if dW is not None:      # in vocabulary slabs: a (V, C) temporary would be 113 MiB
            for v0 in range(0, W.shape[0], VOCAB_SLAB):
                v1 = min(v0 + VOCAB_SLAB, W.shape[0])
                dW[v0:v1] += logits[:, v0:v1].T @ x[r0:r1]
        del logits                        # before the next chunk's block is allocated
    return total / n, dx
