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
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from minilars.adapters import ADAPTERS
from minilars.data.longctx import kv_lookup, split_defaults
from minilars.data.mmlu import load_mmlu
from minilars.evaluate import load_eval_rows, print_progress, score_multiple_choice
from minilars.generate import generate
from minilars.io.atomic import write_json, write_text
from minilars.io.load import read_tokenizer
from minilars.lab.jobs import CellError, run_child, run_parallel
from minilars.lab.report import write_report
from minilars.train import TrainOptions, load_base, load_trained, train


@dataclass
class ExperimentOptions:
    model: str
    out: str = "runs/experiment"
    tasks: list = field(default_factory=lambda: ["arc_easy", "piqa", "hellaswag", "winogrande", "boolq"])
    methods: list = field(default_factory=lambda: list(ADAPTERS))
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
    path = _cell_path(opts, task, "zero-shot", 0)
    if _done(path):
        return
    model, tok = load_base(opts.model)
    t0 = time.perf_counter()
    if task.startswith("mmlu_"):
        for shots in (0, 5):
            rows = mmlu_rows(task, shots, opts.eval_limit)
            res = score_multiple_choice(model, tok, rows, max_len=_context(model, 1024),
                                        progress=_progress(f"{task} {shots}-shot "))
            write_json(_cell_path(opts, f"{task}_{shots}shot", "zero-shot", 0),
                       {"task": f"{task}_{shots}shot", "method": "zero-shot", "seed": 0,
                        "acc": res["acc"], "acc_norm": res["acc_norm"], "n": res["n"],
                        "eval_seconds": time.perf_counter() - t0})
            log(f"{task} {shots}-shot: acc {res['acc']:.3f}")
        write_json(path, {"task": task, "method": "zero-shot", "seed": 0, "skip": True})
        return
    res = _score(model, tok, task, opts, f"{task} zero-shot ")
    write_json(path, {"task": task, "method": "zero-shot", "seed": 0, "acc": res["acc"],
                      "acc_norm": res.get("acc_norm", res["acc"]), "n": res["n"],
                      "eval_seconds": time.perf_counter() - t0})
    log(f"{task} zero-shot: acc {res['acc']:.3f} acc_norm {res.get('acc_norm', res['acc']):.3f}")


def _score(model, tok, task: str, opts, label: str) -> dict:
    """The task's score: the key-value probe's, or multiple-choice accuracy on the eval rows."""
    if task == "kv_lookup":
        return longctx_score(model, tok, opts)
    rows = load_eval_rows(task, opts.data_dir, opts.eval_limit, seed=0)
    return score_multiple_choice(model, tok, rows, max_len=_context(model, opts.seq * 2),
                                 progress=_progress(label))


def _context(model, tokens: int) -> int:
    """Scoring context: `tokens`, or fewer when the model has fewer positions (a prompt
    is cut from the left to fit)."""
    return min(tokens, model.cfg.max_position_embeddings)


def _progress(label: str):
    """A progress bar on a terminal; none in a log file (parallel cells)."""
    return (lambda done, total: print_progress(done, total, label)) if sys.stderr.isatty() else None


def mmlu_rows(task, shots, limit):
    """MMLU test rows, with `shots` dev examples of the same subject in front."""
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
    rows = longctx_rows(opts, tok, "eval")
    correct = 0
    for r in rows:
        ids = tok.encode(r["query"])
        want = len(tok.encode(r["target"])) + 1
        out = tok.decode(list(generate(model, ids, max_new_tokens=want)))
        correct += out.strip().startswith(r["answer"])
    return {"acc": correct / len(rows), "n": len(rows)}


def method_cell(opts, task, method, seed, log):
    path = _cell_path(opts, task, method, seed)
    if _done(path):
        return
    run_dir = os.path.join(opts.out, "runs", f"{task}__{method}__{seed}")
    data = None
    seq = opts.seq
    if task == "kv_lookup":
        tok = read_tokenizer(opts.model)            # the weights are not needed to write data
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
    model, tok = load_trained(opts.model, run_dir)
    t0 = time.perf_counter()
    res = _score(model, tok, task, opts, f"{task} {method} seed {seed} ")
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


def train_in_subprocess(topts) -> dict:
    """Train one cell in a fresh process, so its peak RSS is that run's alone. Its step
    lines go to our stdout (and RUN_DIR/log.jsonl); a failure raises CellError with the
    process's error."""
    shutil.rmtree(topts.out, ignore_errors=True)
    run_child([sys.executable, "-m", "minilars.lab.experiment", "train-cell",
               json.dumps(topts.to_json())], f"training {topts.out}")
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
    minilars.lab.experiment cell ...`) with cores // jobs BLAS and OpenMP threads unless
    the environment sets them. A cell's output goes to OUT/logs/TASK__METHOD__SEED.log. A
    failed cell does not stop the others; the run then fails naming it, and a rerun
    retries it."""
    logs = os.path.join(opts.out, "logs")
    commands = [(f"{task}__{method}__{seed}",
                 [sys.executable, "-m", "minilars.lab.experiment", "cell",
                  json.dumps(opts.__dict__), task, method, str(seed)])
                for task, method, seed in todo]
    failed = run_parallel(commands, opts.jobs, logs, log)
    if failed:
        raise CellError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; see their logs in "
                        f"{logs}. The finished cells are kept; rerunning continues from them")


if __name__ == "__main__":
    # python -m minilars.lab.experiment train-cell '<TrainOptions JSON>'
    # python -m minilars.lab.experiment cell '<ExperimentOptions JSON>' TASK METHOD SEED
    if len(sys.argv) == 3 and sys.argv[1] == "train-cell":
        train(TrainOptions(**json.loads(sys.argv[2])))
    elif len(sys.argv) == 6 and sys.argv[1] == "cell":
        run_cell(ExperimentOptions(**json.loads(sys.argv[2])), sys.argv[3], sys.argv[4],
                 int(sys.argv[5]), log=lambda line: print(line, flush=True))
    else:
        sys.exit("usage: python -m minilars.lab.experiment train-cell '<TrainOptions JSON>'\n"
                 "       python -m minilars.lab.experiment cell '<ExperimentOptions JSON>' TASK METHOD SEED")
