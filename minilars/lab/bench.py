"""Benchmarks of the C kernels against their NumPy twins on SmolLM2-135M shapes.

`bench_kernels(seq)` returns one dict per kernel and shape: median time of the C kernel
and of its twin, the speed-up, and the bytes of temporaries each allocates during the
call (tracemalloc peak during the call minus the bytes of what it returns).
`format_kernel_table(rows)` prints them. `minilars bench kernels` calls both.
The C kernels' workspace is a NumPy array, so it is counted in their temporaries.
For the matmuls with a frozen W (float16, Packed bf16, Q8_0, Q4_1), the float32 BLAS
product x @ W32.T (W held in float32) is timed as well: the goal is to be close to it
without ever holding W in float32. Their rows are the MLP's projections at `seq` tokens,
the tied LM head (49152 x 576, Q8_0 as SmolLM2's GGUF stores its embedding) at the loss's
chunk of 128 rows, and one token of generation.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np

from minilars import kernels
from minilars.config import named_config
from minilars.frozen import freeze
from minilars.lab.memory_curve import build_model
from minilars.memory import Ledger, mib, register_params
from minilars.model import StepOptions, forward_backward, next_token_targets, zero_grads
from minilars.optim import AdamW, clip_grad_norm
from minilars.ops.attention import DEFAULT_TILE, attention_tiled_backward, attention_tiled_forward
from minilars.ops.loss import DEFAULT_CHUNK            # rows of logits at once in the loss

HIDDEN, MLP, VOCAB = 576, 1536, 49152      # SmolLM2-135M
RANK, BLOCK = 8, 32


FROZEN = {"f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0", "q4_1": "q4_1"}  # label: freeze name
TIME_BUDGET = 3.0          # seconds of timed calls per measurement at most (3 calls at least)


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median of `repeats` timed calls after `warmup` ones; fewer (but 3) when they would
    take more than TIME_BUDGET seconds."""
    first = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
    if first > 0:
        repeats = max(3, min(repeats, int(TIME_BUDGET / first)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _result_bytes(result) -> int:
    if isinstance(result, np.ndarray):
        return result.nbytes
    if isinstance(result, (tuple, list)):
        return sum(_result_bytes(r) for r in result)
    return 0


def _temporary_bytes(fn) -> int:
    """tracemalloc peak during fn() minus the bytes of what fn returns."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(0, peak - base - _result_bytes(result))


def _measure(name: str, shape: str, fn, repeats: int) -> dict:
    """Time and temporaries of fn on the C path and on the NumPy path."""
    row = {"kernel": name, "shape": shape}
    for path, enabled in (("c", True), ("numpy", False)):
        if enabled and not kernels.c_available():
            row[f"{path}_ms"], row[f"{path}_temp_bytes"] = float("nan"), -1
            continue
        with kernels.use_c(enabled):
            row[f"{path}_ms"] = 1e3 * _median_seconds(fn, repeats)
            row[f"{path}_temp_bytes"] = _temporary_bytes(fn)
    row["speedup"] = row["numpy_ms"] / row["c_ms"] if row["c_ms"] == row["c_ms"] else float("nan")
    row["temp_ratio"] = (row["numpy_temp_bytes"] / max(row["c_temp_bytes"], 1)
                         if row["c_temp_bytes"] >= 0 else float("nan"))
    return row


def _lars_rows(seq: int, rng, repeats: int) -> list[dict]:
    """The fused LARS gate, forward and backward, on q/k/v/gate/up's and down's inputs."""
    rows = []
    for width in (HIDDEN, MLP):
        x = rng.normal(size=(seq, width)).astype(np.float32)
        dxt = rng.normal(size=(seq, width)).astype(np.float32)
        U = (rng.uniform(-1, 1, size=(width, RANK)) / np.sqrt(width)).astype(np.float32)
        V = rng.normal(0, 0.1, size=(RANK, width // BLOCK)).astype(np.float32)
        alpha = np.float32(0.1)
        shape = f"x ({seq}, {width}) r={RANK} Bk={BLOCK}"
        rows.append(_measure("lars_forward", shape,
                             lambda: kernels.lars_gate_forward(x, U, V, alpha, BLOCK), repeats))
        rows.append(_measure("lars_backward", shape,
                             lambda: kernels.lars_gate_backward(dxt, x, U, V, alpha, BLOCK),
                             repeats))
    return rows


def _swiglu_rows(seq: int, rng, repeats: int) -> list[dict]:
    """SwiGLU forward and backward (dg over a copy of dact, as the model does) on the MLP's g, u."""
    g, u, dact = (rng.normal(size=(seq, MLP)).astype(np.float32) for _ in range(3))
    shape = f"g, u ({seq}, {MLP})"
    return [_measure("swiglu_forward", shape, lambda: kernels.swiglu_forward(g, u), repeats),
            _measure("swiglu_backward", shape,
                     lambda: kernels.swiglu_backward(dact, g, u, dg_out=dact.copy()), repeats)]


def _attention_rows(seq: int, rng, repeats: int) -> list[dict]:
    """The tiled attention's tile kernels on one SmolLM2 tile (3 kv heads x 3 query heads
    x 128 rows, 128 keys; each call on a fresh copy of the scores, the copy timed on both
    paths), and the whole tiled attention forward and backward at `seq` (BLAS inside)."""
    heads, kv_heads, hd, tile = 9, 3, 64, DEFAULT_TILE
    S0 = rng.normal(size=(1, kv_heads, 3 * tile, tile)).astype(np.float32)
    row_max = S0.max(-1) - 1
    row_sum = np.ones_like(row_max)
    acc = np.zeros(row_max.shape + (hd,), np.float32)
    dP = rng.normal(size=S0.shape).astype(np.float32)
    shape = f"S (1, {kv_heads}, {3 * tile}, {tile})"

    def softmax(diagonal):
        S, m = S0.copy(), row_max.copy()
        kernels.attention_tile_softmax(S, m, row_sum.copy(), acc, diagonal)
        return S
    rows = [_measure("tile_softmax", shape, lambda: softmax(False), repeats),
            _measure("tile_softmax", shape + " diagonal", lambda: softmax(True), repeats),
            _measure("tile_probs", shape,
                     lambda: kernels.attention_tile_probs(S0.copy(), row_max, False), repeats),
            _measure("tile_dscores", shape,
                     lambda: kernels.attention_tile_dscores(S0, dP.copy(), row_max), repeats)]
    q = rng.normal(size=(1, heads, seq, hd)).astype(np.float32)
    k, v = (rng.normal(size=(1, kv_heads, seq, hd)).astype(np.float32) for _ in range(2))
    dout = rng.normal(size=(1, seq, heads, hd)).astype(np.float32)
    out, lse = attention_tiled_forward(q, k, v, tile)
    shape = f"q ({seq}, {heads}x{hd}) kv {kv_heads} tile {tile}"
    rows.append(_measure("attention_fwd", shape, lambda: attention_tiled_forward(q, k, v, tile),
                         repeats))
    rows.append(_measure("attention_bwd", shape,
                         lambda: attention_tiled_backward(dout, q, k, v, out, lse, tile), repeats))
    return rows


def _frozen_matmul_rows(n: int, out_f: int, in_f: int, labels, rng, repeats: int,
                        backward: bool = True) -> list[dict]:
    """y = x W^T (and dx = dy W) for W (out_f, in_f) in each frozen form of `labels`,
    beside float32 BLAS on the same W held in float32."""
    W32 = (rng.normal(size=(out_f, in_f)) / np.sqrt(in_f)).astype(np.float32)
    x = rng.normal(size=(n, in_f)).astype(np.float32)
    dy = rng.normal(size=(n, out_f)).astype(np.float32)
    blas_xwT = 1e3 * _median_seconds(lambda: x @ W32.T, repeats)
    blas_dyW = 1e3 * _median_seconds(lambda: dy @ W32, repeats) if backward else None
    rows = []
    for label in labels:
        W = freeze(W32, FROZEN[label])
        products = [("matmul_xwT", f"x ({n}, {in_f}) W ({out_f}, {in_f}) {label}",
                     lambda: kernels.matmul_xwT(x, W), blas_xwT)]
        if backward:
            products.append(("matmul_dyW", f"dy ({n}, {out_f}) W ({out_f}, {in_f}) {label}",
                             lambda: kernels.matmul_dyW(dy, W), blas_dyW))
        for name, shape, fn, blas in products:
            row = _measure(name, shape, fn, repeats)
            row["blas_f32_ms"], row["c_over_blas"] = blas, row["c_ms"] / blas
            rows.append(row)
    return rows


def bench_kernels(seq: int = 512, repeats: int = 15, seed: int = 0) -> list[dict]:
    """Each kernel vs its twin on SmolLM2-135M shapes at `seq` tokens (batch 1), float32
    activations: the LARS gate, SwiGLU, the tiled attention's tile kernels (and the
    whole tiled attention), and the frozen-weight matmuls (beside the float32
    BLAS reference x @ W32.T): the MLP's up/gate and down projections in every frozen form,
    the tied LM head at the loss's chunk (float16 and Q8_0), and one token of generation
    (minilars_matvec_xwT)."""
    rng = np.random.default_rng(seed)
    rows = (_lars_rows(seq, rng, repeats) + _swiglu_rows(seq, rng, repeats)
            + _attention_rows(seq, rng, repeats))
    everything = ("f16", "bf16", "q8_0", "q4_1")
    rows += _frozen_matmul_rows(seq, MLP, HIDDEN, everything, rng, repeats)
    rows += _frozen_matmul_rows(seq, HIDDEN, MLP, everything, rng, repeats)
    rows += _frozen_matmul_rows(DEFAULT_CHUNK, VOCAB, HIDDEN, ("f16", "q8_0"), rng, repeats)
    rows += _frozen_matmul_rows(1, MLP, HIDDEN, ("f16", "q8_0", "q4_1"), rng, repeats,
                                backward=False)
    return rows


def format_kernel_table(rows: list[dict]) -> str:
    """A plain-text table of bench_kernels rows."""
    status = kernels.kernel_status()
    lines = [f"kernel path: {'C' if kernels.c_available() else 'NumPy only'} "
             f"(openmp={status['openmp']}, threads={status['threads']})",
             f"{'kernel':<14} {'shape':<40} {'C ms':>8} {'NumPy ms':>9} {'speed-up':>8} "
             f"{'C temp KiB':>10} {'NumPy temp KiB':>14} {'f32 BLAS ms':>11} {'C/BLAS':>6}"]
    for r in rows:
        blas = (f"{r['blas_f32_ms']:11.3f} {r['c_over_blas']:6.2f}" if "blas_f32_ms" in r
                else f"{'':>11} {'':>6}")
        lines.append(f"{r['kernel']:<14} {r['shape']:<40} {r['c_ms']:8.3f} {r['numpy_ms']:9.3f} "
                     f"{r['speedup']:7.2f}x {r['c_temp_bytes'] / 1024:10.1f} "
                     f"{r['numpy_temp_bytes'] / 1024:14.1f} {blas}")
    return "\n".join(lines)


# ---------------------------------------------------------------- a whole training step

def bench_step(arch: str = "smollm2-135m", method: str = "lars", seq: int = 512,
               policy: str = "layer", batch: int = 1, repeats: int = 2, seed: int = 0,
               frozen_dtypes: tuple = (None, "float16"), checkpoints: tuple = ("ram",),
               c_core: tuple = (True, False), mlp_rows: int = 0) -> list[dict]:
    """Seconds and tokens per second of one forward + backward + AdamW step, in one process,
    for each variant: frozen weights (None = float32) x checkpoint store x C core on/off.
    Full fine-tuning trains every weight, so keeps float32 only. Median of `repeats` timed
    steps after one warm-up step; the C core's on and off steps alternate (on, off, on,
    off, ...), so a machine whose load changes meets both alike. Ratios within one run are
    what to compare."""
    cfg = named_config(arch)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, seq))
    targets = next_token_targets(tokens)
    frozen_dtypes = [None] if method == "full" else list(frozen_dtypes)
    c_choices = [c for c in c_core if c is False or kernels.c_available()]
    rows = []
    for frozen in frozen_dtypes:
        model = build_model(cfg, method, seed=seed, frozen_dtype=frozen)
        ledger = Ledger()
        register_params(model, ledger)
        weight_bytes = ledger.live["frozen"] + ledger.live["trainable"]
        grads = zero_grads(model)
        opt = AdamW(lr=1e-5)
        for store in checkpoints:
            opts = StepOptions(policy=policy, checkpoints=store, mlp_rows=mlp_rows)
            times = {c: [] for c in c_choices}
            for i in range(repeats + 1):                  # round 0 warms each variant up
                for use_c_core in c_choices:
                    with kernels.use_c(use_c_core):
                        seconds = timed_step(model, tokens, targets, grads, opt, opts)
                    if i:
                        times[use_c_core].append(seconds)
            for use_c_core in c_choices:
                seconds = float(np.median(times[use_c_core]))
                rows.append({"method": method, "policy": policy, "seq": seq, "batch": batch,
                             "weights": frozen or "float32", "checkpoints": store,
                             "c_core": use_c_core, "seconds": seconds,
                             "tok_per_s": batch * seq / seconds, "weight_mib": mib(weight_bytes)})
        del model, grads, opt
    return rows


def timed_step(model, tokens, targets, grads, opt, opts: StepOptions, ledger=None) -> float:
    """Seconds of one training step: forward + backward, clip, AdamW (recorded in
    `ledger` when given)."""
    for g in grads.values():
        g.fill(0)
    t0 = time.perf_counter()
    forward_backward(model, tokens, targets, grads, opts, ledger)
    clip_grad_norm(grads, 1.0)
    opt.step(model.params, grads, ledger=ledger)
    return time.perf_counter() - t0


def format_step_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = [f"{base['method']} step, policy {base['policy']}, T={base['seq']}, "
             f"batch {base['batch']} (median of timed steps; time ratio vs the first row)",
             f"{'weights':<9} {'checkpoints':<12} {'C core':<7} {'s/step':>8} {'tok/s':>8} "
             f"{'weights MiB':>12} {'time ratio':>11}"]
    for r in rows:
        lines.append(f"{r['weights']:<9} {r['checkpoints']:<12} {'yes' if r['c_core'] else 'no':<7} "
                     f"{r['seconds']:8.2f} {r['tok_per_s']:8.0f} {r['weight_mib']:12.1f} "
                     f"{r['seconds'] / base['seconds']:11.2f}")
    return "\n".join(lines)
