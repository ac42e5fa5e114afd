"""minilars against PyTorch + PEFT on this machine: `minilars bench compare`.

For each method, recompute policy and T, both sides train the same model (random weights
of the config, float32, batch 1 by default) on the same thread count. Each measurement is
a fresh process (one warm-up step, then `steps` timed ones) and the sides alternate,
minilars, PyTorch, minilars, PyTorch, ..., so a machine whose load drifts meets both
alike. A row gives each side's median step time, the spread of its timed steps ((max -
min) / median: how far a row's figures can be trusted on this machine), tokens per
second and peak RSS (VmHWM of the whole process: interpreter, libraries, model and step),
and the ratio of speeds.

Model FLOP utilisation (MFU) is the step's model FLOPs / step time / this machine's
float32 GEMM rate, measured by `gemm_rate` in the same run at the same thread count,
before the first cell; it is measured again after the last, and a gap between the two says
the machine's speed moved during the run (other tenants of a shared host, heat).
Model FLOPs (`step_flops`) are the matrix products the step needs mathematically:
forward and input gradients of every frozen linear and the LM head, the weight gradients
of trained weights (full fine-tuning), causal attention counted over the unmasked half
(T(T+1)/2 query-key pairs per head). They leave out recompute, adapters' own small
products (< 2% at SmolLM2's shapes) and element-wise work; `executed` adds the recompute
of policy `layer` (each layer's forward once more), for hardware utilisation (HFU).
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
import time

import numpy as np

from minilars import threads
from minilars.config import ModelConfig, named_config
from minilars.lab.bench import timed_step
from minilars.lab.memory_curve import build_model
from minilars.memory import peak_rss_bytes
from minilars.model import StepOptions, next_token_targets, zero_grads
from minilars.optim import AdamW

SIDES = ("minilars", "torch")
WORKERS = {"minilars": "minilars.lab.compare",          # each side's worker module (its __main__)
           "torch": "minilars.lab.torch_side"}          # imports torch: only ever in its own process
REFERENCE_MODULES = ("torch", "transformers", "peft")
INSTALL_HINT = ("pip install -e '.[reference]' (torch 2.13.0's CPU build, transformers and "
                "peft; a bare `pip install torch` pulls a multi-GB CUDA build)")
GEMM_SHAPE = (512, 576, 1536)       # (m, k, n): the MLP's up projection at T=512, SmolLM2


class CompareError(RuntimeError):
    """A side's worker process failed; the message carries the end of its stderr."""


def reference_missing() -> list[str]:
    """The modules of the `reference` extra that cannot be imported here."""
    return [m for m in REFERENCE_MODULES if importlib.util.find_spec(m) is None]


def step_flops(cfg: ModelConfig, method: str, seq: int, batch: int = 1,
               policy: str = "none") -> dict:
    """{"model": FLOPs the step needs, "executed": those plus policy layer's recompute}."""
    C, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    linear_macs = C * cfg.q_dim + 2 * C * cfg.kv_dim + cfg.q_dim * C + 3 * C * F  # per token, layer
    head_macs = cfg.vocab_size * C                                             # per token
    attn_macs = 2 * cfg.num_attention_heads * cfg.head_dim * (seq + 1) / 2     # QK^T and PV, causal mean
    tokens = batch * seq
    layer_forward = 2 * tokens * L * (linear_macs + attn_macs)
    forward = layer_forward + 2 * tokens * head_macs
    backward = 2 * tokens * L * (linear_macs + 2 * attn_macs) + 2 * tokens * head_macs  # dx: dQ dK dV dP
    if method == "full":
        backward += 2 * tokens * (L * linear_macs + head_macs)                 # dW of every weight
    model = forward + backward
    return {"model": model, "executed": model + (layer_forward if policy == "layer" else 0)}


