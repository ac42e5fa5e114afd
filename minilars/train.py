"""Fine-tuning: the training step and the loop around it.

One step: forward + backward (model.forward_backward) -> clip the gradient norm -> AdamW.
The loop adds what a run needs: seeded data order, a warmup+cosine learning rate, a step
line with loss, tokens/s and memory, periodic evaluation, atomic checkpoints, an exact
--resume, and a clean stop on a NaN/Inf loss that leaves the last good checkpoint intact.

RUN_DIR/
  run.json                 the options the run was started with
  log.jsonl                one line per step (loss, lr, tok/s, memory)
  checkpoint/              the last good state, replaced atomically as a whole:
    adapter_config.json, adapter_model.safetensors    (adapters; PEFT layout)
    model.safetensors + config.json                   (full fine-tuning)
    optimizer.safetensors, state.json
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from minilars.adapters import (ADAPTERS, METHODS, adapter_tensor_names, attach,
                               trainable_report)
from minilars.data.tasks import eval_split, load_task
from minilars.examples import batch_indices, encode_rows, make_batch, read_jsonl
from minilars.frozen import check_frozen_dtype
from minilars.io.atomic import atomic_dir, write_json, write_text
from minilars.io.peft import PREFIX, load_adapter, save_adapter
from minilars.io.safetensors_io import (load_model, load_safetensors, save_model,
                                        save_safetensors_atomic)
from minilars.io.load import load_params
from minilars.memory import Ledger, mib, peak_rss_bytes, register_params
from minilars.model import Model, StepOptions, forward_backward, forward_loss, zero_grads
from minilars.ops.loss import DEFAULT_CHUNK
from minilars.optim import AdamW, clip_grad_norm
from minilars.threads import set_threads


@dataclass
class TrainOptions:
    model: str                              # HF folder (config.json, model.safetensors, tokenizer.json)
    method: str = "lora"                    # full | lora | ia3 | lars
    task: str | None = None                 # a task from `minilars data fetch`
    data: str | None = None                 # or a JSONL file (text / prompt+completion / MC rows)
    seq: int = 512
    steps: int = 100
    batch: int = 4
    lr: float = 1e-4
    warmup: int = 10
    min_lr_ratio: float = 0.1               # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    clip: float = 1.0
    policy: str = "layer"
    attention: str = "tiled"
    seed: int = 0
    out: str = "runs/run"
    eval_every: int = 0                     # 0: only at the end
    eval_examples: int = 32
    save_every: int = 50
    max_examples: int | None = None         # cap on training rows (after a seeded shuffle)
    frozen_dtype: str | None = None         # frozen matrices as float16, bfloat16, q8_0, q4_1 ...
    checkpoints: str = "ram"                # policy layer's block inputs: ram | bf16 | disk
    ce_chunk: int = DEFAULT_CHUNK           # rows of logits alive at once in the loss
    mlp_rows: int = 0                       # policy layer: the MLP's backward by this many rows
    scratch_dir: str | None = None          # the disk store's folder (default: the run folder)
    data_dir: str = "data"
    threads: int = 0                        # BLAS and C core threads (minilars.threads); 0: as they are
    adapter: object = None                  # the adapter's settings (LoRA(...), ...); None: defaults

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method != "full" and not isinstance(self.adapter, ADAPTERS[self.method]):
            # from run.json (a dict of settings) or unset (the adapter's defaults)
            self.adapter = ADAPTERS[self.method](**(self.adapter or {}))

    def to_json(self) -> dict:
        """run.json: every option, the adapter's settings as a dict."""
        return dataclasses.asdict(self)

    def step_options(self) -> StepOptions:
        return StepOptions(policy=self.policy, attention=self.attention, ce_chunk=self.ce_chunk,
                           mlp_rows=self.mlp_rows,
                           checkpoints=self.checkpoints, scratch_dir=self.scratch_dir or self.out)

    def validate(self):
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one of --task NAME or --data FILE.jsonl")
        for name in ("seq", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        self.step_options()
        check_frozen_dtype(self.method, self.frozen_dtype)


class NonFiniteLoss(FloatingPointError):
    pass


def learning_rate(opts: TrainOptions, step: int) -> float:
    """Linear warmup over `warmup` steps, then cosine down to lr * min_lr_ratio."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    span = max(1, opts.steps - opts.warmup)
    progress = min(1.0, (step - opts.warmup) / span)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------ model and data

def load_base(path: str, frozen_dtype: str | None = None, dtype=np.float32,
              expand: bool = False):
    """(Model, Tokenizer) from an HF folder or a GGUF file; frozen_dtype names how the
    weight matrices are held (minilars.frozen); expand=True holds them all in `dtype`."""
    cfg, params, tok = load_params(path, dtype=dtype, frozen_dtype=frozen_dtype, expand=expand)
    return Model(cfg, params, dtype=dtype), tok


def training_rows(opts: TrainOptions) -> list[dict]:
    if opts.data:
        rows = read_jsonl(opts.data)
    else:
        rows = load_task(opts.task, "train", opts.data_dir)
    if opts.max_examples is not None and len(rows) > opts.max_examples:
        keep = np.random.default_rng([opts.seed, 7]).permutation(len(rows))[: opts.max_examples]
        rows = [rows[i] for i in sorted(keep)]
    return rows


def eval_rows(opts: TrainOptions) -> list[dict]:
    """Held-out rows for the periodic loss: the task's evaluation split, or the tail of
    the data file (which is then not trained on)."""
    if opts.task:
        rows = load_task(opts.task, eval_split(opts.task, opts.data_dir), opts.data_dir)
        return rows[: opts.eval_examples]
    return []


def attach_method(model: Model, opts: TrainOptions) -> None:
    if opts.method == "full":
        model.train_all()
    else:
        attach(model, opts.adapter, seed=opts.seed)


# ------------------------------------------------------------------ checkpoints

def save_checkpoint(run_dir: str, model: Model, opt: AdamW, step: int, losses: list) -> None:
    """Replace RUN_DIR/checkpoint as a whole: an interrupted save leaves the old one."""
    with atomic_dir(os.path.join(run_dir, "checkpoint"), replace=True) as tmp:
        if model.adapter is not None:
            save_adapter(tmp, model)
        else:
            save_model(tmp, model.cfg, model.params)
        state = opt.state_dict()
        save_safetensors_atomic(os.path.join(tmp, "optimizer.safetensors"), state["arrays"])
        write_json(os.path.join(tmp, "state.json"),
                   {"step": step, "adamw_step_count": state["step_count"], "losses": losses})


def load_checkpoint(run_dir: str, model: Model, opt: AdamW) -> dict:
    ckpt = os.path.join(run_dir, "checkpoint")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"{run_dir}: no checkpoint/ folder to resume from")
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    if model.adapter is not None:
        tensors = load_safetensors(os.path.join(ckpt, "adapter_model.safetensors"))
        for name in adapter_tensor_names(model):        # frozen ones (LARS alpha) too
            model.params[name] = tensors[PREFIX + name].copy()
    else:
        tensors = load_safetensors(os.path.join(ckpt, "model.safetensors"))
        for name in model.params:
            model.params[name] = tensors[name].copy()
    opt.load_state_dict({"arrays": load_safetensors(os.path.join(ckpt, "optimizer.safetensors")),
                         "step_count": state["adamw_step_count"]})
    return state


def load_trained(model_folder: str, run_dir: str):
    """(Model, Tokenizer): the base model with a run's last checkpoint applied (its
    adapter, or all weights after full fine-tuning)."""
    ckpt = os.path.join(run_dir, "checkpoint")
    model, tok = load_base(model_folder)
    if os.path.exists(os.path.join(ckpt, "adapter_config.json")):
        load_adapter(ckpt, model)
    else:
        model.params = load_model(ckpt)[1]
    return model, tok


# ------------------------------------------------------------------ the loop

@dataclass
class _Run:
    """What a training run holds between steps."""
    opts: TrainOptions
    model: Model
    step_opts: StepOptions
    examples: list
    held_out: list
    pad_id: int
    ledger: Ledger
    grads: dict
    opt: AdamW
    start: int = 0
    losses: list = field(default_factory=list)
    last_saved: int = 0


def _open_run(opts: TrainOptions, resume: bool, log) -> _Run:
    """Load the model and data, attach the method, build gradients and the optimizer, and
    start RUN_DIR (or continue it from its checkpoint)."""
    model, tok = load_base(opts.model, frozen_dtype=opts.frozen_dtype,
                           expand=opts.method == "full")
    attach_method(model, opts)
    examples = encode_rows(tok, training_rows(opts), opts.seq)
    if not examples:
        raise ValueError("no training examples after tokenization")
    ledger = Ledger()
    register_params(model, ledger)
    grads = zero_grads(model, ledger)
    run = _Run(opts, model, opts.step_options(), examples,
               encode_rows(tok, eval_rows(opts), opts.seq),
               tok.eos_id if tok.eos_id is not None else 0, ledger, grads,
               AdamW(lr=opts.lr, weight_decay=opts.weight_decay))
    if resume:
        state = load_checkpoint(opts.out, model, run.opt)
        run.start = run.last_saved = state["step"]
        run.losses = state["losses"]
        log(f"resuming {opts.out} at step {run.start}")
        _truncate_log(opts.out, run.start)
    else:
        os.makedirs(opts.out, exist_ok=True)
        write_json(os.path.join(opts.out, "run.json"), opts.to_json())
    run.opt.init_state(model.params, grads, ledger)
    return run


def _train_step(run: _Run, step: int) -> dict:
    """One step: forward + backward, clip, AdamW. Returns the step's log record; a NaN or
    Inf loss or gradient stops the run before the parameters change."""
    opts, grads = run.opts, run.grads
    idx = batch_indices(len(run.examples), opts.batch, step, opts.seed)
    tokens, targets = make_batch([run.examples[i] for i in idx], run.pad_id)
    for g in grads.values():
        g.fill(0)
    run.ledger.reset_peak()
    lr = learning_rate(opts, step)
    t0 = time.perf_counter()
    try:
        loss = forward_backward(run.model, tokens, targets, grads, run.step_opts, run.ledger,
                                dropout_key=(opts.seed, step))
    except FloatingPointError:
        loss = float("nan")
    norm = clip_grad_norm(grads, opts.clip) if math.isfinite(loss) else float("nan")
    if not (math.isfinite(loss) and math.isfinite(norm)):
        what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {norm}"
        raise NonFiniteLoss(
            f"step {step + 1}: {what}; stopping. The last good checkpoint (step {run.last_saved}) "
            f"in {opts.out}/checkpoint is intact; lower --lr or check the data and "
            f"resume with --resume {opts.out}")
    run.opt.step(run.model.params, grads, lr=lr)
    seconds = time.perf_counter() - t0
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
            "tokens": int(tokens.size), "tok_per_s": tokens.size / seconds,
            "ledger_peak_mib": mib(run.ledger.peak_total), "rss_peak_mib": mib(peak_rss_bytes())}


def train(opts: TrainOptions, resume: bool = False, log=print) -> dict:
    """Run (or continue) a training run; returns a summary dict."""
    opts.validate()
    if opts.threads:
        set_threads(opts.threads)
    run = _open_run(opts, resume, log)
    model = run.model
    report = trainable_report(model) if model.adapter is not None else {
        "trainable": model.base_param_count(), "base": model.base_param_count(), "percent": 100.0}
    log(f"{opts.method}: {report['trainable']:,} trainable parameters "
        f"({report['percent']:.3f}% of {report['base']:,}); {len(run.examples)} training examples")
    t_run, tokens_seen = time.perf_counter(), 0
    for step in range(run.start, opts.steps):
        record = _train_step(run, step)
        tokens_seen += record.pop("tokens")
        run.losses.append(record["loss"])
        _append_log(opts.out, record)
        log(f"step {step + 1} | loss {record['loss']:.4f} | {record['tok_per_s']:.0f} tok/s | "
            f"ledger peak {record['ledger_peak_mib']:.0f} MiB | RSS peak {record['rss_peak_mib']:.0f} MiB"
            + _bar(step + 1, opts.steps))
        if opts.eval_every and (step + 1) % opts.eval_every == 0 and run.held_out:
            log(f"  eval loss {held_out_loss(model, run.held_out, run.pad_id, run.step_opts):.4f}")
        if (step + 1) % opts.save_every == 0 or step + 1 == opts.steps:
            save_checkpoint(opts.out, model, run.opt, step + 1, run.losses)
            run.last_saved = step + 1
    summary = {"steps": opts.steps, "final_loss": run.losses[-1] if run.losses else None,
               "losses": run.losses, "seconds": time.perf_counter() - t_run,
               "tokens": tokens_seen, "trainable": report,
               "ledger_peak_mib": mib(run.ledger.peak_total), "rss_peak_mib": mib(peak_rss_bytes())}
    if run.held_out:
        summary["eval_loss"] = held_out_loss(model, run.held_out, run.pad_id, run.step_opts)
        log(f"eval loss {summary['eval_loss']:.4f}")
    write_json(os.path.join(opts.out, "summary.json"), summary)
    return summary


def held_out_loss(model: Model, examples, pad_id: int, opts: StepOptions, batch: int = 4) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        tokens, targets = make_batch(examples[i:i + batch], pad_id)
        loss, n = forward_loss(model, tokens, targets, opts)
        total += loss * n
        count += n
    return total / max(count, 1)


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / total)
    return f" | [{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _append_log(run_dir: str, record: dict) -> None:
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(run_dir: str, step: int) -> None:
    """Drop log lines after the checkpoint we resume from (they will be redone)."""
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
        write_text(path, "".join(lines))
