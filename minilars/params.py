"""The model's parameters: plain NumPy arrays in a dict keyed by their Hugging Face names.

    model.embed_tokens.weight                          (V, C)
    model.layers.{i}.input_layernorm.weight            (C,)
    model.layers.{i}.self_attn.q_proj.weight           (nh*hd, C)   (+ .bias (nh*hd,) for Qwen2)
    model.layers.{i}.self_attn.k_proj.weight           (nkv*hd, C)  (+ .bias)
    model.layers.{i}.self_attn.v_proj.weight           (nkv*hd, C)  (+ .bias)
    model.layers.{i}.self_attn.o_proj.weight           (C, nh*hd)
    model.layers.{i}.post_attention_layernorm.weight   (C,)
    model.layers.{i}.mlp.gate_proj.weight              (F, C)
    model.layers.{i}.mlp.up_proj.weight                (F, C)
    model.layers.{i}.mlp.down_proj.weight              (C, F)
    model.norm.weight                                  (C,)
    lm_head.weight                                     (V, C)  only when embeddings are not tied

Keeping HF names means a checkpoint loads by name with no translation table.
"""
from __future__ import annotations

import numpy as np

from minilars import quant
from minilars.config import ModelConfig
from minilars.frozen import Packed, bf16_values, freeze_named

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_module(layer: int, linear: str) -> str:
    """HF module name of one of a block's seven linears: (3, 'q_proj') ->
    'model.layers.3.self_attn.q_proj'. Its weight is module + '.weight'; an adapter's
    tensors on it are module + '.' + suffix."""
    group = "mlp" if linear in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{group}.{linear}"


def linear_param_name(layer: int, linear: str) -> str:
    """HF weight name of one of a block's seven linears, e.g. (3, 'q_proj')."""
    return linear_module(layer, linear) + ".weight"


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each of a block's seven linears."""
    C, F = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (cfg.q_dim, C), "k_proj": (cfg.kv_dim, C), "v_proj": (cfg.kv_dim, C),
            "o_proj": (C, cfg.q_dim), "gate_proj": (F, C), "up_proj": (F, C),
            "down_proj": (C, F)}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the config implies, in load order, with its shape."""
    C, V = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    out_in = linear_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (C,)
        for lin in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[linear_param_name(i, lin)] = out_in[lin]
            if cfg.attention_bias and lin != "o_proj":
                shapes[p + f"self_attn.{lin}.bias"] = (out_in[lin][0],)
        shapes[p + "post_attention_layernorm.weight"] = (C,)
        for lin in ("gate_proj", "up_proj", "down_proj"):
            shapes[linear_param_name(i, lin)] = out_in[lin]
    shapes["model.norm.weight"] = (C,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def config_mismatch(cfg: ModelConfig, shapes: dict) -> tuple[str, str] | None:
    """Compare tensors found (name -> shape) with the parameters cfg implies. None when
    they match exactly; else (message, the first offending tensor's name), so the caller
    can say which file or checkpoint it came from. One check for loading, saving and
    converting checkpoints."""
    expected = param_shapes(cfg)
    missing = [n for n in expected if n not in shapes]
    if missing:
        return (f"{len(missing)} tensor(s) that the config implies are missing, "
                f"e.g. {missing[:3]}"), missing[0]
    unexpected = [n for n in shapes if n not in expected]
    if unexpected:
        return f"{len(unexpected)} unexpected tensor(s) for this config, e.g. {unexpected[:3]}", unexpected[0]
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            return (f"tensor {name!r} has shape {list(shapes[name])}, expected {list(shape)} "
                    f"from the config"), name
    return None


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32,
                frozen_dtype: str | None = None) -> dict[str, np.ndarray]:
    """Seeded random weights for any config: normal(0, 0.02) matrices, ones for norms,
    small normal biases (nonzero so bias gradients are exercised in tests). With
    `frozen_dtype`, each matrix is put in that frozen form as soon as it is drawn, so the
    whole float32 model never exists (the process's RSS stays that of the frozen form)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            params[name] = (0.02 * rng.standard_normal(shape)).astype(dtype)
        else:
            matrix = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype, copy=False)
            params[name] = matrix if frozen_dtype is None else freeze_named(name, matrix, frozen_dtype)
    return params


def lm_head_name(cfg: ModelConfig) -> str:
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


FINITE_CHUNK = 1 << 20       # values non_finite checks at once


def non_finite(arrays: dict) -> list[str]:
    """Names of the arrays holding a NaN or an Inf (checked a million values at a time,
    so the check allocates a few MB, not an array's size). A Packed matrix is checked in
    the floats it stores: its bfloat16 values, or its blocks' float16 scales (and Q4_1
    mins), which are finite exactly when every weight they give is."""
    return [name for name, a in arrays.items()
            if any(not np.isfinite(chunk).all() for chunk in _float_chunks(a))]


def _float_chunks(a):
    """The floats a parameter stores, FINITE_CHUNK values at a time."""
    if isinstance(a, Packed) and a.format == "bf16":
        bits = a.data.reshape(-1)
        for i in range(0, bits.size, FINITE_CHUNK):
            yield bf16_values(bits[i:i + FINITE_CHUNK])
    elif isinstance(a, Packed):
        blocks = a.data.reshape(-1, quant.BLOCK_BYTES[a.format])
        floats = 2 if a.format == "q4_1" else 1          # d (and m), float16 at each block's start
        for i in range(0, blocks.shape[0], FINITE_CHUNK // floats):
            yield np.ascontiguousarray(blocks[i:i + FINITE_CHUNK // floats, :2 * floats]).view(np.float16)
    else:
        flat = np.asarray(a).reshape(-1)
        for i in range(0, flat.size, FINITE_CHUNK):
            yield flat[i:i + FINITE_CHUNK]
