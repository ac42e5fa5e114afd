"""Loading and saving Hugging Face model folders in the safetensors format.

A model folder, as Hugging Face writes it:

    FOLDER/config.json                      architecture and sizes (see minilars.config)
    FOLDER/model.safetensors                every tensor, or, for big models,
    FOLDER/model.safetensors.index.json     {"weight_map": {tensor name: shard file}}
    FOLDER/model-00001-of-00002.safetensors ...

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
then the raw little-endian tensor bytes, offsets counted from the end of the header.

We parse and check the header ourselves, in one place (read_safetensors_header: every
path that reads a safetensors file goes through it), so that a truncated, corrupt or
hostile file names the file and the tensor before anything is allocated; then each
tensor is copied out of a short-lived np.memmap. BF16 is mapped as uint16, because NumPy
has no bfloat16 dtype; a bfloat16 is the upper half of a float32, so
`(u16.astype(uint32) << 16).view(float32)` converts it exactly. Weights that hold a NaN
or an Inf are refused at load, naming the tensor.

Writes are atomic: temp file in the same directory, fsync, os.replace.
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np

from minilars.config import ModelConfig, parse_json, read_json_file, shown
from minilars.frozen import bf16_values, freeze
from minilars.io.atomic import atomic_dir, atomic_path, write_text
from minilars.quant import QuantError
from minilars.params import config_mismatch, non_finite, param_shapes

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
MAX_DIMS = 64                          # NumPy's (2.x) limit; each dimension below 2^63

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
        raise OSError(e.errno, e.strerror, shown) from None


def save_safetensors_atomic(path: str, tensors: dict[str, np.ndarray],
                            metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (float64/32/16 arrays) to a safetensors file, atomically.
    metadata defaults to {"format": "pt"}, which transformers requires to load the file."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    with atomic_path(path) as tmp:
        write_safetensors(tmp, {n: (a.shape, a.dtype) for n, a in arrays.items()},
                          arrays.__getitem__, metadata, shown_path=path)


def read_safetensors_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """Parses and checks a safetensors header without reading tensor data: the one
    validation every reader of a safetensors file goes through.

    Returns (entries, metadata, data_start): entries[name] = {"dtype", "shape", "begin",
    "end"} with offsets relative to data_start, the byte where tensor data begins.
    Raises CheckpointError, naming the file and tensor, for a truncated file; a header
    that is not strict JSON (not UTF-8, a key twice) or not an object; `__metadata__`
    that is not an object of strings; an unknown dtype; a shape or offset that is not a
    non-negative integer (2.5, "3" and true are refused); bytes that do not match the
    shape; and a data buffer that the tensors do not index exactly, as the safetensors
    format requires: in offset order each tensor begins where the previous one ended,
    and the last ends at the end of the file (no overlaps, aliases, holes or trailing
    bytes)."""
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
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}; expected "
                              f"an object of tensor name -> entry")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ is {shown(metadata)}; expected an "
                              f"object of string -> string")
    data_start = 8 + header_len
    entries = {name: _checked_entry(path, name, info) for name, info in header.items()}
    _check_coverage(path, entries, file_size - data_start)
    return entries, metadata, data_start


def _is_file_name(value) -> bool:
    """A non-empty string the OS can take as a path (no NUL, no lone surrogate)."""
    if not isinstance(value, str) or not value or "\0" in value:
        return False
    try:
        os.fsencode(value)
    except UnicodeError:
        return False
    return True


def _is_count(value) -> bool:
    """A non-negative JSON integer (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_entry(path: str, name: str, info) -> dict:
    """One header entry as {"dtype", "shape", "begin", "end"}, each field checked."""
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
        raise CheckpointError(f"{path}: tensor {name!r} has the header entry {shown(info)}; "
                              f"expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in STORED_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} is stored as {str(dtype)[:40]}; "
                              f"minilars reads {', '.join(STORED_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_count(s) and s < 2 ** 63 for s in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shown(shape)}; expected "
                              f"a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has data_offsets {shown(offsets)}; "
                              f"expected [begin, end], integers with 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(shape) * STORED_DTYPES[dtype][1]
    if end - begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} declares {end - begin} bytes but "
                              f"its shape {tuple(shape)} of {dtype} needs {expected}")
    return {"dtype": dtype, "shape": tuple(shape), "begin": begin, "end": end}


def _check_coverage(path: str, entries: dict, data_size: int) -> None:
    """The tensors, in offset order, must tile the data buffer exactly."""
    at, previous = 0, None
    for name, entry in sorted(entries.items(), key=lambda item: (item[1]["begin"], item[1]["end"])):
        begin, end = entry["begin"], entry["end"]
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data but "
                                  f"the file holds only {data_size} data bytes (truncated)")
        if begin < at:
            raise CheckpointError(f"{path}: tensor {name!r} (bytes [{begin}, {end}]) overlaps "
                                  f"tensor {previous!r}, which ends at byte {at}; expected "
                                  f"each tensor in bytes of its own")
        if begin > at:
            raise CheckpointError(f"{path}: a hole of {begin - at} bytes before tensor "
                                  f"{name!r} (data bytes [{at}, {begin}] belong to no tensor); "
                                  f"expected the tensors to cover the data buffer")
        at, previous = end, name
    if at != data_size:
        raise CheckpointError(f"{path}: {data_size - at} bytes after the last tensor belong "
                              f"to no tensor; expected the tensors to end at the end of the file")


