"""Memory curves: one real training step per sequence length, every byte accounted for.

For each T it runs forward + backward + clip + AdamW on random weights and random tokens
and reports the ledger's peak by category, the process's traced peak (tracemalloc), the
peak resident set size, and seconds per step. "Saved bytes per token" is the slope of the
peak against T (least squares over the lengths), so the constant part (weights, gradients,
optimizer state) drops out and what remains is what grows with the sequence.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np

from minilars.config import ModelConfig
from minilars.memory import CATEGORIES, Ledger, mib
from minilars.model import Model, StepOptions, forward_backward, next_token_targets, zero_grads
from minilars.optim import AdamW, clip_grad_norm


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), Linux; 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def register_params(model: Model, ledger: Ledger) -> None:
    for name, array in model.params.items():
        category = "trainable" if name in model.trainable else "frozen"
        ledger.keep(-1, "param", name, array, category=category)


def build_model(cfg: ModelConfig, method: str, seed: int = 0, dtype=np.float32,
                frozen_dtype=None, adapter_options: dict | None = None) -> Model:
    """Random weights with the given method attached (full, lora, ia3, lars)."""
    model = Model.random(cfg, seed, dtype)
    if frozen_dtype is not None and method != "full":
        for name, array in model.params.items():
            if array.ndim == 2:
                model.params[name] = array.astype(frozen_dtype)
    if method == "full":
        if frozen_dtype is not None:
            raise ValueError("--frozen-dtype applies to adapter methods; full fine-tuning "
                             "trains (and so keeps float32) every weight")
        model.train_all()
    else:
        from minilars.adapters import attach
        attach(model, method, seed=seed, **(adapter_options or {}))
    return model


def measure_lengths(model: Model, seqs: list[int], opts: StepOptions, batch: int = 1,
                    seed: int = 0, progress=None) -> list[dict]:
    """One measured step per length, in one process. Start tracemalloc before the model is
    built for traced figures that include the weights; else they cover what the step adds."""
    ledger = Ledger()
    register_params(model, ledger)
    grads = zero_grads(model, ledger)
    opt = AdamW(lr=1e-5)
    opt.init_state(model.params, grads, ledger)     # as after the first step of a real run
    rng = np.random.default_rng(seed)
    tracing = tracemalloc.is_tracing()
    rows = []
    for T in seqs:
        tokens = rng.integers(0, model.cfg.vocab_size, size=(batch, T))
        targets = next_token_targets(tokens)
        for g in grads.values():
            g.fill(0)
        ledger.reset_peak()
        if tracing:
            tracemalloc.reset_peak()
        rss_reset = reset_peak_rss()
        t0 = time.perf_counter()
        loss = forward_backward(model, tokens, targets, grads, opts, ledger)
        clip_grad_norm(grads, 1.0)
        opt.step(model.params, grads)
        seconds = time.perf_counter() - t0
        traced = tracemalloc.get_traced_memory()[1] if tracing else None
        leaked = ledger.live["activations"]
        rows.append({
            "seq": T, "batch": batch, "loss": loss, "seconds": seconds,
            "peak_by_category": dict(ledger.peak_by_category),
            "ledger_peak": ledger.peak_total,
            "traced_peak": traced,
            "unattributed": None if traced is None else traced - ledger.peak_total,
            "rss_peak": peak_rss_bytes() if rss_reset else None,
            "activations_peak": ledger.max_by_category["activations"],
            "leaked_activation_bytes": leaked,
            "per_op": ledger.peak_table_by_op(),
        })
        if progress:
            progress(rows[-1])
    return rows


def slope_per_token(rows: list[dict], key: str = "ledger_peak") -> float | None:
    """Least-squares slope of rows[key] against batch*seq: bytes per extra token."""
    if len(rows) < 2:
        return None
    x = np.array([r["seq"] * r["batch"] for r in rows], dtype=np.float64)
    y = np.array([r[key] for r in rows], dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0])


def format_rows(rows: list[dict], title: str) -> str:
    head = (f"{'T':>6} " + " ".join(f"{c[:11]:>11}" for c in CATEGORIES)
            + f" {'ledger':>9} {'traced':>9} {'unattrib':>9} {'RSS':>9} {'s/step':>7}")
    lines = [title, "peak MiB at the ledger's peak moment, by category", head]
    for r in rows:
        cats = " ".join(f"{mib(r['peak_by_category'][c]):11.1f}" for c in CATEGORIES)
        traced = "-" if r["traced_peak"] is None else f"{mib(r['traced_peak']):9.1f}"
        unat = "-" if r["unattributed"] is None else f"{mib(r['unattributed']):9.1f}"
        rss = "-" if not r["rss_peak"] else f"{mib(r['rss_peak']):9.1f}"
        lines.append(f"{r['seq']:>6} {cats} {mib(r['ledger_peak']):9.1f} {traced:>9} {unat:>9} "
                     f"{rss:>9} {r['seconds']:7.2f}")
    slope = slope_per_token(rows)
    act_slope = slope_per_token(rows, "activations_peak")
    if slope is not None:
        lines.append(f"saved bytes per token (slope of ledger peak): {slope:,.0f}  "
                     f"(of saved activations alone: {act_slope:,.0f})")
    else:
        r = rows[0]
        lines.append(f"saved activation bytes per token at T={r['seq']}: "
                     f"{r['activations_peak'] / (r['seq'] * r['batch']):,.0f}")
    return "\n".join(lines)
