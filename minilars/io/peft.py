"""Adapter files in the Hugging Face PEFT layout, and merging adapters into the base.

    RUN_DIR/adapter_config.json        {"peft_type": "LORA" | "IA3" | "LARS", ...}
    RUN_DIR/adapter_model.safetensors  tensors named as PEFT names them:
        base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   (r, in)
        base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   (out, r)
        base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l           (out, 1)
        base_model.model.model.layers.{i}.mlp.down_proj.ia3_l              (1, in)  feed-forward
        base_model.model.model.layers.{i}.self_attn.q_proj.lars_U          (in, r)   minilars's
        ... .lars_V (r, g) and .lars_alpha (1,)                                      own keys

LoRA and IA3 files load in PEFT (and PEFT's load here); LARS uses the same layout with its
own peft_type, which PEFT does not know. Writes are atomic.
"""
from __future__ import annotations

import json
import os

import numpy as np

from minilars.adapters import IA3, LoRA, AdapterError, attach
from minilars.io.atomic import write_json
from minilars.io.safetensors_io import save_safetensors_atomic

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _method_of(model) -> str:
    kinds = {type(a).__name__ for a in model.adapters.values()}
    if len(kinds) != 1:
        raise AdapterError(f"expected exactly one adapter kind on the model, found {sorted(kinds) or 'none'}")
    return {"LoRA": "lora", "IA3": "ia3", "LARS": "lars"}[kinds.pop()]


def _targets(model) -> list[str]:
    return sorted({m.rsplit(".", 1)[1] for m in model.adapters})


def _layers(model) -> list[int] | None:
    """Adapted layer indices when not every layer is adapted (PEFT's layers_to_transform)."""
    layers = sorted({int(m.split(".")[2]) for m in model.adapters})
    return None if layers == list(range(model.cfg.num_hidden_layers)) else layers


def adapter_config(model, base_model_name: str | None = None) -> dict:
    method = _method_of(model)
    first = next(iter(model.adapters.values()))
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "target_modules": _targets(model), "inference_mode": True,
              "modules_to_save": None, "revision": None}
    layers = _layers(model)
    if method == "lora":
        return {"peft_type": "LORA", **common, "r": first.rank, "lora_alpha": first.alpha,
                "lora_dropout": first.dropout, "bias": "none", "fan_in_fan_out": False,
                "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                "layers_to_transform": layers, "layers_pattern": None}
    # PEFT's IA3Config has no layers_to_transform (PEFT 0.21 warns about and ignores the
    # key): write it only for a subset of layers, which minilars reads back
    if layers is not None:
        common["layers_to_transform"] = layers
    if method == "ia3":
        ff = sorted({m.rsplit(".", 1)[1] for m, a in model.adapters.items() if a.feedforward})
        return {"peft_type": "IA3", **common, "feedforward_modules": ff,
                "fan_in_fan_out": False, "init_ia3_weights": True}
    return {"peft_type": "LARS", **common, "r": first.rank, "block_size": first.block,
            "eps": first.eps, "train_alpha": first.train_alpha,
            "saved_for_backward": first.save}


def adapter_tensors(model) -> dict:
    """Adapter tensors under their PEFT names."""
    return {PREFIX + name: model.params[name] for name in sorted(model.params)
            if any(tag in name for tag in (".lora_", ".ia3_", ".lars_"))}


def save_adapter(folder: str, model, base_model_name: str | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    save_safetensors_atomic(os.path.join(folder, WEIGHTS_FILE), adapter_tensors(model),
                     metadata={"format": "pt"})
    write_json(os.path.join(folder, CONFIG_FILE), adapter_config(model, base_model_name))


def read_adapter_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (is {folder} an adapter folder?)") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") not in ("LORA", "IA3", "LARS"):
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not one of LORA, IA3, LARS")
    return cfg


def load_adapter(folder: str, model):
    """Attach the adapter described in `folder` to a base model and load its tensors.
    Errors name the file and tensor when something is missing, extra or misshapen."""
    from minilars.io.safetensors_io import CheckpointError, load_safetensors
    cfg = read_adapter_config(folder)
    kind = cfg["peft_type"]
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{folder}: regex target_modules {targets!r} are not supported; "
                           "list the module names")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None:
        bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < model.cfg.num_hidden_layers)]
        if bad:
            raise AdapterError(f"{os.path.join(folder, CONFIG_FILE)}: layers_to_transform {bad[0]!r} "
                               f"is not a layer of this {model.cfg.num_hidden_layers}-layer model")
    if kind == "LORA":
        attach(model, "lora", targets=targets, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
               dropout=float(cfg.get("lora_dropout") or 0.0), layers=layers)
    elif kind == "IA3":
        attach(model, "ia3", targets=targets, feedforward=cfg.get("feedforward_modules") or [],
               layers=layers)
    else:
        attach(model, "lars", targets=targets, rank=int(cfg["r"]), block=int(cfg["block_size"]),
               eps=float(cfg["eps"]), train_alpha=bool(cfg["train_alpha"]),
               save=cfg.get("saved_for_backward", "recompute"), layers=layers)
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise AdapterError(f"{path}: adapter weights file is missing")
    try:
        tensors = load_safetensors(path)
    except (CheckpointError, OSError) as e:
        raise AdapterError(f"{path}: cannot read safetensors file ({e})") from None
    expected = {PREFIX + n for n in model.params if any(t in n for t in (".lora_", ".ia3_", ".lars_"))}
    # PEFT sometimes writes names with the adapter name (".default") left in
    tensors = {k.replace(".default.", ".").removesuffix(".default"): v for k, v in tensors.items()}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing:
        raise AdapterError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise AdapterError(f"{path}: unexpected tensor {unexpected[0]} (does the adapter match "
                           f"this model's layers and targets?)")
    for key in sorted(expected):
        name = key[len(PREFIX):]
        want = model.params[name].shape
        got = tensors[key]
        if name.endswith(".lars_alpha") and got.shape == ():
            got = got.reshape(1)
        if got.shape != want:
            raise AdapterError(f"{path}: tensor {key} has shape {got.shape}, expected {want}")
        model.params[name] = got.astype(model.dtype)
    return model


def merged_params(model) -> dict:
    """Base parameters with LoRA or IA3 folded in (LARS cannot be merged: its gate depends
    on the input). The model itself is left unchanged."""
    out = {n: v for n, v in model.params.items() if not any(t in n for t in (".lora_", ".ia3_", ".lars_"))}
    for module, adapter in model.adapters.items():
        wname = module + ".weight"
        W = model.params[wname].astype(np.float32 if model.dtype == np.float32 else model.dtype)
        if isinstance(adapter, LoRA):
            A, B = model.params[module + ".lora_A.weight"], model.params[module + ".lora_B.weight"]
            out[wname] = W + adapter.scale * (B @ A)
        elif isinstance(adapter, IA3):
            l = model.params[module + ".ia3_l"]
            if adapter.feedforward:
                out[wname] = W * l.reshape(1, -1)
            else:
                out[wname] = W * l.reshape(-1, 1)
                if module + ".bias" in out:
                    out[module + ".bias"] = out[module + ".bias"] * l.reshape(-1)
        else:
            raise AdapterError("LARS cannot be merged into the base weights: its gate depends "
                               "on each input; keep the adapter file beside the base model")
    return out


def save_merged(folder: str, model, extra_files: dict | None = None) -> None:
    from minilars.io.safetensors_io import save_model
    save_model(folder, model.cfg, merged_params(model), extra_files=extra_files)
