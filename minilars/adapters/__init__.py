"""Adapters on frozen linears: LoRA, IA3, LARS. Attaching them to a model, and the one
place where the model's linears dispatch to them.

An adapter's tensors live in `model.params` under PEFT-style names next to the linear
they adapt (e.g. "model.layers.0.self_attn.q_proj.lora_A.weight") and are the only
entries of `model.trainable`; `model.adapters` maps the module name to the adapter's
hyper-parameters. Every base weight is frozen.
"""
from __future__ import annotations

import numpy as np

from minilars.adapters.ia3 import IA3, ia3_backward, ia3_forward
from minilars.adapters.lora import LoRA, init_lora, lora_backward, lora_forward
from minilars.params import LINEAR_NAMES, linear_param_name

METHODS = ("lora", "ia3", "lars")
DEFAULT_TARGETS = {"lora": LINEAR_NAMES, "lars": LINEAR_NAMES,
                   "ia3": ("k_proj", "v_proj", "down_proj")}
DEFAULT_IA3_FEEDFORWARD = ("down_proj",)


class AdapterError(ValueError):
    """Adapter options that do not fit the model."""


def resolve_targets(targets, method: str) -> tuple[str, ...]:
    if targets is None:
        return DEFAULT_TARGETS[method]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if list(targets) == ["all-linear"]:
        return LINEAR_NAMES
    for t in targets:
        if t not in LINEAR_NAMES:
            raise AdapterError(f"target {t!r} does not exist in a Llama block; available "
                               f"targets: {', '.join(LINEAR_NAMES)} or all-linear")
    if not targets:
        raise AdapterError("no adapter targets given")
    return tuple(dict.fromkeys(targets))


def attach(model, method: str, targets=None, seed: int = 0, rank: int = 8,
           alpha: float | None = None, dropout: float = 0.0, block: int = 32,
           train_alpha: bool = True, eps: float = 1e-5, u_init: str = "in",
           save: str = "recompute", feedforward=None, layers=None):
    """Freeze the base model and attach `method` to the target linears of every layer (or
    of `layers`). Returns the model. `alpha` is LoRA's alpha (default 16) or LARS's initial
    alpha (default 0.1)."""
    if method not in METHODS:
        raise AdapterError(f"unknown adapter method {method!r}; expected one of {METHODS}")
    if model.adapters:
        raise AdapterError("this model already has adapters attached")
    targets = resolve_targets(targets, method)
    if rank < 1:
        raise AdapterError(f"rank must be at least 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"dropout must be in [0, 1), got {dropout}")
    cfg = model.cfg
    layers = range(cfg.num_hidden_layers) if layers is None else layers
    if feedforward is None:
        feedforward = DEFAULT_IA3_FEEDFORWARD
    elif feedforward:                       # an empty list: no input-scaled target
        feedforward = resolve_targets(feedforward, "ia3")
    rng = np.random.default_rng(seed)
    dtype = model.dtype
    new, adapters = {}, {}                  # built first, applied only if all of it works
    for i in layers:
        for linear in targets:
            module = linear_param_name(i, linear)[: -len(".weight")]
            out_f, in_f = model.params[module + ".weight"].shape
            if method == "lora":
                A, B = init_lora(in_f, out_f, rank, rng, dtype)
                new[module + ".lora_A.weight"], new[module + ".lora_B.weight"] = A, B
                adapters[module] = LoRA(rank=rank, alpha=16.0 if alpha is None else alpha,
                                              dropout=dropout, seed=seed)
            elif method == "ia3":
                ff = linear in feedforward
                new[module + ".ia3_l"] = np.ones((1, in_f) if ff else (out_f, 1), dtype=dtype)
                adapters[module] = IA3(feedforward=ff)
            else:
                from minilars.adapters.lars import LARS, init_lars
                if block < 1 or in_f % block:
                    raise AdapterError(f"LARS block size {block} does not divide the input "
                                       f"width {in_f} of {linear}; choose a divisor of {in_f}")
                U, V, a = init_lars(in_f, rank, block, rng, u_init=u_init,
                                    alpha=0.1 if alpha is None else alpha, dtype=dtype)
                new[module + ".lars_U"], new[module + ".lars_V"] = U, V
                new[module + ".lars_alpha"] = a
                adapters[module] = LARS(rank=rank, block=block, eps=eps,
                                              train_alpha=train_alpha, save=save)
    model.params.update(new)
    model.adapters.update(adapters)
    model.trainable = {n for n in new if not (n.endswith(".lars_alpha") and not train_alpha)}
    return model


def trainable_report(model) -> dict:
    n_train = sum(model.params[n].size for n in model.trainable)
    n_base = model.base_param_count()
    return {"trainable": n_train, "base": n_base, "percent": 100.0 * n_train / n_base}


def set_step(model, step: int) -> None:
    """Tell adapters with randomness (LoRA dropout) which step this is."""
    for adapter in model.adapters.values():
        if isinstance(adapter, LoRA):
            adapter.step = step


def _is_lars(adapter) -> bool:
    return type(adapter).__name__ == "LARS"


# ---------------------------------------------------------------- dispatch from the model

def adapter_forward(adapter, model, module, x, W, b, saved, linear):
    """y for one adapted linear; saved tensors go to the ledger under op `linear`."""
    p = model.params
    keep = lambda name, array: saved.keep(linear, name, array)
    if isinstance(adapter, LoRA):
        return lora_forward(x, W, b, p[module + ".lora_A.weight"], p[module + ".lora_B.weight"],
                            adapter, module, keep, training=saved.training)
    if isinstance(adapter, IA3):
        return ia3_forward(x, W, b, p[module + ".ia3_l"], adapter, keep)
    from minilars.adapters.lars import LARS, lars_forward
    if isinstance(adapter, LARS):
        return lars_forward(x, W, b, p[module + ".lars_U"], p[module + ".lars_V"],
                            p[module + ".lars_alpha"], adapter, keep)
    raise TypeError(f"unknown adapter {type(adapter).__name__} on {module}")


def adapter_backward(adapter, model, module, dy, W, saved, linear, grads, need_dx):
    """dx for one adapted linear (None if not needed); adds adapter gradients into grads."""
    p, trainable = model.params, model.trainable
    get = lambda name: saved.get(linear, name)
    need_db = module + ".bias" in trainable
    if isinstance(adapter, LoRA):
        dx, dA, dB, db = lora_backward(dy, W, p[module + ".lora_A.weight"],
                                       p[module + ".lora_B.weight"], adapter, module, get,
                                       need_dx, need_db)
        grads[module + ".lora_A.weight"] += dA
        grads[module + ".lora_B.weight"] += dB
    elif isinstance(adapter, IA3):
        dx, dl, db = ia3_backward(dy, W, p[module + ".ia3_l"], adapter, get, need_dx, need_db)
        grads[module + ".ia3_l"] += dl
    elif _is_lars(adapter):
        from minilars.adapters.lars import lars_backward
        dx, dU, dV, dalpha, db = lars_backward(dy, W, p[module + ".lars_U"],
                                               p[module + ".lars_V"], p[module + ".lars_alpha"],
                                               adapter, get, need_dx, need_db)
        grads[module + ".lars_U"] += dU
        grads[module + ".lars_V"] += dV
        if module + ".lars_alpha" in trainable:
            grads[module + ".lars_alpha"] += dalpha
    else:
        raise TypeError(f"unknown adapter {type(adapter).__name__} on {module}")
    if db is not None:
        grads[module + ".bias"] += db
    return dx
