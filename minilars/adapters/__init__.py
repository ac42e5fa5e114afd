"""Adapters on frozen linears, and the one small interface through which the rest of
minilars reaches them.

    attach(model, LARS(rank=8))          freeze the base, put LARS on its target linears
    ADAPTERS["lars"]                     the class behind a method name (the CLI's table)

Each adapter is one module (lora.py, ia3.py, lars.py) holding one dataclass: its settings
with their defaults, and these methods and class attributes, which are all the model, the
files and the command line ever call:

    method, peft_type, tensors            its name, its adapter_config.json peft_type, the
                                          suffixes of its tensors ("lora_A.weight", ...)
    targets                               the linears it adapts (a per-adapter default)
    init(linear, out, in, rng, dtype)     {suffix: new array} for one linear
    shapes(linear, out, in)               {suffix: shape} of those tensors (no allocation)
    trains(suffix)                        whether that tensor trains
    saves(linear, x_buffer, x_shape, out, dtype)   what its forward keeps: [Keep]
    forward(site, x, saved) -> y          keeps into `saved` what backward needs
    backward(site, dy, saved, need_dx) -> (dx or None, {suffix: gradient})
    backward_workspace(linear, x_shape, out, dtype)   bytes its backward allocates
    peft_config(layers) / from_peft_config(cfg, folder)    its adapter_config.json keys
    merge(site) -> (W, b)                 folded into the base, or AdapterError saying why not
    add_options(group) / from_options(args)                its command-line flags

An adapter's tensors live in model.params under PEFT-style names next to the linear they
adapt ("model.layers.0.self_attn.q_proj.lora_A.weight"); model.adapter is the settings
object and model.adapted the (layer, linear) pairs it sits on. Adding an adapter is one
new module with that dataclass and one line in ADAPTERS.
"""
from __future__ import annotations

import numpy as np

from minilars.adapters.common import AdapterError, Site
from minilars.adapters.ia3 import IA3
from minilars.adapters.lars import LARS
from minilars.adapters.lora import LoRA
from minilars.params import linear_module, param_shapes

ADAPTERS = {"lora": LoRA, "ia3": IA3, "lars": LARS}
METHODS = ("full",) + tuple(ADAPTERS)          # what --method accepts

__all__ = ["ADAPTERS", "METHODS", "AdapterError", "IA3", "LARS", "LoRA", "Site", "attach",
           "adapter_for", "adapter_shapes", "adapter_sites", "adapter_tensor_names",
           "trainable_report"]


def adapter_for(method: str, **settings):
    """The adapter for a method name with its settings (defaults for the rest)."""
    if method not in ADAPTERS:
        raise AdapterError(f"unknown adapter method {method!r}; expected one of "
                           f"{', '.join(ADAPTERS)}")
    return ADAPTERS[method](**settings)


def adapter_sites(cfg, adapter, layers=None) -> list[tuple[int, str]]:
    """The (layer, linear) pairs `adapter` sits on: its targets in every layer (or in
    `layers`), checked against the config."""
    layers = range(cfg.num_hidden_layers) if layers is None else list(layers)
    for i in layers:
        if not (isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                and 0 <= i < cfg.num_hidden_layers):
            raise AdapterError(f"layer {i!r} is not a layer of this "
                               f"{cfg.num_hidden_layers}-layer model")
    if len({int(i) for i in layers}) != len(layers):
        raise AdapterError(f"layers {list(layers)} name a layer twice")
    return [(int(i), linear) for i in layers for linear in adapter.targets]


def adapter_shapes(cfg, adapter, layers=None) -> dict[str, tuple]:
    """{name in params: shape} of every tensor `adapter` would add (nothing is allocated),
    so a file's tensors can be checked against them first."""
    shapes = param_shapes(cfg)
    out = {}
    for i, linear in adapter_sites(cfg, adapter, layers):
        module = linear_module(i, linear)
        out_f, in_f = shapes[module + ".weight"]
        out.update({f"{module}.{suffix}": tuple(shape)
                    for suffix, shape in adapter.shapes(linear, out_f, in_f).items()})
    return out


def attach(model, adapter, layers=None, seed: int = 0):
    """Freeze the base model and put `adapter` on its target linears in every layer (or in
    `layers`). The adapter's tensors are drawn from `seed`; they become the only trainable
    tensors. All of it is checked before the model changes. Returns the model."""
    if model.adapter is not None:
        raise AdapterError("this model already has an adapter attached")
    shapes = param_shapes(model.cfg)
    rng = np.random.default_rng(seed)
    new, trains = {}, set()                 # built first, applied only if all of it works
    sites = adapter_sites(model.cfg, adapter, layers)
    for i, linear in sites:
        module = linear_module(i, linear)
        out_f, in_f = shapes[module + ".weight"]
        for suffix, array in adapter.init(linear, out_f, in_f, rng, model.dtype).items():
            new[f"{module}.{suffix}"] = array
            if adapter.trains(suffix):
                trains.add(f"{module}.{suffix}")
    model.params.update(new)
    model.adapter, model.adapted, model.trainable = adapter, tuple(sites), trains
    return model


def adapter_tensor_names(model) -> list[str]:
    """Names (in model.params) of every adapter tensor of the model, in site order."""
    if model.adapter is None:
        return []
    return [f"{linear_module(i, linear)}.{suffix}"
            for i, linear in model.adapted for suffix in model.adapter.tensors]


def trainable_report(model) -> dict:
    n_train = sum(model.params[n].size for n in model.trainable)
    n_base = model.base_param_count()
    return {"trainable": n_train, "base": n_base, "percent": 100.0 * n_train / n_base}
