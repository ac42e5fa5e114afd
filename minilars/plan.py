"""Memory you can predict: a training step's ledger peak from shapes alone.

The planner allocates nothing. It reads the declarations the real step is held to
(model.block_saved, model.step_saved, checkpoints.checkpoint_keep: every saved tensor with
its shape, dtype and buffer) and the parameters' storage (frozen forms, adapter shapes),
and replays the step's keeps and releases in the step's order through the ledger's own
rule: a buffer counts once, and the peak is taken each time a new buffer is kept. So the
predicted ledger peak equals the measured one to the byte (tests/test_plan.py checks a
grid of configurations), and a change to what an op keeps changes the plan with it.

The order of a step (model.forward_backward), which the replay follows:
    rope tables; forward: each block from the lowest trainable one keeps its declared
    set (policy none) or its input in the checkpoint store (policy layer); the final
    norm and the loss gradient, released when the backward starts; backward, top block
    first: (policy layer) the block's input taken back and the block recomputed, keeping
    its declared set; then its backward releases all of it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from minilars import kernels, quant
from minilars.adapters import adapter_for, adapter_sites, attach
from minilars.checkpoints import checkpoint_keep
from minilars.config import ModelConfig, named_config
from minilars.frozen import parse_frozen_dtype
from minilars.memory import CATEGORIES, RESIDENT, current_rss_bytes, mib
from minilars.model import (Model, StepOptions, attention_backward_workspace, block_saved,
                            forward_backward, lowest_trainable_layer, mlp_rows_saved,
                            mlp_saved, next_token_targets, step_saved, zero_grads)
from minilars.ops.linear import linear_backward_workspace
from minilars.ops.loss import loss_workspace
from minilars.ops.mlp import swiglu_workspace
from minilars.ops.rmsnorm import rmsnorm_backward_workspace
from minilars.params import linear_module, linear_shapes, param_shapes
from minilars.saved import declared_bytes


def frozen_bytes(shape: tuple, form: str | None, dtype) -> int:
    """Bytes of a frozen matrix of `shape` held in `form` (None: the compute dtype)."""
    n = int(np.prod(shape))
    if form is None:
        return n * np.dtype(dtype).itemsize
    if form in ("float16", "bfloat16"):
        return 2 * n
    return shape[0] * quant.row_bytes(form, shape[1])


def plan_model(cfg: ModelConfig, method: str, adapter=None, dtype=np.float32,
               frozen_dtype: str | None = None, stored: dict | None = None, layers=None):
    """(a Model without arrays, {parameter name: (category, bytes)}): the structure a step
    reads (trainable set, adapter, adapted linears) and what every parameter costs.
    stored: {name: form} of a GGUF file's matrices as stored (load_gguf keeps them), used
    where frozen_dtype does not say otherwise."""
    parse_frozen_dtype(frozen_dtype)
    model = Model(cfg, {}, dtype=dtype)
    sizes = {}
    if method == "full":
        model.trainable = set(param_shapes(cfg))
    else:
        adapter = adapter if adapter is not None else adapter_for(method)
        model.adapter, model.adapted = adapter, tuple(adapter_sites(cfg, adapter, layers))
        shapes = linear_shapes(cfg)
        for i, linear in model.adapted:
            out_f, in_f = shapes[linear]
            for suffix, shape in adapter.shapes(linear, out_f, in_f).items():
                name = f"{linear_module(i, linear)}.{suffix}"
                trains = adapter.trains(suffix)
                if trains:
                    model.trainable.add(name)
                sizes[name] = ("trainable" if trains else "frozen",
                               int(np.prod(shape)) * np.dtype(dtype).itemsize)
    for name, shape in param_shapes(cfg).items():
        if name in model.trainable or len(shape) == 1:
            category = "trainable" if name in model.trainable else "frozen"
            sizes[name] = (category, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            form = frozen_dtype if frozen_dtype is not None else (stored or {}).get(name)
            sizes[name] = ("frozen", frozen_bytes(shape, form, dtype))
    return model, sizes


def constant_bytes(model: Model, sizes: dict) -> dict:
    """Bytes by category before the step: parameters, their gradients and AdamW's m and v
    (both allocated at the first step, as measure_lengths and train do)."""
    live = dict.fromkeys(CATEGORIES, 0)
    for name, (category, nbytes) in sizes.items():
        live[category] += nbytes
    trained = sum(nbytes for name, (_, nbytes) in sizes.items() if name in model.trainable)
    live["gradients"] += trained
    live["optimizer"] += 2 * trained
    return live


def step_events(model: Model, B: int, T: int, opts: StepOptions):
    """The step's keeps and releases in its own order: ("keep", layer, Keep),
    ("release", layer, op) and ("release_layer", layer); and ("mark", moment) where the
    workspace peaks: ("forward", i) (policy layer: block i's forward, which keeps
    nothing, after its input is stored), "loss" (the loss's chunk loop, before its
    gradient is kept), "final_norm" (the final norm's backward, beside that gradient)
    and ("backward", i) (block i's backward starts, its saved set all
    alive)."""
    C, L = model.cfg.hidden_size, model.cfg.num_hidden_layers
    lowest = lowest_trainable_layer(model)
    outer = step_saved(model, B, T, opts)
    yield from (("keep", -1, outer[("rope", n)]) for n in ("cos", "sin"))
    store = checkpoint_keep(opts.checkpoints, (B, T, C), model.dtype)
    for i in range(lowest, L):
        if opts.policy == "none":
            yield from (("keep", i, k) for k in block_saved(model, i, B, T, opts).values())
        else:
            yield "keep", i, store
            yield "mark", ("forward", i)
    for op, name in (("final_norm", "x"), ("final_norm", "rstd")):
        yield "keep", -1, outer[(op, name)]
    yield "mark", "loss"
    yield "keep", -1, outer[("loss", "dx")]
    yield "mark", "final_norm"
    yield "release", -1, "final_norm"
    yield "release", -1, "loss"
    for i in reversed(range(lowest, L)):
        if opts.policy == "layer":
            if opts.checkpoints == "disk" and i == L - 1:
                yield "keep", -1, outer[("checkpoint", "read_buffer")]
            if opts.checkpoints == "bf16":
                yield "release", i, "checkpoint"
            yield from (("keep", i, k) for k in block_saved(model, i, B, T, opts).values())
            yield "release", i, "checkpoint"
        yield "mark", ("backward", i)
        if opts.mlp_rows:
            for r0 in range(0, B * T, opts.mlp_rows):
                n = min(opts.mlp_rows, B * T - r0)
                yield from (("keep", i, k) for k in mlp_rows_saved(model, i, n).values())
                yield "mark", ("rows", i, n)
                for op in ("down_proj", "swiglu", "gate_proj", "up_proj", "mlp_norm"):
                    yield "release", i, op
            yield "release", i, "mlp_rows"
        yield "release_layer", i
    yield "release", -1, "checkpoint"
    yield "release", -1, "rope"


@dataclass
class Replay:
    """The ledger's arithmetic over declared tensors: live bytes per category, a buffer
    counted once however many names keep it, the peak taken at each new buffer."""
    live: dict
    entries: dict = field(default_factory=dict)      # (layer, op, name) -> buffer key
    buffers: dict = field(default_factory=dict)      # buffer key -> [refcount, category, bytes]
    peak_total: int = 0
    peak_by_category: dict = None
    peak_moment: tuple = None
    max_by_category: dict = None
    marks: dict = field(default_factory=dict)        # moment -> resident bytes live then

    def __post_init__(self):
        self.peak_by_category = dict(self.live)
        self.max_by_category = dict(self.live)
        self._update_peak(None)

    def keep(self, layer: int, keep, buffer_key) -> None:
        self.entries[(layer, keep.op, keep.name)] = buffer_key
        if buffer_key in self.buffers:
            self.buffers[buffer_key][0] += 1
            return
        self.buffers[buffer_key] = [1, keep.category, keep.nbytes]
        self.live[keep.category] += keep.nbytes
        self._update_peak((layer, keep.op, keep.name))

    def release(self, key) -> None:
        slot = self.buffers[self.entries.pop(key)]
        slot[0] -= 1
        if slot[0] == 0:
            self.buffers = {k: v for k, v in self.buffers.items() if v is not slot}
            self.live[slot[1]] -= slot[2]

    def _update_peak(self, moment) -> None:
        for c, v in self.live.items():
            self.max_by_category[c] = max(self.max_by_category[c], v)
        total = sum(self.live[c] for c in RESIDENT)
        if total > self.peak_total:
            self.peak_total, self.peak_by_category = total, dict(self.live)
            self.peak_moment = moment


def _buffer_key(layer: int, keep, opts: StepOptions):
    """Which memory a declared tensor is in. Buffers are named per layer; the disk
    store's read buffer (layer -1) is every recomputed block's input."""
    if keep.category == "disk":
        return ("disk", layer, keep.op, keep.name)
    if opts.policy == "layer" and opts.checkpoints == "disk" and keep.buffer == "h_in":
        return (-1, "h_in")
    return (layer, keep.buffer)


def replay_step(model: Model, sizes: dict, B: int, T: int, opts: StepOptions) -> Replay:
    """The ledger of one step of `model` at batch B and length T, from declarations."""
    ledger = Replay(constant_bytes(model, sizes))
    for event in step_events(model, B, T, opts):
        if event[0] == "keep":
            _, layer, keep = event
            ledger.keep(layer, keep, _buffer_key(layer, keep, opts))
        elif event[0] == "mark":
            ledger.marks[event[1]] = sum(ledger.live[c] for c in RESIDENT)
        elif event[0] == "release":
            _, layer, op = event
            for key in [k for k in ledger.entries if k[0] == layer and k[1] == op]:
                ledger.release(key)
        else:
            for key in [k for k in ledger.entries if k[0] == event[1]]:
                ledger.release(key)
    return ledger


def _down_proj_workspace(model: Model, i: int, rows: int) -> int:
    """What block i's down_proj backward allocates: its adapter's, or dx (and dW)."""
    C, F = model.cfg.hidden_size, model.cfg.intermediate_size
    if (i, "down_proj") in model.adapted:
        return model.adapter.backward_workspace("down_proj", (rows, F), C, model.dtype)
    need_dW = linear_module(i, "down_proj") + ".weight" in model.trainable
    return linear_backward_workspace(rows, F, C, np.dtype(model.dtype).itemsize, need_dW)


def workspace_peak(model: Model, sizes: dict, B: int, T: int, opts: StepOptions,
                   replay: Replay) -> tuple[int, str]:
    """(traced peak, where): what the step holds beyond its named tensors where that is
    largest, added to what the ledger holds then. In a forward that keeps nothing (policy
    layer): the block's input, h_mid, the MLP's output and its intermediates (for mlp_rows
    rows, else all). At the loss: the normed hidden state, one (chunk, V) block of logits
    and the loss's gradient; beside either, the dequantized tile of a narrow frozen W
    (kernels.tile_bytes). Then the final norm's backward, beside the loss's gradient
    (rmsnorm_backward_workspace). In a block's backward, with its
    saved set alive: the incoming gradient, down_proj's backward (dx, or an adapter's dx~
    and dx), then SwiGLU's (dact, now dg, and du); then the attention half's (dh_mid and
    attention_backward_workspace). With mlp_rows, the MLP's for one row block, beside the
    whole dh_out and dh_mid."""
    cfg, item = model.cfg, np.dtype(model.dtype).itemsize
    N, C, F, V = B * T, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    tile = max((kernels.tile_bytes(*shape) for (cat, nbytes), shape in _matrix_sizes(model, sizes)
                if cat == "frozen" and nbytes < int(np.prod(shape)) * item), default=0)
    moments = {"loss": replay.marks["loss"] + N * C * item + tile
                       + loss_workspace(N, V, C, opts.ce_chunk, item),
               "final norm backward": replay.marks["final_norm"]
                                      + rmsnorm_backward_workspace(N, C, item)}
    for mark, live in replay.marks.items():
        if mark in ("loss", "final_norm"):
            continue
        if mark[0] == "forward":                    # policy layer: an MLP that keeps nothing
            i, rows_ = mark[1], opts.mlp_rows or N
            h_in = 0 if opts.checkpoints == "ram" else N * C * item   # the ram store holds h
            moments[f"layer {i} forward MLP"] = (
                live + h_in + 2 * N * C * item + tile          # h_mid, the MLP's output
                + (2 * rows_ * C + 2 * rows_ * F) * item       # m, down's output; g, u
                + swiglu_workspace(rows_, F, item))            # act and its row blocks
            continue
        if mark[0] == "rows":                       # one row block of an MLP, by rows
            _, i, n = mark
            flowing, rows_, name = 2 * N * C * item + n * C * item, n, f"layer {i} MLP rows"
        elif opts.mlp_rows:                         # the block's attention half, by rows
            i = mark[1]
            moments[f"layer {i} attention backward"] = (
                live - N * C * item + 2 * N * C * item
                + attention_backward_workspace(cfg, B, T, opts, item))
            continue
        else:
            i = mark[1]
            flowing, rows_, name = N * C * item, N, f"layer {i}"
            moments[f"layer {i} attention backward"] = (
                live - declared_bytes(mlp_saved(model, i, (B, T))) + 2 * N * C * item
                + attention_backward_workspace(cfg, B, T, opts, item))
        down_keeps = [k for k in mlp_saved(model, i, (1, rows_)) if k.op == "down_proj"]
        moments[f"{name} down_proj backward"] = (live + flowing + tile
                                                 + _down_proj_workspace(model, i, rows_))
        moments[f"{name} swiglu backward"] = (live - declared_bytes(down_keeps) + flowing
                                              + rows_ * F * item
                                              + swiglu_workspace(rows_, F, item))
    where = max(moments, key=moments.get)
    return max(moments[where], replay.peak_total), where


def _matrix_sizes(model: Model, sizes: dict):
    """((category, bytes), shape) of every 2-D base parameter."""
    for name, shape in param_shapes(model.cfg).items():
        if len(shape) == 2:
            yield sizes[name], shape


_warmed = False


def runtime_baseline_bytes() -> int:
    """The runtime baseline: this process's RSS (VmRSS) once it has run one training step
    of its own, less that step's tensors. A fresh process does not hold what every step
    brings in and keeps: the pages of NumPy's, BLAS's and the C core's code that a step
    executes (about 7 MiB, x86_64) and BLAS's packing buffers, which OpenBLAS allocates
    at its first large products and keeps (about 5.4 MiB on 2 threads). So, once per
    process, one step of the built-in `tiny` model (LARS on Q8_0 weights, recompute to a
    disk store) and one (2048, 1024) x (1024, 256) float32 product (1 GFLOP, 10 MiB for
    that moment; it brings in all but 0.7 MiB of the buffers a 2048-square one does) run
    first. Without them a fresh process's RSS fell 11-12 MiB short of a real step's."""
    global _warmed
    if not _warmed:
        model = attach(Model.random(named_config("tiny"), frozen_dtype="q8_0"), adapter_for("lars"))
        tokens = np.arange(64).reshape(1, 64) % model.cfg.vocab_size
        forward_backward(model, tokens, next_token_targets(tokens), zero_grads(model),
                         StepOptions(policy="layer", checkpoints="disk"))
        tall = np.ones((2048, 1024), dtype=np.float32)
        np.matmul(tall, tall[:1024, :256])
        del model, tall
        _warmed = True
    return current_rss_bytes()


def predict(cfg: ModelConfig, method: str, adapter=None, batch: int = 1, seq: int = 512,
            opts: StepOptions = StepOptions(), dtype=np.float32, frozen_dtype: str | None = None,
            stored: dict | None = None, baseline: int | None = None, slope: bool = True) -> dict:
    """The plan of one training step: the ledger's peak by category and its moment, the
    workspace beside it, the runtime baseline, the predicted peak RSS, and the saved
    bytes per token (the peak's slope in T)."""
    model, sizes = plan_model(cfg, method, adapter, dtype, frozen_dtype, stored)
    replay = replay_step(model, sizes, batch, seq, opts)
    traced, where = workspace_peak(model, sizes, batch, seq, opts, replay)
    longer = replay_step(model, sizes, batch, seq + 64, opts) if slope else replay
    baseline = runtime_baseline_bytes() if baseline is None else baseline
    return {"ledger_peak_bytes": replay.peak_total,
            "peak_by_category": dict(replay.peak_by_category),
            "peak_moment": list(replay.peak_moment) if replay.peak_moment else None,
            "workspace_bytes": traced - replay.peak_total, "workspace_moment": where,
            "baseline_bytes": baseline, "peak_rss_bytes": baseline + traced,
            "saved_bytes_per_token": (longer.peak_total - replay.peak_total) / (64 * batch),
            "trainable_params": sum(nbytes for name, (_, nbytes) in sizes.items()
                                    if name in model.trainable) // np.dtype(dtype).itemsize}


# ---------------------------------------------------------------- budgets

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
          "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3}


def parse_size(text: str) -> int:
    """Bytes of a size such as 400MiB, 400 MiB, 400MB (10^6), 0.4G, 512M (binary), 1e9."""
    raw = str(text).strip()
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = raw[len(raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")):]
    if unit.lower() not in _UNITS:
        raise ValueError(f"size {text!r}: unknown unit {unit!r}; use B, KiB, MiB, GiB (powers of "
                         f"1024, also written K, M, G) or KB, MB, GB (powers of 1000)")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"size {text!r}: {number!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"size {text!r} must be a positive amount")
    return int(value * _UNITS[unit.lower()])


# extra compute of each change, as a factor on the step time, used only to rank settings
# that fit. Measured on SmolLM2-135M, LARS, T=512, 2 cores, with `minilars bench step`
# (README "Planning"): policy layer 2.95 / 2.20 s = 1.34; disk checkpoints 1.04, bf16
# 1.06; frozen float16 1.00, q8_0 1.20, q4_1 1.15. Not measured, estimated: bfloat16 frozen
# (as float16), the MLP by row blocks and each halving of the loss's chunk (a few more,
# smaller matmuls).
MLP_ROWS = 512           # the row block the search tries for the MLP's backward
FROZEN_ORDER = (None, "float16", "bfloat16", "q8_0", "q4_1")
TIME_FACTOR = {"policy layer": 1.34, "checkpoints disk": 1.04, "checkpoints bf16": 1.06,
               "mlp_rows": 1.02,
               "frozen float16": 1.0, "frozen bfloat16": 1.0, "frozen q8_0": 1.2,
               "frozen q4_1": 1.15, "ce_chunk": 1.01}


@dataclass(frozen=True)
class Setting:
    """One way to run: what the budget search may change, and what it costs."""
    policy: str
    checkpoints: str
    frozen_dtype: str | None
    ce_chunk: int
    batch: int
    seq: int
    mlp_rows: int = 0

    def changes(self, start: "Setting") -> list[str]:
        out = []
        for field_, value in self.__dict__.items():
            if value != start.__dict__[field_]:
                out.append(f"--{field_.replace('_', '-')} {value if value is not None else 'float32'}")
        return out

    def time_factor(self, start: "Setting") -> float:
        f = 1.0
        if self.policy != start.policy:
            f *= TIME_FACTOR["policy layer"]
        if self.checkpoints != start.checkpoints:
            f *= TIME_FACTOR[f"checkpoints {self.checkpoints}"]
        if self.mlp_rows != start.mlp_rows:
            f *= TIME_FACTOR["mlp_rows"]
        if self.frozen_dtype != start.frozen_dtype and self.frozen_dtype is not None:
            f *= TIME_FACTOR[f"frozen {self.frozen_dtype}"]
        halvings = int(np.log2(start.ce_chunk / self.ce_chunk)) if self.ce_chunk < start.ce_chunk else 0
        return f * TIME_FACTOR["ce_chunk"] ** halvings


def _candidates(start: Setting, method: str):
    """Every setting the search may try from `start`, batch and length unchanged."""
    policies = [start.policy] + (["layer"] if start.policy == "none" else [])
    frozen = [start.frozen_dtype] if method == "full" else \
        FROZEN_ORDER[FROZEN_ORDER.index(start.frozen_dtype):] if start.frozen_dtype in FROZEN_ORDER \
        else [start.frozen_dtype]
    chunks = [c for c in (start.ce_chunk, 64, 32, 16) if c <= start.ce_chunk]
    for policy, form, chunk in itertools.product(policies, frozen, dict.fromkeys(chunks)):
        stores = ["ram", "disk", "bf16"] if policy == "layer" else ["ram"]
        rows = dict.fromkeys([start.mlp_rows, MLP_ROWS]) if policy == "layer" else [0]
        for store, mlp_rows in itertools.product(stores, rows):
            yield Setting(policy, store, form, chunk, start.batch, start.seq, mlp_rows)


def _cheapest_first(found: list) -> list:
    """Fitting settings by time (bf16 checkpoints, being approximate, after the exact ones
    of nearly the same cost), each kept only if it needs less memory than every cheaper
    one: the list trades time for memory, with nothing dominated."""
    found = sorted(found, key=lambda f: (f[2] + (0.05 if f[0].checkpoints == "bf16" else 0),
                                         f[1]["peak_rss_bytes"]))
    kept, smallest = [], None
    for f in found:
        if smallest is None or f[1]["peak_rss_bytes"] < smallest:
            kept.append(f)
            smallest = f[1]["peak_rss_bytes"]
    return kept


# A setting fits a budget when its planned peak RSS plus this share does: the planner's
# peak RSS ran up to 4.0% below the measured one across `bench plan`'s 72 configurations
# (glibc keeping freed blocks, huge-page rounding), and a budget is a limit, not a target.
BUDGET_MARGIN = 0.05


def budget_need(plan: dict) -> float:
    """The bytes a budget must hold for this plan: its peak RSS with BUDGET_MARGIN on top."""
    return plan["peak_rss_bytes"] * (1 + BUDGET_MARGIN)


def fits_budget(plan: dict, budget: int) -> bool:
    return budget_need(plan) <= budget


def check_budget(budget: int, baseline: int, text: str) -> None:
    """A budget below what the Python process itself takes cannot be met by any setting."""
    if budget < baseline:
        raise ValueError(f"--budget {text} is below this machine's runtime baseline "
                         f"({mib(baseline):.0f} MiB: Python, NumPy, minilars)")


def fitting_settings(cfg: ModelConfig, method: str, adapter, start: Setting, budget: int,
                     base_opts: StepOptions = StepOptions(), dtype=np.float32,
                     stored: dict | None = None, most: int = 5,
                     baseline: int | None = None) -> list[tuple]:
    """[(setting, plan, time factor)] of the cheapest settings that fit `budget` (predicted
    peak RSS + BUDGET_MARGIN), cheapest extra compute first (exact checkpoints before bf16
    at equal cost).
    When none fits at the asked batch and length, halved batches, then halved lengths.
    `baseline` is the runtime's own RSS (runtime_baseline_bytes() unless given)."""
    baseline = runtime_baseline_bytes() if baseline is None else baseline
    tried = [start]
    while True:
        found = []
        for s in _candidates(tried[-1], method):
            opts = replace(base_opts, policy=s.policy, checkpoints=s.checkpoints,
                           ce_chunk=s.ce_chunk, mlp_rows=s.mlp_rows)
            plan = predict(cfg, method, adapter, s.batch, s.seq, opts, dtype, s.frozen_dtype,
                           stored, baseline, slope=False)
            if fits_budget(plan, budget):
                found.append((s, plan, s.time_factor(start)))
        if found:
            return _cheapest_first(found)[:most]
        last = tried[-1]
        if last.batch > 1:
            tried.append(replace(last, batch=last.batch // 2))
        elif last.seq > 64:
            tried.append(replace(last, seq=last.seq // 2))
        else:
            return []


def format_plan(plan: dict, title: str) -> str:
    """The plan as the `minilars plan` table."""
    cats = plan["peak_by_category"]
    moment = plan["peak_moment"]
    where = f"layer {moment[0]} {moment[1]}.{moment[2]}" if moment and moment[0] >= 0 else \
        (f"{moment[1]}.{moment[2]}" if moment else "before the step")
    rows = [("frozen weights", cats["frozen"]), ("trainable", cats["trainable"]),
            ("gradients", cats["gradients"]), ("optimizer", cats["optimizer"]),
            ("saved activations", cats["activations"]),
            ("workspace", plan["workspace_bytes"]), ("runtime baseline", plan["baseline_bytes"])]
    lines = [f"plan: {title}"] + [f"  {name:<20} {mib(n):9.1f} MiB" for name, n in rows]
    lines += [f"  {'predicted peak RSS':<20} {mib(plan['peak_rss_bytes']):9.1f} MiB",
              f"  ledger peak {mib(plan['ledger_peak_bytes']):.1f} MiB at {where}; workspace "
              f"largest at {plan['workspace_moment']}"]
    if cats.get("disk"):
        lines.append(f"  on disk at the peak (checkpoints, not resident): {mib(cats['disk']):.1f} MiB")
    lines.append(f"  saved bytes per token: {plan['saved_bytes_per_token']:,.0f}")
    return "\n".join(lines)


def format_fits(fits: list, start: Setting, budget: int) -> str:
    """The settings that fit a budget, cheapest extra compute first."""
    if not fits:
        return (f"budget {mib(budget):.0f} MiB: nothing fits, not even at batch 1 and T=64 with "
                f"every memory setting; the smallest model state alone is larger")
    lines = [f"budget {mib(budget):.0f} MiB: settings that fit (predicted peak RSS + "
             f"{100 * BUDGET_MARGIN:.0f}%), cheapest extra compute first"]
    for s, plan, factor in fits:
        changes = " ".join(s.changes(start)) or "(as asked)"
        approx = "  (bf16 checkpoints: gradients approximate)" if s.checkpoints == "bf16" else ""
        lines.append(f"  {mib(plan['peak_rss_bytes']):7.1f} MiB  ~{factor:.2f}x time  {changes}{approx}")
    return "\n".join(lines)