def _copy_tensor(path: str, entry: dict, data_start: int, dtype=None) -> np.ndarray:
    """One tensor read through a short-lived memory map into a new array of `dtype`
    (None: its stored dtype, float32 for BF16, which is exact)."""
    shape = tuple(entry["shape"])
    stored = "<u2" if entry["dtype"] == "BF16" else np.dtype(STORED_DTYPES[entry["dtype"]][0]).newbyteorder("<")
    if dtype is None:
        dtype = np.float32 if entry["dtype"] == "BF16" else STORED_DTYPES[entry["dtype"]][0]
    out = np.empty(shape, dtype=dtype)
    if out.size == 0:
        return out
    mapped = np.memmap(path, dtype=stored, mode="r", offset=data_start + entry["begin"], shape=shape)
    if entry["dtype"] == "BF16":
        out[...] = bf16_values(mapped)
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
    for name in wanted:
        if name not in entries:
            raise CheckpointError(f"{path}: no tensor named {name!r}")
        out[name] = _read_checked(path, name, entries[name], data_start)
    return out


def _read_checked(path: str, name: str, entry: dict, data_start: int, dtype=None) -> np.ndarray:
    """_copy_tensor, with an OS failure (the file changed, a read error) named."""
    try:
        return _copy_tensor(path, entry, data_start, dtype)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------
# model folders
# ----------------------------------------------------------------------------------------

def _weight_files(folder: str) -> dict[str, list[str]]:
    """{file path: [tensor names the index assigns to it]} ([] = whatever the file holds).
    The index must be a JSON object whose weight_map maps tensor names to shard files
    inside `folder` (no absolute paths, no '..', no symlink that leads out of it)."""
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_FILE)
    if os.path.exists(single_path):     # as transformers: the single file wins over an index
        return {single_path: []}
    if not os.path.exists(index_path):
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")
    index = read_json_file(index_path, CheckpointError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map' object "
                              f"of tensor name -> shard file, found {shown(index)}")
    root = os.path.realpath(folder)
    files: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not _is_file_name(shard):
            raise CheckpointError(f"{index_path}: weight_map maps {name!r} to {shown(shard)}; "
                                  f"expected the name of a shard file")
        path = os.path.join(folder, shard)
        parts = shard.replace("\\", "/").split("/")
        if (os.path.isabs(shard) or ".." in parts
                or os.path.commonpath([root, os.path.realpath(path)]) != root):
            raise CheckpointError(f"{index_path}: weight_map maps {name!r} to {shard!r}, outside "
                                  f"the model folder; expected a shard file in {folder}")
        files.setdefault(path, []).append(name)
    return files


def file_mismatch(cfg: ModelConfig, shapes: dict) -> tuple[str, str] | None:
    """config_mismatch of the tensors a file holds (name -> shape) against the config that
    came with them, safe for a damaged config: one that claims more layers than the file
    has tensors (each layer has at least nine) is refused by counting, before a name table
    of every tensor it implies is built (2 million claimed layers would take seconds and
    hundreds of MB for a file of kilobytes)."""
    if cfg.num_hidden_layers > len(shapes):
        last = f"model.layers.{cfg.num_hidden_layers - 1}.input_layernorm.weight"
        return (f"the config implies {cfg.num_hidden_layers} layers but only {len(shapes)} "
                f"tensors were found, so tensors such as {last!r} are missing"), last
    return config_mismatch(cfg, shapes)


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
    problem = file_mismatch(cfg, {n: entry["shape"] for n, (_, entry, _) in located.items()})
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
        params[name] = _read_checked(path, name, entry, data_start, target)
        _refuse_non_finite(path, name, entry, params[name], np.dtype(target).name)
        if narrow and frozen_dtype != "float16":
            try:
                params[name] = freeze(params[name], frozen_dtype)
            except QuantError as e:
                raise CheckpointError(f"{path}: tensor {name!r} cannot be held as "
                                      f"{frozen_dtype}: {e}") from None
            _refuse_non_finite(path, name, entry, params[name], frozen_dtype)
    return cfg, params


def _refuse_non_finite(path: str, name: str, entry: dict, value, held: str) -> None:
    """A weight with a NaN or an Inf (stored, or from a conversion beyond the held form's
    range) would make every output NaN: refused at load, by name."""
    if non_finite({name: value}):
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values (stored as "
                              f"{entry['dtype']}, held as {held}); expected finite weights")


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
