"""Reading GGUF files (llama.cpp's format) ourselves, checked, with no dependency.

    magic "GGUF", version (2 or 3), tensor count, key/value count      little-endian
    key/values: key (string), value type, value                         the metadata
    tensor infos: name, n_dims, dims (fastest first), type, offset      the table
    padding to `general.alignment` (32), then the tensor data

A string is a uint64 length and UTF-8 bytes; an array is an element type, a uint64 count
and the elements. Every length, count and offset is checked against the file before
anything is allocated or read, so a truncated or hostile file gives a GGUFError that
names the file and what is wrong, never a huge allocation or a traceback.

Tensors come out raw, in the NumPy (rows, cols) order that is Hugging Face's (out, in):
F32 as float32, F16 as float16, BF16 as its uint16 bits, and the block formats Q8_0,
Q4_0, Q4_1 as (rows, row bytes) uint8 (minilars.quant reads them).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from minilars import quant
from minilars.io.safetensors_io import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGML tensor types minilars reads: id -> name
TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 30: "BF16"}
# the other GGML types llama.cpp writes, named only to say which one a file holds
OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
               14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
               20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
               26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0"}
FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
# metadata value types: id -> struct format (None: string, array)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_DIMS = 4


class GGUFError(CheckpointError):
    """A GGUF file minilars cannot read: the message names the file and the key or tensor."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: str           # "F32", "Q4_1", ...
    shape: tuple        # NumPy order: (rows, cols) for a matrix
    offset: int         # absolute byte offset of its data in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: str
    version: int
    fields: dict        # key -> str, int, float, bool or a list of them
    tensors: dict       # name -> GGUFTensor, in file order


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated: {what} needs {n} bytes at offset "
                            f"{self.pos}, the file has {len(self.buf)}")
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} is not UTF-8") from None

    def value(self, vtype: int, what: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.unpack("<I", what), self.unpack("<Q", what)
            if etype == _ARRAY:
                raise GGUFError(f"{self.path}: {what} is an array of arrays, which minilars does not read")
            if count > len(self.buf) - self.pos:     # every element takes at least one byte
                raise GGUFError(f"{self.path}: {what} claims {count} elements, more than the "
                                f"file's remaining {len(self.buf) - self.pos} bytes")
            return [self.value(etype, what) for _ in range(count)]
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype}")


def _tensor_nbytes(path: str, name: str, ttype: str, shape: tuple) -> int:
    cols, rows = shape[-1], math.prod(shape[:-1])     # Python ints: 4 dims of 2^31 do not wrap
    if ttype in FLOAT_BYTES:
        return rows * cols * FLOAT_BYTES[ttype]
    fmt = ttype.lower()
    if cols % quant.BLOCK:
        raise GGUFError(f"{path}: tensor {name!r} of type {ttype} has {cols} columns, not a "
                        f"multiple of the block size {quant.BLOCK}")
    return rows * quant.row_bytes(fmt, cols)


def _read_tensor_info(cur: _Cursor, path: str) -> tuple:
    name = cur.string("a tensor name")
    n_dims = cur.unpack("<I", f"tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions; expected 1..{MAX_DIMS}")
    dims = [cur.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims)]
    type_id = cur.unpack("<I", f"tensor {name!r}")
    offset = cur.unpack("<Q", f"tensor {name!r}")
    if type_id not in TENSOR_TYPES:
        raise GGUFError(f"{path}: tensor {name!r} has GGML type {type_id} "
                        f"({OTHER_TYPES.get(type_id, 'unknown')}), which minilars does not read; "
                        f"supported: {', '.join(TENSOR_TYPES.values())} (requantize the file, "
                        f"e.g. with llama.cpp's llama-quantize to Q8_0 or Q4_1)")
    if any(d == 0 or d > 2**31 for d in dims):
        raise GGUFError(f"{path}: tensor {name!r} has dimensions {dims}")
    return name, tuple(reversed(dims)), TENSOR_TYPES[type_id], offset


def is_gguf(path: str) -> bool:
    """True when `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: str) -> GGUFFile:
    """The metadata and tensor table of a GGUF file, checked (no tensor data is read)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, path, os.path.getsize(path))
    except FileNotFoundError:
        raise GGUFError(f"{path}: file not found") from None
    except OSError as e:             # a folder, no permission
        raise GGUFError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:          # mmap of an empty file
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"{path}: not a GGUF file ({e})") from None


def _parse(buf, path: str, size: int) -> GGUFFile:
    cur = _Cursor(buf, path)
    if bytes(cur.take(4, "the magic")) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (the first bytes are not 'GGUF')")
    version = cur.unpack("<I", "the version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version}; minilars reads versions 2 and 3")
    n_tensors, n_fields = cur.unpack("<Q", "the tensor count"), cur.unpack("<Q", "the key count")
    if n_tensors > size // 24 or n_fields > size // 12:   # each entry takes at least that much
        raise GGUFError(f"{path}: the header claims {n_tensors} tensors and {n_fields} keys, "
                        f"more than a {size}-byte file can hold")
    fields = {}
    for _ in range(n_fields):
        key = cur.string("a metadata key")
        if key in fields:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice; expected each key once")
        fields[key] = cur.value(cur.unpack("<I", f"key {key!r}"), f"key {key!r}")
    infos = [_read_tensor_info(cur, path) for _ in range(n_tensors)]
    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
        raise GGUFError(f"{path}: general.alignment is {alignment!r}; expected a positive integer")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, shape, ttype, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice")
        nbytes = _tensor_nbytes(path, name, ttype, shape)
        begin = data_start + offset
        if offset % alignment or begin + nbytes > size:
            raise GGUFError(f"{path}: tensor {name!r} ({ttype} {list(shape)}, {nbytes} bytes) "
                            f"at data offset {offset} lies past the end of the {size}-byte "
                            f"file or off its {alignment}-byte alignment (truncated?)")
        tensors[name] = GGUFTensor(name, ttype, shape, begin, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise GGUFError(f"{path}: tensors {a!r} and {b!r} overlap")
    return GGUFFile(path, version, fields, tensors)


def tensor_data(gf: GGUFFile, tensor: GGUFTensor) -> np.ndarray:
    """One tensor's data, read into an array of its own: float32 (F32), float16 (F16),
    uint16 bits (BF16), or (rows, row bytes) uint8 blocks (Q8_0, Q4_0, Q4_1)."""
    dtype = np.dtype({"F32": "<f4", "F16": "<f2", "BF16": "<u2"}.get(tensor.type, np.uint8))
    with open(gf.path, "rb") as f:
        f.seek(tensor.offset)
        data = np.fromfile(f, dtype=dtype, count=tensor.nbytes // dtype.itemsize)
    if data.nbytes != tensor.nbytes:
        raise GGUFError(f"{gf.path}: tensor {tensor.name!r} is truncated")
    if tensor.type in FLOAT_BYTES:
        return data.reshape(tensor.shape)
    return data.reshape(int(np.prod(tensor.shape[:-1])), -1)
