"""The planner against real steps: `minilars bench plan` prints predicted and measured
ledger peak and peak RSS for a grid of configurations on a model's shapes.

Each configuration is measured in a fresh Python process (random weights, the frozen
form asked for): two training steps, the peak RSS (VmHWM) reset before the second, so
the optimizer's state is resident as in any step after a run's first. The prediction is
minilars.plan's, made from shapes alone in that process before it builds anything, as
`train --budget` makes it: the runtime baseline is that process's own.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minilars.config import named_config
from minilars.lab.bench import timed_step
from minilars.lab.memory_curve import build_model, curve_lengths, planned_line
from minilars.lab.svg import svg_curves
from minilars.memory import Ledger, mib, peak_rss_bytes, register_params, reset_peak_rss
from minilars.model import StepOptions, next_token_targets, zero_grads
from minilars.optim import AdamW
from minilars.plan import predict
from minilars.threads import set_threads

GRID_METHODS = ("full", "lora", "ia3", "lars")
GRID_POLICIES = ("none", "layer")
GRID_SEQ = (128, 512, 2048)
GRID_FROZEN = (None, "float16")


def grid(arch: str = "smollm2-135m") -> list[dict]:
    """The default grid: methods x policies x lengths x frozen forms (full fine-tuning in
    float32 only); each method at T=4096 with policy layer; the checkpoint stores at
    T=2048; the quantized forms with disk checkpoints and MLP row blocks at 2048 and 4096.
    (T=4096 is where attention's T^2 makes a step slow, so it is sampled, not crossed.)"""
    cells = [dict(arch=arch, method=m, policy=p, seq=T, frozen=f)
             for m, p, T, f in itertools.product(GRID_METHODS, GRID_POLICIES, GRID_SEQ, GRID_FROZEN)
             if not (m == "full" and f)]
    cells += [dict(arch=arch, method=m, policy="layer", seq=4096, frozen=None) for m in GRID_METHODS]
    cells += [dict(arch=arch, method=m, policy="layer", seq=2048, frozen=f, checkpoints=c)
              for m in ("lora", "lars") for f in (None, "float16") for c in ("bf16", "disk")]
    cells += [dict(arch=arch, method=m, policy="layer", seq=T, frozen=f, checkpoints="disk",
                   mlp_rows=512) for m in ("lora", "lars") for T in (2048, 4096)
              for f in ("q8_0", "q4_1")]
    return cells + [c for c in edge_cells(arch) if c not in cells]


EDGE_FROZEN = (None, "float16", "q8_0", "q4_1")
EDGE_STORES = ("ram", "disk")
EDGE_SEQ = (512, 2048)


def edge_cells(arch: str) -> list[dict]:
    """LARS, policy layer, each frozen form x checkpoint store at EDGE_SEQ: the measured
    points of the edge-memory curve (edge_plot). ram cells carry no checkpoints key, as
    the grid's own do, so the two lists share them."""
    return [dict(arch=arch, method="lars", policy="layer", seq=T, frozen=f,
                 **({} if c == "ram" else {"checkpoints": c}))
            for f in EDGE_FROZEN for c in EDGE_STORES for T in EDGE_SEQ]


def edge_plot(rows: list[dict], arch: str, longest: int = 8192) -> str:
    """The SVG of `bench plan --plot`: LARS's planned peak RSS against T (256 ... longest)
    for each frozen form and checkpoint store, with the measured peaks of the grid's rows
    on them."""
    cfg = named_config(arch)
    series = []
    for frozen, store in itertools.product(EDGE_FROZEN, EDGE_STORES):
        opts = StepOptions(policy="layer", checkpoints=store)
        line = planned_line(cfg, "lars", None, opts, frozen, 1, curve_lengths([256, longest]),
                            "peak_rss_bytes")
        points = [(r["seq"], mib(r["rss"])) for r in rows
                  if r["method"] == "lars" and r["policy"] == "layer" and r["frozen"] == frozen
                  and r.get("checkpoints", "ram") == store and not r.get("mlp_rows")]
        series.append((f"{frozen or 'float32'} {store}", line, points))
    return svg_curves(series, title=f"{arch}: LARS, policy layer, batch 1 (lines: plan; points: measured)",
                      y_label="peak RSS (MiB)")


def measure(cell: dict) -> dict:
    """One configuration in this process: the plan (this process's runtime baseline),
    then two steps; the ledger peak and peak RSS of the second."""
    cfg = named_config(cell["arch"])
    opts = StepOptions(policy=cell["policy"], checkpoints=cell.get("checkpoints", "ram"),
                       mlp_rows=cell.get("mlp_rows", 0))
    if cell.get("threads"):
        set_threads(cell["threads"])
    plan = predict(cfg, cell["method"], batch=cell.get("batch", 1), seq=cell["seq"], opts=opts,
                   frozen_dtype=cell.get("frozen"))            # the baseline: this process's
    model = build_model(cfg, cell["method"], frozen_dtype=cell.get("frozen"))
    ledger = Ledger()
    register_params(model, ledger)
    grads = zero_grads(model, ledger)
    opt = AdamW(lr=1e-5)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(cell.get("batch", 1), cell["seq"]))
    for step in range(2):
        ledger.reset_peak()
        reset = reset_peak_rss()
        seconds = timed_step(model, tokens, next_token_targets(tokens), grads, opt, opts, ledger)
    return {"plan_ledger": plan["ledger_peak_bytes"], "plan_rss": plan["peak_rss_bytes"],
            "moment": plan["peak_moment"], "ledger": ledger.peak_total,
            "rss": peak_rss_bytes() if reset else None, "seconds": seconds}


