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

from minilars.adapters import adapter_for, attach
from minilars.config import ModelConfig
from minilars.frozen import check_frozen_dtype
from minilars.memory import (CATEGORIES, Ledger, mib, peak_rss_bytes, register_params,
                             reset_peak_rss)
from minilars.model import Model, StepOptions, forward_backward, next_token_targets, zero_grads
from minilars.lab.svg import svg_curves
from minilars.optim import AdamW, clip_grad_norm
from minilars.plan import predict


def build_model(cfg: ModelConfig, method: str, seed: int = 0, dtype=np.float32,
                frozen_dtype: str | None = None, adapter=None) -> Model:
    """Random weights with the method attached: full fine-tuning, or `adapter` (the
    method's settings; None: its defaults) on the base."""
    check_frozen_dtype(method, frozen_dtype)
    model = Model.random(cfg, seed, dtype, frozen_dtype)
    if method == "full":
        return model.train_all()
    return attach(model, adapter if adapter is not None else adapter_for(method), seed=seed)


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
            "peak_moment": ledger.peak_moment,
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


def memory_runs(cfg: ModelConfig, methods: list, policies: list[str], seqs: list[int],
                batch: int = 1, seed: int = 0, dtype=np.float32, frozen_dtype: str | None = None,
                attention: str = "tiled", tile: int = 128, ce_chunk: int = 128,
                checkpoints: str = "ram", scratch_dir: str | None = None, mlp_rows: int = 0,
                progress=None) -> list[dict]:
    """`minilars memory`: for each (method, adapter settings) of `methods` and each
    policy, a fresh model and one measured step per length, traced from before the model
    is built (so traced figures include the weights). `checkpoints` is where policy
    layer keeps its block inputs (policy none keeps none)."""
    results = []
    for method, adapter in methods:
        for policy in policies:
            opts = StepOptions(policy=policy, attention=attention, tile=tile, ce_chunk=ce_chunk,
                               checkpoints=checkpoints if policy == "layer" else "ram",
                               scratch_dir=scratch_dir, mlp_rows=mlp_rows if policy == "layer" else 0)
            tracemalloc.start()
            model = build_model(cfg, method, seed=seed, dtype=dtype, frozen_dtype=frozen_dtype,
                                adapter=adapter)
            rows = measure_lengths(model, seqs, opts, batch=batch, seed=seed, progress=progress)
            tracemalloc.stop()
            for r in rows:
                r["per_op"] = [{**o, "shape": list(o["shape"])} for o in r["per_op"]]
            results.append({"method": method, "policy": policy, "attention": attention,
                            "checkpoints": opts.checkpoints, "frozen_dtype": frozen_dtype,
                            "mlp_rows": opts.mlp_rows,
                            "trainable_params": sum(model.params[n].size for n in model.trainable),
                            "base_params": model.base_param_count(),
                            "saved_bytes_per_token": slope_per_token(rows),
                            "activation_bytes_per_token": slope_per_token(rows, "activations_peak"),
                            "rows": rows})
            del model
    return results


def format_memory_run(res: dict, model_name: str, batch: int, dtype_name: str,
                      per_op: bool = False) -> str:
    """One method and policy: the table of format_rows, the trainable count, and with
    per_op the saved tensors at the last length's peak, each with why it is kept."""
    rows = res["rows"]
    title = (f"{model_name}  method={res['method']}  policy={res['policy']}  "
             f"attention={res['attention']}  batch={batch}  dtype={dtype_name}")
    lines = [format_rows(rows, title),
             f"trainable parameters: {res['trainable_params']:,} "
             f"({100 * res['trainable_params'] / res['base_params']:.3f}% of the base model)"]
    if per_op:
        last = rows[-1]
        lines.append(f"\nsaved for backward at the peak, T={last['seq']}, per op (all layers):")
        for r in last["per_op"]:
            lines.append(f"  {r['op']:<12} {r['name']:<12} x{r['count']:<3} "
                         f"{str(tuple(r['shape'])):<24} {r['bytes'] / 2**20:9.2f} MiB  {r['why']}")
    return "\n".join(lines)


def format_compare(results: list[dict], seqs: list[int]) -> str:
    """Every method and policy side by side: ledger / traced MiB per length, saved bytes
    per token, trainable parameters, and the LARS / LoRA peak ratio per policy."""
    lines = ["peak MiB (ledger) / traced MiB per sequence length; saved bytes per token; "
             "trainable params"]
    head = f"{'method':<6} {'policy':<6} " + " ".join(f"{'T=' + str(T):>17}" for T in seqs) \
        + f" {'B/token':>9} {'trainable':>11}"
    lines.append(head)
    for res in results:
        cells = " ".join(f"{mib(r['ledger_peak']):8.0f}/{mib(r['traced_peak'] or 0):8.0f}"
                         for r in res["rows"])
        spt = res["saved_bytes_per_token"]
        lines.append(f"{res['method']:<6} {res['policy']:<6} {cells} "
                     f"{'-' if spt is None else f'{spt:9,.0f}':>9} {res['trainable_params']:>11,}")
    by = {(r["method"], r["policy"]): r for r in results}
    for policy in dict.fromkeys(r["policy"] for r in results):
        lars, lora = by.get(("lars", policy)), by.get(("lora", policy))
        if lars and lora:
            ratios = ", ".join(f"T={a['seq']}: {a['ledger_peak'] / b['ledger_peak']:.3f}"
                               for a, b in zip(lars["rows"], lora["rows"]))
            lines.append(f"LARS/LoRA peak ratio, policy={policy}: {ratios}")
    return "\n".join(lines)


def curve_lengths(seqs: list[int]) -> list[int]:
    """The lengths a planned line is drawn through: the measured ones and the powers of two
    between them."""
    lo, hi = min(seqs), max(seqs)
    powers = [2 ** e for e in range(int(np.log2(lo)), int(np.log2(hi)) + 2) if lo <= 2 ** e <= hi]
    return sorted(set(seqs) | set(powers))


def planned_line(cfg: ModelConfig, method: str, adapter, opts: StepOptions, frozen_dtype,
                 batch: int, seqs: list[int], key: str = "ledger_peak_bytes") -> list[tuple]:
    """[(T, MiB)] of the plan's `key` at each length."""
    return [(T, mib(predict(cfg, method, adapter, batch, T, opts, frozen_dtype=frozen_dtype,
                            slope=False)[key])) for T in seqs]


def memory_plot(cfg: ModelConfig, results: list[dict], adapters: dict, batch: int,
                attention: str, tile: int, ce_chunk: int, title: str) -> str:
    """The SVG of `minilars memory --plot`: per method and policy the measured ledger
    peaks (circles) on the planned line."""
    series = []
    for res in results:
        opts = StepOptions(policy=res["policy"], attention=attention, tile=tile,
                           ce_chunk=ce_chunk, checkpoints=res["checkpoints"], mlp_rows=res["mlp_rows"])
        seqs = [r["seq"] for r in res["rows"]]
        line = planned_line(cfg, res["method"], adapters[res["method"]], opts,
                            res["frozen_dtype"], batch, curve_lengths(seqs))
        series.append((f"{res['method']} {res['policy']}", line,
                       [(r["seq"], mib(r["ledger_peak"])) for r in res["rows"]]))
    return svg_curves(series, title=title, y_label="ledger peak (MiB)")
