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

from minilars.adapters import ADAPTERS, AdapterError, Site, adapter_tensor_names, attach
from minilars.frozen import to_float
from minilars.io.atomic import write_json
from minilars.io.safetensors_io import (CheckpointError, load_safetensors, save_model,
                                        save_safetensors_atomic)
from minilars.params import linear_module

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TYPES = {cls.peft_type: cls for cls in ADAPTERS.values()}


def _layers(model) -> list[int] | None:
    """Adapted layer indices when not every layer is adapted (PEFT's layers_to_transform)."""
    layers = sorted({i for i, _ in model.adapted})
    return None if layers == list(range(model.cfg.num_hidden_layers)) else layers


def adapter_config(model, base_model_name: str | None = None) -> dict:
    if model.adapter is None:
        raise AdapterError("the model has no adapter to save")
    adapter = model.adapter
    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
              "target_modules": sorted(adapter.targets), "inference_mode": True,
              "modules_to_save": None, "revision": None}
    return {"peft_type": adapter.peft_type, **common, **adapter.peft_config(_layers(model))}


def adapter_tensors(model) -> dict:
    """Adapter tensors under their PEFT names."""
    return {PREFIX + name: model.params[name] for name in sorted(adapter_tensor_names(model))}


def save_adapter(folder: str, model, base_model_name: str | None = None) -> None:
    os.makedirs(folder, exist_ok=True)
    save_safetensors_atomic(os.path.join(folder, WEIGHTS_FILE), adapter_tensors(model),
                            metadata={"format": "pt"})
    write_json(os.path.join(folder, CONFIG_FILE), adapter_config(model, base_model_name))


def read_adapter_config(folder: str) -> dict:
    """The checked adapter_config.json of an adapter folder: a JSON object whose peft_type
    minilars knows and whose target_modules is a list of names."""
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (is {folder} an adapter folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("peft_type") not in PEFT_TYPES:
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not one of "
                           f"{', '.join(PEFT_TYPES)}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(f"{path}: regex target_modules {targets!r} are not supported; "
                           "list the module names")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"{path}: key 'target_modules' is {targets!r}; expected a list "
                           "of module names")
    return cfg


def load_adapter(folder: str, model):
    """Attach the adapter described in `folder` to a base model and load its tensors.
    Errors name the file and tensor when something is missing, extra or misshapen."""
    cfg = read_adapter_config(folder)
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None:
        n = model.cfg.num_hidden_layers
        bad = [i for i in layers if not (isinstance(i, int) and not isinstance(i, bool)
                                         and 0 <= i < n)] if isinstance(layers, list) else [layers]
        if bad:
            raise AdapterError(f"{os.path.join(folder, CONFIG_FILE)}: layers_to_transform "
                               f"{bad[0]!r} is not a layer of this {n}-layer model")
    try:
        adapter = PEFT_TYPES[cfg["peft_type"]].from_peft_config(cfg, folder)
        attach(model, adapter, layers=layers)
    except AdapterError as e:
        message = str(e)
        raise AdapterError(message if message.startswith(folder) else f"{folder}: {message}") from None
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise AdapterError(f"{path}: adapter weights file is missing")
    try:
        tensors = load_safetensors(path)
    except (CheckpointError, OSError) as e:
        raise AdapterError(f"{path}: cannot read safetensors file ({e})") from None
    expected = {PREFIX + n for n in adapter_tensor_names(model)}
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
        if got.shape == () and want == (1,):       # a scalar saved 0-d
            got = got.reshape(1)
        if got.shape != want:
            raise AdapterError(f"{path}: tensor {key} has shape {got.shape}, expected {want}")
        model.params[name] = got.astype(model.dtype)
    return model


def merged_params(model) -> dict:
    """Base parameters with the adapter folded in (model.adapter.merge says how, or why
    it cannot be). The model itself is left unchanged."""
    if model.adapter is None:
        raise AdapterError("the model has no adapter to merge")
    adapter_names = set(adapter_tensor_names(model))
    out = {n: v for n, v in model.params.items() if n not in adapter_names}
    for i, linear in sorted(model.adapted):
        module = linear_module(i, linear)
        W = to_float(model.params[module + ".weight"], model.dtype)
        site = Site(i, linear, module, W, model.params.get(module + ".bias"),
                    {s: model.params[f"{module}.{s}"] for s in model.adapter.tensors})
        out[module + ".weight"], b = model.adapter.merge(site)
        if b is not None:
            out[module + ".bias"] = b
    return out


def save_merged(folder: str, model, extra_files: dict | None = None) -> None:
    save_model(folder, model.cfg, merged_params(model), extra_files=extra_files)
