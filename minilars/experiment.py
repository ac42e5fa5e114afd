"""The method comparison: zero-shot vs LoRA vs IA3 vs LARS (vs full) on the same model,
data, sequence length and step budget, with accuracy, peak memory and tokens/s.

Each cell (task, method, seed) is trained with `minilars.train`, then scored on a fixed
seeded subset of the task's evaluation split (the same questions for every method and
seed). Cells are written to OUT/cells/*.json as they finish, so an interrupted experiment
continues where it stopped. `jobs` > 1 runs that many cells at once, each in a process of
its own with cores // jobs BLAS threads. At the end OUT/results.md holds the table (mean
and std over seeds) and OUT/memory_vs_accuracy.svg the plot.

Tasks: multiple-choice tasks from `minilars data fetch`; "mmlu_<group>" (evaluation only,
zero- and 5-shot); "kv_lookup" (synthetic long-context key-value retrieval, exact match of
the greedily decoded value; trained on keys from another alphabet and seed).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from minilars.io.atomic import write_json, write_text


@dataclass
class ExperimentOptions:
    model: str
    out: str = "runs/experiment"
    tasks: list = field(default_factory=lambda: ["arc_easy", "piqa", "hellaswag", "winogrande", "boolq"])
    methods: list = field(default_factory=lambda: ["lora", "ia3", "lars"])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 60
    batch: int = 4
    seq: int = 256
    lr: dict = field(default_factory=lambda: {"lora": 1e-3, "ia3": 3e-3, "lars": 2e-3, "full": 1e-5})
    policy: str = "layer"
    eval_limit: int = 500
    mmlu: list = field(default_factory=lambda: ["economics"])
    longctx_seq: int = 2048
    longctx_train_examples: int = 64
    longctx_eval_examples: int = 50
    longctx_batch: int = 1
    data_dir: str = "data"
    jobs: int = 1                       # cells run at once, each in a process of its own


def _cell_path(opts, task, method, seed):
    return os.path.join(opts.out, "cells", f"{task}__{method}__{seed}.json")


def _done(path):
    return os.path.exists(path)


def zero_shot_cell(opts, task, log):
    from minilars.evaluate import load_eval_rows, score_multiple_choice
    from minilars.train import load_base
    path = _cell_path(opts, task, "zero-shot", 0)
    if _done(path):
        return
    model, tok = load_base(opts.model)
    t0 = time.perf_counter()
    if task.startswith("mmlu_"):
        for shots in (0, 5):
            rows = mmlu_rows(task, shots, opts.eval_limit)
            res = score_multiple_choice(model, tok, rows, max_len=1024,
                                        progress=_progress(f"{task} {shots}-shot "))
            write_json(_cell_path(opts, f"{task}_{shots}shot", "zero-shot", 0),
                       {"task": f"{task}_{shots}shot", "method": "zero-shot", "seed": 0,
                        "acc": res["acc"], "acc_norm": res["acc_norm"], "n": res["n"],
                        "eval_seconds": time.perf_counter() - t0})
            log(f"{task} {shots}-shot: acc {res['acc']:.3f}")
        write_json(path, {"task": task, "method": "zero-shot", "seed": 0, "skip": True})
        return
    if task == "kv_lookup":
        res = longctx_score(model, tok, opts)
    else:
        rows = load_eval_rows(task, opts.data_dir, opts.eval_limit, seed=0)
        res = score_multiple_choice(model, tok, rows, max_len=opts.seq * 2,
                                    progress=_progress(f"{task} zero-shot "))
    write_json(path, {"task": task, "method": "zero-shot", "seed": 0, "acc": res["acc"],
                      "acc_norm": res.get("acc_norm", res["acc"]), "n": res["n"],
                      "eval_seconds": time.perf_counter() - t0})
    log(f"{task} zero-shot: acc {res['acc']:.3f} acc_norm {res.get('acc_norm', res['acc']):.3f}")


def _progress(label: str):
    """A progress bar on a terminal; none in a log file (parallel cells)."""
    import sys
    from minilars.evaluate import print_progress
    return (lambda done, total: print_progress(done, total, label)) if sys.stderr.isatty() else None


def mmlu_rows(task, shots, limit):
    """MMLU test rows, with `shots` dev examples of the same subject in front."""
    from minilars.data.mmlu import load_mmlu
    group = task[len("mmlu_"):]
    dev = load_mmlu(group, "dev")
    rows = load_mmlu(group, "test")
    if limit and limit < len(rows):
        keep = np.random.default_rng([0, 11]).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(keep)]
    if shots:
        by_subject = {}
        for d in dev:
            by_subject.setdefault(d["subject"], []).append(d)
        out = []
        for r in rows:
            prefix = "".join(f"{d['query']} {d['choices'][d['gold']]}\n\n"
                             for d in by_subject.get(r["subject"], [])[:shots])
            out.append({**r, "query": prefix + r["query"]})
        rows = out
    return rows


def longctx_rows(opts, tok, split):
    from minilars.data.longctx import kv_lookup, split_defaults
    seed, alphabet = split_defaults(split)
    n = opts.longctx_train_examples if split == "train" else opts.longctx_eval_examples
    depths = np.linspace(0.0, 1.0, 5)
    rows = []
    for k, depth in enumerate(depths):
        rows += kv_lookup(max(1, n // len(depths)), target_tokens=opts.longctx_seq - 16,
                          depth=float(depth), seed=seed + k, alphabet=alphabet, tokenizer=tok)
    return [{**r, "prompt": r["query"], "completion": r["target"]} for r in rows]


def longctx_score(model, tok, opts) -> dict:
    """Exact match of the greedily decoded value."""
    from minilars.generate import generate
    rows = longctx_rows(opts, tok, "eval")
    correct = 0
    for r in rows:
        ids = tok.encode(r["query"])
        want = len(tok.encode(r["target"])) + 1
        out = tok.decode(list(generate(model, ids, max_new_tokens=want)))
        correct += out.strip().startswith(r["answer"])
    return {"acc": correct / len(rows), "n": len(rows)}


def method_cell(opts, task, method, seed, log):
    from minilars.evaluate import load_eval_rows, score_multiple_choice
    from minilars.io.peft import load_adapter
    from minilars.train import TrainOptions, load_base
    path = _cell_path(opts, task, method, seed)
    if _done(path):
        return
    run_dir = os.path.join(opts.out, "runs", f"{task}__{method}__{seed}")
    data = None
    seq = opts.seq
    if task == "kv_lookup":
        from minilars.io.tokenizer import Tokenizer
        tok = Tokenizer.from_folder(opts.model)     # the weights are not needed to write data
        data = os.path.join(opts.out, "kv_lookup_train.jsonl")
        if not os.path.exists(data):
            write_text(data, "".join(json.dumps(r) + "\n" for r in longctx_rows(opts, tok, "train")))
        seq = opts.longctx_seq
    topts = TrainOptions(model=opts.model, method=method, task=None if data else task, data=data,
                         seq=seq, steps=opts.steps,
                         batch=opts.longctx_batch if data else opts.batch, lr=opts.lr[method],
                         warmup=max(1, opts.steps // 10), policy=opts.policy, seed=seed,
                         out=run_dir, save_every=opts.steps, data_dir=opts.data_dir)
    summary = train_in_subprocess(topts)
    model, tok = load_base(opts.model)
    if method == "full":
        from minilars.io.safetensors_io import load_model
        model.params = load_model(os.path.join(run_dir, "checkpoint"))[1]
    else:
        load_adapter(os.path.join(run_dir, "checkpoint"), model)
    t0 = time.perf_counter()
    if task == "kv_lookup":
        res = longctx_score(model, tok, opts)
    else:
        rows = load_eval_rows(task, opts.data_dir, opts.eval_limit, seed=0)
        res = score_multiple_choice(model, tok, rows, max_len=opts.seq * 2,
                                    progress=_progress(f"{task} {method} seed {seed} "))
    cell = {"task": task, "method": method, "seed": seed, "acc": res["acc"],
            "acc_norm": res.get("acc_norm", res["acc"]), "n": res["n"],
            "final_loss": summary["final_loss"], "train_seconds": summary["seconds"],
            "tok_per_s": summary["tokens"] / summary["seconds"],
            "ledger_peak_mib": summary["ledger_peak_mib"], "rss_peak_mib": summary["rss_peak_mib"],
            "trainable": summary["trainable"]["trainable"], "steps": opts.steps,
            "batch": topts.batch, "seq": topts.seq, "lr": topts.lr,
            "eval_seconds": time.perf_counter() - t0}
    write_json(path, cell)
    log(f"{task} {method} seed {seed}: acc {cell['acc']:.3f} acc_norm {cell['acc_norm']:.3f} "
        f"loss {cell['final_loss']:.3f} {cell['tok_per_s']:.0f} tok/s "
        f"ledger {cell['ledger_peak_mib']:.0f} MiB RSS {cell['rss_peak_mib']:.0f} MiB")


class CellError(RuntimeError):
    """A cell of the experiment failed (its training process, or a parallel cell)."""


def train_in_subprocess(topts) -> dict:
    """Train one cell in a fresh process, so its peak RSS is that run's alone. Its step
    lines go to our stdout (and RUN_DIR/log.jsonl); a failure raises CellError with the
    process's error."""
    import dataclasses
    import shutil
    import subprocess
    import sys
    shutil.rmtree(topts.out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "minilars.experiment", "train-cell",
                           json.dumps(dataclasses.asdict(topts))],
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise CellError(f"training {topts.out} failed (exit {proc.returncode}): "
                        f"{lines[-1] if lines else 'no error message'}")
    with open(os.path.join(topts.out, "summary.json")) as f:
        return json.load(f)