def gemm_rate(shape=GEMM_SHAPE, seconds: float = 1.0) -> float:
    """FLOP/s of NumPy's float32 product (m, k) @ (k, n) on this process's BLAS threads:
    the best of repeated calls over about `seconds` (after two warm-up calls)."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    for _ in range(2):
        a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def minilars_step_seconds(cfg: ModelConfig, method: str, policy: str, seq: int, batch: int,
                          steps: int) -> list[float]:
    """Seconds of each of `steps` minilars training steps after one warm-up step."""
    model = build_model(cfg, method)
    grads, opt = zero_grads(model), AdamW(lr=1e-5)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq))
    targets, opts = next_token_targets(tokens), StepOptions(policy=policy)
    times = [timed_step(model, tokens, targets, grads, opt, opts) for _ in range(steps + 1)]
    return times[1:]


def run_side(side: str, cell: dict, n_threads: int, steps: int) -> dict:
    """One measurement in a fresh process, `python -m WORKER '<cell JSON>' THREADS STEPS`:
    {"seconds": [...], "rss_peak": bytes, "about": str}."""
    proc = subprocess.run([sys.executable, "-m", WORKERS[side], json.dumps(cell), str(n_threads),
                           str(steps)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompareError(f"the {side} side failed on {cell['method']} {cell['policy']} "
                           f"T={cell['seq']} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cells(methods, policies, seqs, arch: str = "smollm2-135m", batch: int = 1) -> list[dict]:
    return [dict(arch=arch, method=m, policy=p, seq=T, batch=batch)
            for m, p, T in itertools.product(methods, policies, seqs)]


def compare(cells: list[dict], n_threads: int, rounds: int = 2, steps: int = 2,
            progress=None) -> tuple[list[dict], tuple[float, float]]:
    """(rows, (GEMM FLOP/s before the first cell, after the last)): every cell timed on
    both sides, `rounds` fresh processes each, alternating sides. The GEMM rate is measured
    here, on n_threads threads; MFU and HFU are against the first."""
    threads.set_threads(n_threads)
    rate = gemm_rate()
    rows = []
    for cell in cells:
        seconds, rss, about = {s: [] for s in SIDES}, {s: 0 for s in SIDES}, {}
        for _ in range(rounds):
            for side in SIDES:
                got = run_side(side, cell, n_threads, steps)
                seconds[side] += got["seconds"]
                rss[side] = max(rss[side], got["rss_peak"])
                about[side] = got["about"]
        cfg = named_config(cell["arch"])
        flops = step_flops(cfg, cell["method"], cell["seq"], cell["batch"], cell["policy"])
        row = {**cell, "flops": flops["model"], "executed_flops": flops["executed"], "about": about}
        for side in SIDES:
            s = float(np.median(seconds[side]))
            row[side] = {"seconds": s, "spread": (max(seconds[side]) - min(seconds[side])) / s,
                         "tok_per_s": cell["batch"] * cell["seq"] / s,
                         "rss_peak": rss[side], "mfu": flops["model"] / s / rate,
                         "hfu": flops["executed"] / s / rate}
        row["speedup"] = row["torch"]["seconds"] / row["minilars"]["seconds"]
        rows.append(row)
        if progress:
            progress(row)
    return rows, (rate, gemm_rate())


def format_compare(rows: list[dict], rates: tuple[float, float], n_threads: int) -> str:
    start, end = rates
    lines = [f"float32 GEMM {GEMM_SHAPE[0]}x{GEMM_SHAPE[1]} @ {GEMM_SHAPE[1]}x{GEMM_SHAPE[2]}, "
             f"{n_threads} threads: {start / 1e9:.0f} GFLOP/s before the first row (MFU and HFU "
             f"are against it), {end / 1e9:.0f} after the last"]
    if abs(end - start) > 0.1 * start:
        lines.append(f"warning: the GEMM rate moved by {100 * (end / start - 1):+.0f}% during the "
                     f"run: this machine's speed changed, and MFU with it")
    if rows:
        lines.append("minilars: " + rows[0]["about"]["minilars"])
        lines.append("PyTorch: " + rows[0]["about"]["torch"])
    lines.append("spread: (slowest - fastest) / median of a side's timed steps")
    lines.append(f"{'method':<6} {'policy':<6} {'T':>5} {'minilars tok/s':>14} {'PyTorch tok/s':>13} "
                 f"{'ratio':>6} {'minilars s':>10} {'spread':>6} {'PyTorch s':>9} {'spread':>6} "
                 f"{'MFU':>5} {'HFU':>5} {'PyTorch MFU':>11} {'minilars RSS MiB':>16} "
                 f"{'PyTorch RSS MiB':>15}")
    for r in rows:
        a, b = r["minilars"], r["torch"]
        lines.append(f"{r['method']:<6} {r['policy']:<6} {r['seq']:>5} {a['tok_per_s']:14.0f} "
                     f"{b['tok_per_s']:13.0f} {r['speedup']:5.2f}x {a['seconds']:10.2f} "
                     f"{100 * a['spread']:5.0f}% {b['seconds']:9.2f} {100 * b['spread']:5.0f}% "
                     f"{100 * a['mfu']:4.0f}% {100 * a['hfu']:4.0f}% {100 * b['mfu']:10.0f}% "
                     f"{a['rss_peak'] / 2**20:16.0f} {b['rss_peak'] / 2**20:15.0f}")
    return "\n".join(lines)


def _main(cell_json: str, n_threads: str, steps: str) -> None:
    """The minilars side's worker: one JSON line of run_side's result on stdout."""
    cell = json.loads(cell_json)
    threads.set_threads(int(n_threads))
    times = minilars_step_seconds(named_config(cell["arch"]), cell["method"], cell["policy"],
                                  cell["seq"], cell["batch"], int(steps))
    print(json.dumps({"seconds": times, "rss_peak": peak_rss_bytes(),
                      "about": "; ".join(threads.describe()[1:])}))


if __name__ == "__main__":
    _main(*sys.argv[1:4])       # python -m minilars.lab.compare '<cell JSON>' THREADS STEPS
