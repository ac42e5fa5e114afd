"""A base model from a path: a Hugging Face folder or a GGUF file, told apart by content."""
from __future__ import annotations

import os

import numpy as np

from minilars.config import ModelConfig
from minilars.io.gguf import is_gguf
from minilars.io.gguf_model import load_gguf, open_gguf_model
from minilars.io.safetensors_io import load_model
from minilars.io.tokenizer import Tokenizer


def read_config(path: str) -> ModelConfig:
    """The config alone: config.json of a folder, or a GGUF file's metadata (its tensor
    table is checked against it; no tensor data is read)."""
    if is_gguf(path):
        return open_gguf_model(path)[1]
    return ModelConfig.from_json(path)


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
