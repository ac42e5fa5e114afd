"""Fine-tuning: the training step and the loop around it.

One step: forward + backward (model.forward_backward) -> clip the gradient norm -> AdamW.
The loop adds what a run needs: seeded data order, a warmup+cosine learning rate, a step
line with loss, tokens/s and memory, periodic evaluation, crash-proof checkpoints, an exact
--resume (whose allowed changes are recorded), and a clean stop on a non-finite loss,
gradient or parameter that leaves the last checkpoint, always finite, to resume from.

The run folder (minilars.runs: one writer, versioned checkpoints, a log cut back on resume):
RUN_DIR/
  run.json                 the options, and each resume's changes to them
  log.jsonl                one line per step (loss, lr, tok/s, memory)
  checkpoints/step-N/      the newest complete state:
    adapter_config.json, adapter_model.safetensors    (adapters; PEFT layout)
    model.safetensors + config.json                   (full fine-tuning)
    optimizer.safetensors, state.json
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from minilars.adapters import (ADAPTERS, METHODS, adapter_tensor_names, attach,
                               trainable_report)
from minilars.config import read_json_file
from minilars.data.tasks import eval_split, load_task
from minilars.examples import batch_indices, encode_rows, make_batch, read_jsonl
from minilars.frozen import check_frozen_dtype
from minilars.io.atomic import write_json
from minilars.io.peft import PREFIX, load_adapter, save_adapter
from minilars.io.safetensors_io import (CheckpointError, load_model, load_safetensors,
                                        save_model, save_safetensors_atomic)
from minilars.io.load import load_params
from minilars.memory import Ledger, mib, peak_rss_bytes, register_params
from minilars.model import Model, StepOptions, forward_backward, forward_loss, zero_grads
from minilars.ops.loss import DEFAULT_CHUNK
from minilars.optim import AdamW, clip_grad_norm
from minilars.params import non_finite
from minilars.runs import (RunError, append_log, clean_leftovers, holds_a_run, latest_checkpoint,
                           read_run_json, run_lock, save_checkpoint_folder, truncate_log,
                           write_run_json)
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
    resumes: list = field(default_factory=list)   # each --resume: its step and changed options
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
        """Refuse settings that cannot make a sensible run, naming the option."""
        if (self.task is None) == (self.data is None):
            raise ValueError("give exactly one of --task NAME or --data FILE.jsonl")
        least = {"seq": 1, "steps": 1, "batch": 1, "save_every": 1, "ce_chunk": 1,
                 "warmup": 0, "eval_every": 0, "eval_examples": 0, "mlp_rows": 0, "threads": 0}
        for name, low in least.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= {low}, "
                                 f"got {value!r}")
        if self.max_examples is not None and (not isinstance(self.max_examples, int)
                                              or self.max_examples < 1):
            raise ValueError(f"--max-examples must be a whole number >= 1, got {self.max_examples!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        for name, text in (("clip", "0 turns clipping off"), ("weight_decay", "0 is none")):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0 "
                                 f"({text}), got {value}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.step_options()
        check_frozen_dtype(self.method, self.frozen_dtype)


class NonFiniteLoss(FloatingPointError):
    """A step made a loss, gradient or parameter that is not finite; nothing was saved."""


# What a --resume may change: how long and how fast the run learns, how often it saves and
# evaluates, and how each step is computed (memory settings, threads). The model, the
# method and its adapter, the data and its order (seq, batch, seed) are the run's own.
RESUME_MAY_CHANGE = ("steps", "lr", "warmup", "clip", "weight_decay", "save_every",
                     "eval_every", "eval_examples", "policy", "attention", "checkpoints",
                     "scratch_dir", "mlp_rows", "ce_chunk", "threads")
PATH_OPTIONS = ("model", "data", "data_dir", "scratch_dir")


def run_options(run_dir: str) -> TrainOptions:
    """The options run.json of run_dir records (a damaged file names itself)."""
    saved = read_run_json(run_dir)
    try:
        opts = TrainOptions(**saved)
    except (TypeError, ValueError) as e:
        raise RunError(f"{os.path.join(run_dir, 'run.json')}: not the options of a minilars "
                       f"run ({e})") from None
    opts.out = run_dir
    return opts


def changes_on_resume(run: TrainOptions, opts: TrainOptions) -> dict:
    """{option: [the run's, opts's]} of the options that differ, all of RESUME_MAY_CHANGE;
    any other difference is refused (RunError naming each)."""
    def same(name):
        old, new = getattr(run, name), getattr(opts, name)
        if name in PATH_OPTIONS and old is not None and new is not None:
            return os.path.abspath(old) == os.path.abspath(new)
        return old == new

    names = [f.name for f in dataclasses.fields(TrainOptions) if f.name not in ("out", "resumes")]
    fixed = [f"--{k.replace('_', '-')} {getattr(opts, k)!r} (the run has {getattr(run, k)!r})"
             for k in names if k not in RESUME_MAY_CHANGE and not same(k)]
    if fixed:
        raise RunError(f"--resume {run.out}: these cannot change on resume: "
                       f"{'; '.join(fixed)}. Start a new run (another --out) to change them")
    return {k: [getattr(run, k), getattr(opts, k)] for k in names if not same(k)}


def resume_options(run_dir: str, asked: dict) -> TrainOptions:
    """The options of the run in run_dir with `asked` ({option: value}, e.g. those given on
    the command line) applied; refuses (RunError) any that may not change on resume."""
    run = run_options(run_dir)
    opts = replace(run, **asked)
    changes_on_resume(run, opts)
    return opts


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

def save_checkpoint(run_dir: str, model: Model, opt: AdamW, step: int, losses: list) -> str:
    """Write checkpoints/step-N (minilars.runs: whole or not at all, older ones deleted
    after). Refuses to write a non-finite parameter or optimizer moment. Returns the folder."""
    state = opt.state_dict()
    trained = ({n: model.params[n] for n in adapter_tensor_names(model)}
               if model.adapter is not None else model.params)
    bad = non_finite(trained) + non_finite(state["arrays"])
    if bad:
        raise NonFiniteLoss(f"step {step}: {len(bad)} tensor(s) are not finite ({', '.join(bad[:3])}"
                            f"{' ...' if len(bad) > 3 else ''}); no checkpoint written")

    def write_files(tmp: str) -> None:
        if model.adapter is not None:
            save_adapter(tmp, model)
        else:
            save_model(tmp, model.cfg, model.params)
        save_safetensors_atomic(os.path.join(tmp, "optimizer.safetensors"), state["arrays"])
        write_json(os.path.join(tmp, "state.json"),
                   {"step": step, "adamw_step_count": state["step_count"], "losses": losses})

    return save_checkpoint_folder(run_dir, step, write_files)


def load_checkpoint(ckpt: str, model: Model, opt: AdamW) -> dict:
    """Put a checkpoint folder's tensors into the model and optimizer; returns its state.
    A damaged or non-finite checkpoint raises CheckpointError naming the file."""
    path = os.path.join(ckpt, "state.json")
    state = read_json_file(path, CheckpointError, missing="missing (not a complete checkpoint)")
    try:
        step, count = int(state["step"]), int(state["adamw_step_count"])
        losses = [float(v) for v in state["losses"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: expected JSON with step, adamw_step_count and losses "
                              f"({type(e).__name__}: {e})") from None
    weights = "adapter_model.safetensors" if model.adapter is not None else "model.safetensors"
    tensors = load_safetensors(os.path.join(ckpt, weights))
    names = adapter_tensor_names(model) if model.adapter is not None else list(model.params)
    key = (lambda n: PREFIX + n) if model.adapter is not None else (lambda n: n)
    missing = [n for n in names if key(n) not in tensors]
    if missing:
        raise CheckpointError(f"{os.path.join(ckpt, weights)}: no tensor {key(missing[0])!r} "
                              f"({len(missing)} missing; a checkpoint of another run?)")
    arrays = load_safetensors(os.path.join(ckpt, "optimizer.safetensors"))
    bad = non_finite({key(n): tensors[key(n)] for n in names}) + non_finite(arrays)
    if bad:
        raise CheckpointError(f"{ckpt}: {len(bad)} tensor(s) are not finite ({', '.join(bad[:3])}); "
                              "this checkpoint cannot be resumed")
    for name in names:                                   # frozen ones (LARS alpha) too
        model.params[name] = tensors[key(name)].copy()
    opt.load_state_dict({"arrays": arrays, "step_count": count})
    return {"step": step, "losses": losses}


def load_trained(model_folder: str, run_dir: str):
    """(Model, Tokenizer): the base model with a run's last checkpoint applied (its
    adapter, or all weights after full fine-tuning)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise RunError(f"{run_dir}: no checkpoint yet")
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
    checkpoint: str | None = None          # the newest checkpoint folder (always finite)


