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

import os

from minilars.adapters import (ADAPTERS, AdapterError, Site, adapter_shapes, adapter_tensor_names,
                               attach)
from minilars.adapters.common import config_linears
from minilars.config import read_json_file, shown
from minilars.frozen import to_float
from minilars.io.atomic import write_json
from minilars.io.safetensors_io import (CheckpointError, load_safetensors, read_safetensors_header,
                                        save_model, save_safetensors_atomic)
from minilars.params import linear_module, non_finite

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
    minilars knows and whose target_modules is a non-empty list of linear names ("all-linear"
    becomes all seven). Errors name the file, the key, what was found and what was expected."""
    path = os.path.join(folder, CONFIG_FILE)
    cfg = read_json_file(path, AdapterError, f"no {CONFIG_FILE} (is {folder} an adapter folder?)")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPES:
        raise AdapterError(f"{path}: peft_type {shown(peft_type)} is not one of "
                           f"{', '.join(PEFT_TYPES)}")
    targets = config_linears(cfg, "target_modules", folder)
    if not targets:
        raise AdapterError(f"{path}: key 'target_modules' is []; expected at least one module name")
    return {**cfg, "target_modules": targets}


def _layers_to_transform(cfg: dict, folder: str, n_layers: int) -> list[int] | None:
    """layers_to_transform (a layer index or a list of them; null: every layer), checked
    against the model's layer count."""
    layers = cfg.get("layers_to_transform")
    if layers is None:
        return None
    layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    path = os.path.join(folder, CONFIG_FILE)
    expected = f"a non-empty list of distinct layer indices of this {n_layers}-layer model"
    if not isinstance(layers, list) or not layers:
        raise AdapterError(f"{path}: key 'layers_to_transform' is {shown(layers)}; "
                           f"expected {expected}")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise AdapterError(f"{path}: layers_to_transform {shown(i)} is not a layer of "
                               f"this {n_layers}-layer model; expected {expected}")
    if len(set(layers)) != len(layers):
        raise AdapterError(f"{path}: key 'layers_to_transform' is {layers}; expected {expected}")
    return layers


def _held_by(names) -> str:
    """Which adapter's tensors a file holds, by their suffixes (for error messages)."""
    kinds = [cls.peft_type for cls in PEFT_TYPES.values()
             if any(n.endswith(suffix) for n in names for suffix in cls.tensors)]
    return " and ".join(kinds) if kinds else "no adapter"


def load_adapter(folder: str, model):
    """Attach the adapter described in `folder` to a base model and load its tensors.
    The config and the weights file's header are checked before anything is allocated:
    errors name the file and the key or tensor when something is missing, extra,
    misshapen or not finite."""
    config_path = os.path.join(folder, CONFIG_FILE)
    cfg = read_adapter_config(folder)
    layers = _layers_to_transform(cfg, folder, model.cfg.num_hidden_layers)
    try:
        adapter = PEFT_TYPES[cfg["peft_type"]].from_peft_config(cfg, folder)
        shapes = adapter_shapes(model.cfg, adapter, layers)
    except AdapterError as e:
        message = str(e)
        raise AdapterError(message if message.startswith(config_path)
                           else f"{config_path}: {message}") from None
    tensors = _read_tensors(folder, {PREFIX + n: shape for n, shape in shapes.items()},
                            cfg["peft_type"])
    attach(model, adapter, layers=layers)
    for key, array in tensors.items():
        model.params[key[len(PREFIX):]] = array.astype(model.dtype)
    return model


def _read_tensors(folder: str, expected: dict, peft_type: str) -> dict:
    """{PEFT name: array} of the weights file, which must hold exactly the `expected`
    names and shapes ({PEFT name: shape}; checked on its header, before anything is
    read) and only finite values."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(path):
        raise AdapterError(f"{path}: adapter weights file is missing")
    try:
        entries, _, _ = read_safetensors_header(path)
    except CheckpointError as e:
        raise AdapterError(f"{path}: cannot read safetensors file ({e})") from None
    # PEFT sometimes writes names with the adapter name (".default") left in
    stored = {k.replace(".default.", ".").removesuffix(".default"): k for k in entries}
    if len(stored) != len(entries):
        raise AdapterError(f"{path}: two tensors have the same name once PEFT's '.default' "
                           f"is removed; expected each tensor once")
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        raise AdapterError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing); the "
                           f"file holds {_held_by(stored)} tensors, "
                           f"{os.path.join(folder, CONFIG_FILE)} describes a {peft_type} adapter")
    if unexpected:
        raise AdapterError(f"{path}: unexpected tensor {unexpected[0]} (does the adapter match "
                           f"this model's layers and targets?)")
    for key, want in sorted(expected.items()):
        got = entries[stored[key]]["shape"]
        if got != want and not (got == () and want == (1,)):      # a scalar saved 0-d
            raise AdapterError(f"{path}: tensor {key} has shape {got}, expected {want}")
    try:
        tensors = load_safetensors(path)
    except CheckpointError as e:
        raise AdapterError(f"{path}: cannot read safetensors file ({e})") from None
    bad = non_finite(tensors)
    if bad:
        raise AdapterError(f"{path}: tensor {bad[0]} holds NaN or Inf values ({len(bad)} "
                           f"tensor(s) in all); expected finite adapter weights")
    return {key: tensors[stored[key]].reshape(want) for key, want in expected.items()}


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