def planned_cells(opts: ExperimentOptions) -> list[tuple[str, str, int]]:
    """Every (task, method, seed) cell of the experiment, in the order they run."""
    cells = []
    for task in opts.tasks:
        cells.append((task, "zero-shot", 0))
        cells += [(task, method, seed) for method in opts.methods for seed in opts.seeds]
    return cells + [(f"mmlu_{group}", "zero-shot", 0) for group in opts.mmlu]


def run_cell(opts: ExperimentOptions, task: str, method: str, seed: int, log=print) -> None:
    if method == "zero-shot":
        zero_shot_cell(opts, task, log)
    else:
        method_cell(opts, task, method, seed, log)


def run_experiment(opts: ExperimentOptions, log=print) -> str:
    t0 = time.perf_counter()
    os.makedirs(os.path.join(opts.out, "cells"), exist_ok=True)
    write_json(os.path.join(opts.out, "experiment.json"), opts.__dict__)
    todo = [c for c in planned_cells(opts) if not _done(_cell_path(opts, *c))]
    if opts.jobs == 1:
        for cell in todo:
            run_cell(opts, *cell, log=log)
    else:
        run_cells_in_parallel(opts, todo, log)
    report = write_report(opts)
    log(f"experiment done in {time.perf_counter() - t0:.0f} s; {report}")
    return report


