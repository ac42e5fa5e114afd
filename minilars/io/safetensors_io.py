"""Loading and saving Hugging Face model folders in the safetensors format.

A model folder, as Hugging Face writes it:

    FOLDER/config.json                      architecture and sizes (see minilars.config)
    FOLDER/model.safetensors                every tensor, or, for big models,
    FOLDER/model.safetensors.index.json     {"weight_map": {tensor name: shard file}}
    FOLDER/model-00001-of-00002.safetensors ...

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
then the raw little-endian tensor bytes, offsets counted from the end of the header.

We parse and check the header ourselves (so that a truncated or corrupt file names the
file and the tensor), then read tensors memory-mapped: F32/F16/F64 through
`safetensors.safe_open(..., framework="numpy")`, BF16 through np.memmap as uint16,
because NumPy has no bfloat16 dtype and safetensors' numpy framework refuses it
(TypeError: data type 'bfloat16' not understood). A bfloat16 is the upper half of a
float32, so `(u16.astype(uint32) << 16).view(float32)` converts it exactly.

Writes are atomic: temp file in the same directory, fsync, os.replace.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
from safetensors import safe_open

from minilars.config import ModelConfig
from minilars.frozen import freeze
from minilars.io.atomic import atomic_dir, atomic_path, write_text
from minilars.quant import QuantError
from minilars.params import config_mismatch, param_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# stored dtype name -> (NumPy dtype it is read as, bytes per element)
STORED_DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),    # raw bits; converted to float32 on load
}
NUMPY_TO_STORED = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
                   np.dtype(np.float16): "F16"}
MAX_HEADER_BYTES = 100 * 1024 * 1024   # the reference implementation's own limit

# buffers some checkpoints carry that are not parameters: skipped silently
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded: the message names file and tensor."""


class CheckpointWarning(UserWarning):
    """Something in a checkpoint was skipped on purpose (e.g. a redundant tied lm_head)."""


# ----------------------------------------------------------------------------------------
# single safetensors files
# ----------------------------------------------------------------------------------------

def write_safetensors(path: str, layout: dict[str, tuple[tuple, np.dtype]], produce,
                      metadata: dict[str, str] | None = None, progress=None,
                      shown_path: str | None = None) -> None:
    """Writes a safetensors file one tensor at a time: layout {name: (shape, dtype)} makes
    the header, produce(name) gives each array (float64/32/16, as laid out), so peak memory
    is one tensor beyond what the caller holds. Not atomic by itself (write a temporary:
    atomic_path). A write that fails (a full disk) raises OSError naming `shown_path`
    (default `path`): the file the caller meant to write."""
    shown = shown_path or path
    header, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        if np.dtype(dtype) not in NUMPY_TO_STORED:
            raise CheckpointError(f"{shown}: tensor {name!r} has dtype {np.dtype(dtype)}; "
                                  f"expected one of float64, float32, float16")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NUMPY_TO_STORED[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"} if metadata is None else {
        str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)        # tensor data starts 8-byte aligned
    try:
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for k, (name, (shape, dtype)) in enumerate(layout.items()):
                array = produce(name)
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise CheckpointError(f"{shown}: tensor {name!r} came out {array.shape} "
                                          f"{array.dtype}, laid out as {tuple(shape)} "
                                          f"{np.dtype(dtype)}")
                little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
                f.write(little.reshape(-1).data)
                if progress:
                    progress(k + 1, len(layout))
            f.flush()
    except OSError as e:
        raise OSError(e.errno, f"cannot write {shown}: {e.strerror}", shown) from None