def _open_run(opts: TrainOptions, resume: bool, log) -> _Run:
    """Load the model and data, attach the method, build gradients and the optimizer, and
    start RUN_DIR (or continue it from its newest checkpoint, recording in run.json what
    opts change of its options)."""
    if not resume:
        if holds_a_run(opts.out):
            raise RunError(f"{opts.out} already holds a run; continue it with --resume "
                           f"{opts.out} or choose another --out")
        clean_leftovers(opts.out, keep=None)    # what a start killed before run.json left
    model, tok = load_base(opts.model, frozen_dtype=opts.frozen_dtype,
                           expand=opts.method == "full")
    if opts.seq > model.cfg.max_position_embeddings:
        raise ValueError(f"--seq {opts.seq} is longer than the model's max_position_embeddings "
                         f"({model.cfg.max_position_embeddings})")
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
        changes = changes_on_resume(run_options(opts.out), opts)
        run.checkpoint = latest_checkpoint(opts.out)
        for path in clean_leftovers(opts.out, keep=run.checkpoint):
            log(f"removed {path} (left by an interrupted save)")
        if run.checkpoint is not None:
            state = load_checkpoint(run.checkpoint, model, run.opt)
            run.start, run.losses = state["step"], state["losses"]
            log(f"resuming {opts.out} at step {run.start} ({run.checkpoint})")
        else:
            log(f"resuming {opts.out}: no checkpoint was written, so from step 0")
        dropped = truncate_log(opts.out, run.start)
        if dropped:
            log(f"log.jsonl: dropped {dropped} line(s) after step {run.start} (they are redone)")
        if changes:
            log("changed on resume: " + ", ".join(f"{k} {old!r} -> {new!r}"
                                                  for k, (old, new) in changes.items()))
        opts.resumes.append({"step": run.start, "changed": changes,
                             "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_run_json(opts.out, opts.to_json())
    run.opt.init_state(model.params, grads, ledger)
    return run


def _stop_message(run: _Run, step: int, what: str) -> str:
    where = (f"The last checkpoint, step {_step_of(run)} in {run.checkpoint}, is finite"
             if run.checkpoint else "No checkpoint was written yet; --resume starts from step 0")
    return (f"step {step + 1}: {what}; stopping before anything is saved. {where}. Resume "
            f"with a lower learning rate (this run's --lr is {run.opts.lr:g}): "
            f"--resume {run.opts.out} --lr SMALLER (or check the data)")


def _step_of(run: _Run) -> int:
    return int(os.path.basename(run.checkpoint).split("-")[-1]) if run.checkpoint else 0


def _train_step(run: _Run, step: int) -> dict:
    """One step: forward + backward, clip, AdamW. Returns the step's log record. A
    non-finite loss or gradient stops the run before the parameters change, a non-finite
    updated parameter before anything is saved (NonFiniteLoss)."""
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
        raise NonFiniteLoss(_stop_message(run, step, what))
    with np.errstate(over="ignore", invalid="ignore"):     # checked right below, by name
        run.opt.step(run.model.params, grads, lr=lr)
    bad = non_finite({name: run.model.params[name] for name in grads})
    if bad:
        raise NonFiniteLoss(_stop_message(
            run, step, f"the update at lr {lr:g} made {len(bad)} parameter(s) non-finite "
                       f"({', '.join(bad[:3])})"))
    seconds = time.perf_counter() - t0
    return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
            "tokens": int(tokens.size), "tok_per_s": tokens.size / seconds,
            "ledger_peak_mib": mib(run.ledger.peak_total), "rss_peak_mib": mib(peak_rss_bytes())}


def train(opts: TrainOptions, resume: bool = False, log=print) -> dict:
    """Run (or continue: resume=True, with opts from resume_options) a training run in
    opts.out, holding its lock throughout; returns a summary dict."""
    opts.validate()
    if opts.threads:
        set_threads(opts.threads)
    with run_lock(opts.out):
        return _train_locked(opts, resume, log)


def _train_locked(opts: TrainOptions, resume: bool, log) -> dict:
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
        try:
            append_log(opts.out, record)
        except OSError as e:
            raise _write_failed(run, e, f"writing the log line of step {step + 1}") from None
        log(f"step {step + 1} | loss {record['loss']:.4f} | {record['tok_per_s']:.0f} tok/s | "
            f"ledger peak {record['ledger_peak_mib']:.0f} MiB | RSS peak {record['rss_peak_mib']:.0f} MiB"
            + _bar(step + 1, opts.steps))
        if opts.eval_every and (step + 1) % opts.eval_every == 0 and run.held_out:
            log(f"  eval loss {held_out_loss(model, run.held_out, run.pad_id, run.step_opts):.4f}")
        if (step + 1) % opts.save_every == 0 or step + 1 == opts.steps:
            run.checkpoint = _save(run, step + 1)
    summary = {"steps": opts.steps, "final_loss": run.losses[-1] if run.losses else None,
               "losses": run.losses, "seconds": time.perf_counter() - t_run,
               "tokens": tokens_seen, "trainable": report,
               "ledger_peak_mib": mib(run.ledger.peak_total), "rss_peak_mib": mib(peak_rss_bytes())}
    if run.held_out:
        summary["eval_loss"] = held_out_loss(model, run.held_out, run.pad_id, run.step_opts)
        log(f"eval loss {summary['eval_loss']:.4f}")
    write_json(os.path.join(opts.out, "summary.json"), summary)
    return summary


def _save(run: _Run, step: int) -> str:
    try:
        return save_checkpoint(run.opts.out, run.model, run.opt, step, run.losses)
    except OSError as e:
        raise _write_failed(run, e, f"saving the checkpoint of step {step}") from None


def _write_failed(run: _Run, e: OSError, doing: str) -> OSError:
    """The error of a failed write (a full disk): what failed, which file, and that the
    last checkpoint is intact."""
    kept = (f"the checkpoint of step {_step_of(run)} ({run.checkpoint}) is intact"
            if run.checkpoint else "no checkpoint was written before it")
    where = f" ({e.filename})" if e.filename else ""
    return OSError(e.errno, f"{doing} failed: {e.strerror}{where}; {kept}; free space, "
                            f"then --resume {run.opts.out}")


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