def run_cells_in_parallel(opts: ExperimentOptions, todo: list, log=print) -> None:
    """Up to opts.jobs cells at once, each in a process of its own (`python -m
    minilars.experiment cell ...`) with cores // jobs BLAS and OpenMP threads unless the
    environment sets them. A cell's output goes to OUT/logs/TASK__METHOD__SEED.log. A failed
    cell does not stop the others; the run then fails naming it, and a rerun retries it."""
    import subprocess
    import sys
    threads = str(max(1, (os.cpu_count() or 1) // opts.jobs))
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    logs = os.path.join(opts.out, "logs")
    os.makedirs(logs, exist_ok=True)
    queue, running, failed = list(todo), {}, []
    while queue or running:
        while queue and len(running) < opts.jobs:
            task, method, seed = queue.pop(0)
            name = f"{task}__{method}__{seed}"
            path = os.path.join(logs, name + ".log")
            with open(path, "w") as out:     # the child keeps its own copy of the descriptor
                proc = subprocess.Popen([sys.executable, "-m", "minilars.experiment", "cell",
                                         json.dumps(opts.__dict__), task, method, str(seed)],
                                        stdout=out, stderr=subprocess.STDOUT, env=env)
            running[proc] = (name, path)
            log(f"started {name} ({env['OPENBLAS_NUM_THREADS']} BLAS threads; log {path})")
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            name, path = running.pop(proc)
            with open(path) as f:
                last = ([line.strip() for line in f if line.strip()] or [""])[-1]
            if proc.returncode:
                failed.append(name)
                log(f"{name} failed (exit {proc.returncode}): {last}")
            else:
                log(last)
    if failed:
        raise CellError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; see their logs in "
                        f"{logs}. The finished cells are kept; rerunning continues from them")


# ------------------------------------------------------------------ the report

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


def write_report(opts: ExperimentOptions) -> str:
    """OUT/results.md from the finished cells: the multiple-choice table (with MMLU), the
    long-context table (its memory is at a different length, so it has its own columns),
    and OUT/memory_vs_accuracy.svg."""
    cells = load_cells(opts.out)
    methods = ["zero-shot"] + list(opts.methods)
    found = {c["task"] for c in cells}
    tasks = [t for t in opts.tasks if t in found] + sorted(found - set(opts.tasks))
    mc_tasks = [t for t in tasks if t != "kv_lookup"]
    trained = [t for t in mc_tasks if not t.startswith("mmlu_")]      # MMLU is scored only
    seeds = sorted({c["seed"] for c in cells if c["method"] != "zero-shot"})
    runs_expected = lambda method: 1 if method == "zero-shot" else len(seeds)   # zero-shot has no seeds
    n_of = lambda t: "/".join(str(n) for n in sorted({c["n"] for c in cells if c["task"] == t}))
    lines = [f"# minilars experiment: {os.path.basename(opts.model.rstrip('/'))}", "",
             f"Fine-tuning: {opts.steps} steps x batch {opts.batch} at seq {opts.seq}, recompute "
             f"policy `{opts.policy}`, learning rates {', '.join(f'{m} {opts.lr[m]:g}' for m in opts.methods)}. "
             f"Accuracy (%) on a fixed seeded subset of n eval questions per task (n in each "
             f"column's head; acc_norm for HellaSwag, PIQA and ARC, acc elsewhere), the same "
             f"questions for every method and seed; mean ± std over the training seeds present "
             f"({', '.join(map(str, seeds)) or 'none'}; a cell without ± has one seed, and a cell "
             f"with fewer seeds than that says how many it has). Missing cells: `-`.", "",
             "| method | " + " | ".join(f"{t} (n={n_of(t)})" for t in mc_tasks) + " | avg | peak ledger MiB | peak RSS MiB | train tok/s |",
             "|---|" + "---|" * (len(mc_tasks) + 4)]
    points, baseline = [], None
    for method in methods:
        row, means = [], []
        for task in mc_tasks:
            values = [c[_metric(task)] for c in cells if c["task"] == task and c["method"] == method]
            row.append(_cell_text(values, runs_expected(method)))
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
    if "kv_lookup" in tasks:
        lines += ["", f"## Long context: key-value lookup at T={opts.longctx_seq}", "",
                  f"Synthetic: ~127 four-symbol keys with four-digit values in {opts.longctx_seq} "
                  f"tokens, the asked key at five depths; exact match of the greedily decoded "
                  f"value on {n_of('kv_lookup')} eval examples. Trained on "
                  f"{opts.longctx_train_examples} examples whose keys come from another alphabet "
                  f"and seed, {opts.steps} steps x batch {opts.longctx_batch}. Loss on the "
                  f"value tokens only.", "",
                  "| method | exact match | peak ledger MiB | peak RSS MiB | train tok/s |",
                  "|---|---|---|---|---|"]
        for method in methods:
            sel = [c for c in cells if c["task"] == "kv_lookup" and c["method"] == method]
            lines.append(f"| {method} | {_cell_text([c['acc'] for c in sel], runs_expected(method))} "
                         f"| {_run_columns(sel)} |")
    report = os.path.join(opts.out, "results.md")
    write_text(report, "\n".join(lines) + "\n")
    if points:
        title = (f"{', '.join(trained)}: {opts.steps} steps at seq {opts.seq}, "
                 f"policy {opts.policy}")
        write_text(os.path.join(opts.out, "memory_vs_accuracy.svg"),
                   svg_scatter(points, baseline=baseline, title=title))
    return report


def _seed_averages(cells, method, tasks) -> list[float]:
    """Per training seed, the mean accuracy over `tasks`, for the seeds that have all of them."""
    by_seed: dict[int, dict[str, float]] = {}
    for c in cells:
        if c["method"] == method and c["task"] in tasks:
            by_seed.setdefault(c["seed"], {})[c["task"]] = c[_metric(c["task"])]
    return [statistics.fmean(accs.values()) for seed, accs in sorted(by_seed.items())
            if len(accs) == len(tasks)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values between lo and hi (steps of 1, 2 or 5 times a power of ten)."""
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def svg_scatter(points, baseline=None, title="", width=520, height=340) -> str:
    """A dependency-free SVG scatter of (name, peak MiB, mean accuracy %, std % or None):
    one labelled point per method, ± std error bars where there are seeds to give one, and
    a dashed line at the zero-shot accuracy (no training, so no training memory)."""
    xs = [p[1] for p in points]
    ys = [p[2] + sign * (p[3] or 0) for p in points for sign in (-1, 1)]
    ys += [] if baseline is None else [baseline]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05 + 1
    y0, y1 = min(ys) - 1, max(ys) + 1
    left, right, top, bottom = 64, width - 24, 40, height - 44
    X = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
    Y = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle">{title}</text>']
    for t in _ticks(x0, x1):
        parts += [f'<line x1="{X(t):.1f}" y1="{top}" x2="{X(t):.1f}" y2="{bottom}" stroke="#ddd"/>',
                  f'<text x="{X(t):.1f}" y="{bottom + 16}" text-anchor="middle">{t:g}</text>']
    for t in _ticks(y0, y1):
        parts += [f'<line x1="{left}" y1="{Y(t):.1f}" x2="{right}" y2="{Y(t):.1f}" stroke="#ddd"/>',
                  f'<text x="{left - 6}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>']
    parts += [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
              f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>',
              f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">'
              f'peak training memory (ledger, MiB)</text>',
              f'<text x="16" y="{(top + bottom) / 2}" transform="rotate(-90 16 {(top + bottom) / 2})" '
              f'text-anchor="middle">mean accuracy (%)</text>']
    if baseline is not None:
        parts += [f'<line x1="{left}" y1="{Y(baseline):.1f}" x2="{right}" y2="{Y(baseline):.1f}" '
                  f'stroke="#999" stroke-dasharray="6 4"/>',
                  f'<text x="{right - 4}" y="{Y(baseline) - 5:.1f}" text-anchor="end" fill="#666">'
                  f'zero-shot {baseline:.1f}</text>']
    for name, x, y, std in points:
        if std:
            parts.append(f'<line x1="{X(x):.1f}" y1="{Y(y - std):.1f}" x2="{X(x):.1f}" '
                         f'y2="{Y(y + std):.1f}" stroke="#3366cc"/>')
        parts += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="5" fill="#3366cc"/>',
                  f'<text x="{X(x) + 8:.1f}" y="{Y(y) + 4:.1f}">{name}</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    # python -m minilars.experiment train-cell '<TrainOptions JSON>'
    # python -m minilars.experiment cell '<ExperimentOptions JSON>' TASK METHOD SEED
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "train-cell":
        from minilars.train import TrainOptions, train
        train(TrainOptions(**json.loads(sys.argv[2])))
    elif len(sys.argv) == 6 and sys.argv[1] == "cell":
        run_cell(ExperimentOptions(**json.loads(sys.argv[2])), sys.argv[3], sys.argv[4],
                 int(sys.argv[5]), log=lambda line: print(line, flush=True))
    else:
        sys.exit("usage: python -m minilars.experiment train-cell '<TrainOptions JSON>'\n"
                 "       python -m minilars.experiment cell '<ExperimentOptions JSON>' TASK METHOD SEED")
