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

from dataclasses import dataclass, field

import numpy as np

from minilars import quant
from minilars.adapters import adapter_for, adapter_sites
from minilars.checkpoints import checkpoint_keep
from minilars.config import ModelConfig
from minilars.frozen import parse_frozen_dtype
from minilars.memory import CATEGORIES, RESIDENT
from minilars.model import Model, StepOptions, block_saved, lowest_trainable_layer, step_saved
from minilars.params import linear_module, linear_shapes, param_shapes


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
    ("release", layer, op) and ("release_layer", layer)."""
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
    for op, name in (("final_norm", "x"), ("final_norm", "rstd"), ("loss", "dx")):
        yield "keep", -1, outer[(op, name)]
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
        elif event[0] == "release":
            _, layer, op = event
            for key in [k for k in ledger.entries if k[0] == layer and k[1] == op]:
                ledger.release(key)
        else:
            for key in [k for k in ledger.entries if k[0] == event[1]]:
                ledger.release(key)
    return ledger