def check(cells: list[dict], progress=None, jobs: int = 1) -> list[dict]:
    """Predicted against measured for every cell (each planned and measured in a fresh
    process), in the cells' order. jobs > 1 measures that many cells at once, each on
    one thread: peak RSS is each process's own, and one-thread processes do not fight
    over the cores as BLAS teams would (a step slowed 20x so)."""
    def one(cell):
        cell = {**cell, "threads": 1} if jobs > 1 else cell
        proc = subprocess.run([sys.executable, "-m", "minilars.lab.plan_check", json.dumps(cell)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench plan: the cell {cell} failed:\n{proc.stderr[-2000:]}")
        row = {**cell, **json.loads(proc.stdout.strip().splitlines()[-1])}
        if progress:
            progress(row)
        return row
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, cells))


def format_check(rows: list[dict]) -> str:
    lines = [f"{'method':<6} {'policy':<6} {'T':>5} {'frozen':<8} {'store':<9} "
             f"{'ledger plan':>12} {'measured':>12} {'equal':>6} {'RSS plan MiB':>12} "
             f"{'measured':>9} {'error':>7}"]
    errors = []
    for r in rows:
        err = (r["plan_rss"] - r["rss"]) / r["rss"]
        errors.append(abs(err))
        lines.append(f"{r['method']:<6} {r['policy']:<6} {r['seq']:>5} {r['frozen'] or 'float32':<8} "
                     f"{r.get('checkpoints', 'ram') + ('+rows' if r.get('mlp_rows') else ''):<9} "
                     f"{r['plan_ledger']:>12,} {r['ledger']:>12,} "
                     f"{'yes' if r['plan_ledger'] == r['ledger'] else 'NO':>6} "
                     f"{mib(r['plan_rss']):12.1f} {mib(r['rss']):9.1f} {100 * err:6.1f}%")
    exact = sum(r["plan_ledger"] == r["ledger"] for r in rows)
    lines.append(f"{len(rows)} configurations: ledger peak exact in {exact}; peak RSS error "
                 f"median {100 * float(np.median(errors)):.1f}%, worst {100 * max(errors):.1f}%")
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m minilars.lab.plan_check '<cell JSON>': measure one cell (run by check())
    print(json.dumps(measure(json.loads(sys.argv[1]))))