def save_safetensors_atomic(path: str, tensors: dict[str, np.ndarray],
                            metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (float64/32/16 arrays) to a safetensors file, atomically.
    metadata defaults to {"format": "pt"}, which transformers requires to load the file."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    with atomic_path(path) as tmp:
        write_safetensors(tmp, {n: (a.shape, a.dtype) for n, a in arrays.items()},
                          arrays.__getitem__, metadata, shown_path=path)


def read_safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parses and checks a safetensors header without reading tensor data.

    Returns (entries, metadata, data_start): entries[name] = {"dtype", "shape", "begin",
    "end"} with offsets relative to data_start, the byte where tensor data begins.
    Raises CheckpointError for a truncated file, a bad header, an unknown dtype, or a
    tensor whose bytes do not match its shape or lie past the end of the file."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: file is {file_size} bytes, too short for a "
                                      f"safetensors header (truncated or not safetensors)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CheckpointError(f"{path}: header claims {header_len} bytes but the file "
                                      f"has {file_size} (truncated or not safetensors)")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = file_size - data_start
    entries = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                                  f"{info!r}; expected dtype, shape and data_offsets") from None
        if dtype not in STORED_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {dtype}; minilars "
                                  f"reads {', '.join(STORED_DTYPES)}")
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape} "
                                  f"or offsets [{begin}, {end}]")
        expected = int(np.prod(shape, dtype=np.int64)) * STORED_DTYPES[dtype][1]
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} declares {end - begin} bytes but "
                                  f"its shape {shape} of {dtype} needs {expected}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data but "
                                  f"the file holds only {data_size} data bytes (truncated)")
        entries[name] = {"dtype": dtype, "shape": shape, "begin": begin, "end": end}
    return entries, metadata, data_start


def _read_tensor(path: str, name: str, entry: dict, data_start: int, handle) -> np.ndarray:
    """One tensor as a NumPy array: BF16 becomes float32, others keep their stored dtype."""
    shape = entry["shape"]
    if entry["dtype"] == "BF16":
        bits = np.memmap(path, dtype="<u2", mode="r", offset=data_start + entry["begin"],
                         shape=shape) if entry["end"] > entry["begin"] else np.zeros(shape, "<u2")
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return handle.get_tensor(name)


def _copy_tensor(path: str, entry: dict, data_start: int, dtype) -> np.ndarray:
    """One tensor read through a short-lived memory map into a new array of `dtype`."""
    shape = tuple(entry["shape"])
    stored = "<u2" if entry["dtype"] == "BF16" else np.dtype(STORED_DTYPES[entry["dtype"]][0]).newbyteorder("<")
    out = np.empty(shape, dtype=dtype)
    if out.size == 0:
        return out
    mapped = np.memmap(path, dtype=stored, mode="r", offset=data_start + entry["begin"], shape=shape)
    if entry["dtype"] == "BF16":
        out[...] = (mapped.astype(np.uint32) << 16).view(np.float32)
    else:
        out[...] = mapped
    del mapped
    return out


def load_safetensors(path: str, names=None) -> dict[str, np.ndarray]:
    """All (or the named) tensors of one safetensors file, after checking its header.
    F64/F32/F16 keep their dtype; BF16 is returned as float32 (exact)."""
    entries, _, data_start = read_safetensors_header(path)
    wanted = list(entries) if names is None else list(names)
    out = {}
    try:
        with safe_open(path, framework="numpy") as handle:
            for name in wanted:
                if name not in entries:
                    raise CheckpointError(f"{path}: no tensor named {name!r}")
                out[name] = _read_tensor(path, name, entries[name], data_start, handle)
    except CheckpointError:
        raise
    except Exception as e:   # safetensors' own checks (SafetensorError) or OS errors
        raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None
    return out


# ----------------------------------------------------------------------------------------
# model folders
# ----------------------------------------------------------------------------------------

