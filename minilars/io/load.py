"""A base model from a path: a Hugging Face folder or a GGUF file, told apart by content."""
from __future__ import annotations

import json
import os

import numpy as np

from minilars.config import ModelConfig
from minilars.io.gguf import is_gguf
from minilars.io.gguf_model import (build_tokenizer, gguf_tokenizer, load_gguf, open_gguf_model,
                                    tokenizer_side_files)
from minilars.io.safetensors_io import load_model
from minilars.io.tokenizer import Tokenizer, TokenizerError


def read_config(path: str) -> ModelConfig:
    """The config alone: config.json of a folder, or a GGUF file's metadata (its tensor
    table is checked against it; no tensor data is read)."""
    if is_gguf(path):
        return open_gguf_model(path)[1]
    return ModelConfig.from_json(path)


def stored_forms(path: str) -> dict | None:
    """{name: frozen form} of a GGUF file's matrices as load_gguf keeps them (float16,
    bfloat16, q8_0, ...; float32 ones are held in the compute dtype); None for a folder,
    whose tensors load in the compute dtype."""
    if not is_gguf(path):
        return None
    gf, cfg, by_hf_name = open_gguf_model(path)
    forms = {"F16": "float16", "BF16": "bfloat16", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
    return {name: forms[t.type] for name, t in by_hf_name.items()
            if len(t.shape) == 2 and t.type in forms}


def read_tokenizer(path: str) -> Tokenizer:
    """The tokenizer alone (no weights read)."""
    if is_gguf(path):
        return gguf_tokenizer(open_gguf_model(path)[0])
    return Tokenizer.from_folder(path)


def tokenizer_files(path: str) -> dict[str, str]:
    """The tokenizer's files of a model, as texts to write beside merged weights:
    copied from a folder, or rebuilt from a GGUF file's vocabulary."""
    if is_gguf(path):
        gf, cfg, _ = open_gguf_model(path)
        files = {"tokenizer.json": build_tokenizer(gf.fields, path).to_str(pretty=True)}
        files.update({name: json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
                      for name, obj in tokenizer_side_files(gf.fields, cfg, path).items()})
        return files
    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            try:
                with open(file, encoding="utf-8") as f:
                    files[name] = f.read()
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return files


def load_params(path: str, dtype=np.float32, frozen_dtype: str | None = None,
                expand: bool = False):
    """(config, params, Tokenizer). A folder's weights come in `dtype` (or frozen_dtype for
    its matrices); a GGUF file's matrices stay as stored unless frozen_dtype says otherwise,
    and expand=True makes all of them `dtype` (what full fine-tuning trains)."""
    if is_gguf(path):
        return load_gguf(path, dtype=dtype, frozen_dtype=frozen_dtype, expand=expand)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: neither a model folder nor a GGUF file")
    cfg, params = load_model(path, dtype=dtype, frozen_dtype=frozen_dtype)
    return cfg, params, Tokenizer.from_folder(path)
