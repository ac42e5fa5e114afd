"""The experiment's report: OUT/results.md (mean ± std over seeds per method and task,
with memory and speed) and the memory-against-accuracy plot, from the finished cells."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

from minilars.io.atomic import write_text
from minilars.lab.svg import svg_scatter


def load_cells(out: str) -> list[dict]:
    cells = []
    folder = os.path.join(out, "cells")
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            cell = json.load(f)
        if not cell.get("skip"):
            cells.append(cell)
    return cells


def _mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _metric(task: str) -> str:
    """acc_norm for HellaSwag, PIQA and ARC (as in the paper's harness), acc elsewhere."""
    return "acc_norm" if task.split("_")[0] in ("hellaswag", "piqa", "arc") else "acc"


def _cell_text(values, n_seeds: int = 1) -> str:
    """mean ± std in %; a cell with fewer runs than the n_seeds the table holds says so."""
    m, s = _mean_std(values)
    if m is None:
        return "-"
    text = f"{100 * m:.1f} ± {100 * s:.1f}" if len(values) > 1 else f"{100 * m:.1f}"
    return text + (f" ({len(values)}/{n_seeds} seeds)" if len(values) < n_seeds else "")


def _run_columns(sel) -> str:
    """peak ledger, peak RSS, tok/s of the training runs in sel (means), as table cells."""
    fmt = lambda key, f: "-" if not any(key in c for c in sel) else \
        f.format(statistics.fmean(c[key] for c in sel if key in c))
    return f"{fmt('ledger_peak_mib', '{:.0f}')} | {fmt('rss_peak_mib', '{:.0f}')} | {fmt('tok_per_s', '{:.0f}')}"


def write_report(opts) -> str:
    """OUT/results.md from the finished cells: the multiple-choice table (with MMLU), the
    long-context table (its memory is at a different length, so it has its own columns),
    and OUT/memory_vs_accuracy.svg. opts: the experiment's ExperimentOptions."""
    cells = load_cells(opts.out)
    found = {c["task"] for c in cells}
    tasks = [t for t in opts.tasks if t in found] + sorted(found - set(opts.tasks))
    mc_tasks = [t for t in tasks if t != "kv_lookup"]
    trained = [t for t in mc_tasks if not t.startswith("mmlu_")]      # MMLU is scored only
    seeds = sorted({c["seed"] for c in cells if c["method"] != "zero-shot"})
    table = _Table(cells, ["zero-shot"] + list(opts.methods), seeds)
    lines, points, baseline = _mc_section(opts, table, mc_tasks, trained)
    if "kv_lookup" in tasks:
        lines += _longctx_section(opts, table)
    report = os.path.join(opts.out, "results.md")
    write_text(report, "\n".join(lines) + "\n")
    if points:
        title = (f"{', '.join(trained)}: {opts.steps} steps at seq {opts.seq}, "
                 f"policy {opts.policy}")
        write_text(os.path.join(opts.out, "memory_vs_accuracy.svg"),
                   svg_scatter(points, baseline=baseline, title=title))
    return report


@dataclass
class _Table:
    """The cells a report reads, the methods it has rows for and the training seeds found."""
    cells: list
    methods: list
    seeds: list

    def runs_expected(self, method: str) -> int:
        return 1 if method == "zero-shot" else len(self.seeds)   # zero-shot has no seeds

    def n_of(self, task: str) -> str:
        return "/".join(str(n) for n in sorted({c["n"] for c in self.cells if c["task"] == task}))


def _mc_section(opts, table: _Table, mc_tasks: list, trained: list):
    """The multiple-choice table's lines, the plot's points and the zero-shot baseline."""
    cells, seeds = table.cells, table.seeds
    lines = [f"# minilars experiment: {os.path.basename(opts.model.rstrip('/'))}", "",
             f"Fine-tuning: {opts.steps} steps x batch {opts.batch} at seq {opts.seq}, recompute "
             f"policy `{opts.policy}`, learning rates {', '.join(f'{m} {opts.lr[m]:g}' for m in opts.methods)}. "
             f"Accuracy (%) on a fixed seeded subset of n eval questions per task (n in each "
             f"column's head; acc_norm for HellaSwag, PIQA and ARC, acc elsewhere), the same "
             f"questions for every method and seed; mean ± std over the training seeds present "
             f"({', '.join(map(str, seeds)) or 'none'}; a cell without ± has one seed, and a cell "
             f"with fewer seeds than that says how many it has). Missing cells: `-`.", "",
             "| method | " + " | ".join(f"{t} (n={table.n_of(t)})" for t in mc_tasks) + " | avg | peak ledger MiB | peak RSS MiB | train tok/s |",
             "|---|" + "---|" * (len(mc_tasks) + 4)]
    points, baseline = [], None
    for method in table.methods:
        row, means = [], []
        for task in mc_tasks:
            values = [c[_metric(task)] for c in cells if c["task"] == task and c["method"] == method]
            row.append(_cell_text(values, table.runs_expected(method)))
            if values and task in trained:
                means.append(statistics.fmean(values))
        complete = len(means) == len(trained) and means
        avg = statistics.fmean(means) if complete else None
        per_seed = _seed_averages(cells, method, trained)
        spread = statistics.stdev(per_seed) if len(per_seed) > 1 else None
        avg_text = "-" if avg is None else f"{100 * avg:.1f}" + (
            "" if spread is None else f" ± {100 * spread:.1f}")
        runs = [c for c in cells if c["method"] == method and c["task"] in trained]
        lines.append(f"| {method} | " + " | ".join(row) + f" | {avg_text} | {_run_columns(runs)} |")
        mems = [c["ledger_peak_mib"] for c in runs if "ledger_peak_mib" in c]
        if method == "zero-shot" and avg is not None:
            baseline = 100 * avg
        elif mems and avg is not None:
            points.append((method, statistics.fmean(mems), 100 * avg,
                           None if spread is None else 100 * spread))
    lines += ["", f"avg: mean over {', '.join(trained)} (shown only when every one has a "
              "result); its ± is the std over the seeds that have every one of them. MMLU "
              "columns are the base model, zero- and 5-shot, never trained on, so they are not "
              "in the average. Memory: the peak of a training step in the "
              "ledger (named bytes) and the peak RSS of the training process (each cell trains "
              "in a process of its own). tok/s: tokens per second of training, counting the padding "
              "of each batch to its longest example, on a machine that may have run other cells "
              "at the same time (`--jobs`): compare it within one run."]
    return lines, points, baseline


def _longctx_section(opts, table: _Table) -> list[str]:
    lines = ["", f"## Long context: key-value lookup at T={opts.longctx_seq}", "",
             f"Synthetic: ~127 four-symbol keys with four-digit values in {opts.longctx_seq} "
             f"tokens, the asked key at five depths; exact match of the greedily decoded "
             f"value on {table.n_of('kv_lookup')} eval examples. Trained on "
             f"{opts.longctx_train_examples} examples whose keys come from another alphabet "
             f"and seed, {opts.steps} steps x batch {opts.longctx_batch}. Loss on the "
             f"value tokens only.", "",
             "| method | exact match | peak ledger MiB | peak RSS MiB | train tok/s |",
             "|---|---|---|---|---|"]
    for method in table.methods:
        sel = [c for c in table.cells if c["task"] == "kv_lookup" and c["method"] == method]
        lines.append(f"| {method} | {_cell_text([c['acc'] for c in sel], table.runs_expected(method))} "
                     f"| {_run_columns(sel)} |")
    return lines


def _seed_averages(cells, method, tasks) -> list[float]:
    """Per training seed, the mean accuracy over `tasks`, for the seeds that have all of them."""
    by_seed: dict[int, dict[str, float]] = {}
    for c in cells:
        if c["method"] == method and c["task"] in tasks:
            by_seed.setdefault(c["seed"], {})[c["task"]] = c[_metric(c["task"])]
    return [statistics.fmean(accs.values()) for seed, accs in sorted(by_seed.items())
            if len(accs) == len(tasks)]