def _weight_files(folder: str) -> dict[str, list[str]]:
    """{file path: [tensor names the index assigns to it]} ([] = whatever the file holds)."""
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single_path):     # as transformers: the single file wins over an index
        return {single_path: []}
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object "
                                  f"of tensor name -> shard file ({e})") from None
        files: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(os.path.join(folder, shard), []).append(name)
        return files
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def load_model(folder: str, dtype=np.float32, frozen_dtype: str | None = None
               ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and parameters of a Hugging Face model folder (one file or sharded).

    dtype: compute dtype of every parameter (float32, or float64 for gradient checks).
    frozen_dtype: if given (a name of minilars.frozen, e.g. "float16" or "q4_1"), the 2-D
    weight matrices (embeddings and the linears' weights; not norms or biases) are held in
    that form, converted one tensor at a time.
    Names and shapes are checked against param_shapes(cfg); every failure raises
    CheckpointError naming the file and tensor."""
    cfg = ModelConfig.from_json(os.path.join(folder, CONFIG_FILE))
    # pass 1: headers only; find where each tensor lives and check it
    located: dict[str, tuple[str, dict, int]] = {}   # name -> (file, entry, data_start)
    for path, indexed_names in _weight_files(folder).items():
        entries, _, data_start = read_safetensors_header(path)
        for name in indexed_names:
            if name not in entries:
                raise CheckpointError(f"{os.path.join(folder, INDEX_FILE)} maps tensor {name!r} "
                                      f"to {path}, which does not contain it")
        for name, entry in entries.items():
            if name in located:
                raise CheckpointError(f"{path}: tensor {name!r} also appears in {located[name][0]}")
            located[name] = (path, entry, data_start)
    skipped = []
    for name in list(located):
        if name.endswith(IGNORED_SUFFIXES):
            skipped.append(f"{name} (a buffer, not a parameter)")
            del located[name]
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            skipped.append("lm_head.weight (config.json ties the output head to "
                           "model.embed_tokens.weight)")
            del located[name]
    if skipped:
        warnings.warn(f"{folder}: ignoring {len(skipped)} tensor(s): {'; '.join(skipped[:3])}"
                      f"{' ...' if len(skipped) > 3 else ''}", CheckpointWarning, stacklevel=2)
    problem = config_mismatch(cfg, {n: entry["shape"] for n, (_, entry, _) in located.items()})
    if problem:
        message, name = problem
        where = located[name][0] if name in located else folder
        raise CheckpointError(f"{where}: {message} (config.json in {folder})")
    # pass 2: map one tensor at a time, copy it into its own array in the target dtype and
    # drop the mapping, so the process never holds the file's pages and the weights at once
    # (peak RSS = the weights + one tensor, which matters on a Pi)
    params: dict[str, np.ndarray] = {}
    for name in param_shapes(cfg):
        path, entry, data_start = located[name]
        narrow = frozen_dtype is not None and len(entry["shape"]) == 2
        target = np.float16 if narrow and frozen_dtype == "float16" else dtype
        try:
            params[name] = _copy_tensor(path, entry, data_start, target)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None
        if narrow and frozen_dtype != "float16":
            try:
                params[name] = freeze(params[name], frozen_dtype)
            except QuantError as e:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be held as "
                                      f"{frozen_dtype}: {e}") from None
    return cfg, params


def save_model(folder: str, cfg: ModelConfig, params: dict[str, np.ndarray],
               extra_files: dict[str, str] | None = None) -> None:
    """Writes config.json + model.safetensors (+ extra text files, e.g. tokenizer.json).

    A new folder is built as a temp sibling and renamed into place; into an existing
    folder each file is replaced atomically (other files there are kept). Tensors are
    stored in the dtype they have (float32, float16, float64)."""
    problem = config_mismatch(cfg, {n: a.shape for n, a in params.items()})
    if problem:
        raise CheckpointError(f"save_model({folder!r}): {problem[0]}")
    config_text = json.dumps(cfg.to_dict(), indent=2) + "\n"
    files = {CONFIG_FILE: config_text, **(extra_files or {})}

    def write_all(into: str) -> None:
        save_safetensors_atomic(os.path.join(into, SINGLE_FILE), params)
        for name, text in files.items():
            write_text(os.path.join(into, name), text)

    if os.path.isdir(folder):
        write_all(folder)
    else:
        with atomic_dir(folder) as tmp:
            write_all(tmp)
