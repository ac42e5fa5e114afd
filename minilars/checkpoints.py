"""Where the `layer` policy keeps its block checkpoints between a block's forward and its
backward: the only activations that grow with T for the whole step.

    ram    the block input itself, float (B, T, C) per layer: exact
    bf16   its bfloat16 bits, half the bytes; the recompute starts from the rounded
           input, so gradients are close to, not equal to, those of ram (measured in
           tests/test_checkpoints.py)
    disk   written to a scratch file in forward (plain sequential writes), read back in
           backward into one reused (B, T, C) buffer: exact, and resident memory no longer
           grows with T beyond one block's working set. The file lives in `directory`
           (a temp dir by default) and is deleted when the step ends, also on an error.

Each store keeps its bytes in the ledger under (layer, "checkpoint", "block_input"): as
activations (ram, bf16) or as "disk", which is never part of the resident total.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from minilars.frozen import bf16_bits, bf16_values
from minilars.saved import Keep, Saved

CHECKPOINT_STORES = ("ram", "bf16", "disk")
WHY = {"ram": "policy layer: the backward recomputes the block from its input",
       "bf16": "policy layer: the block input in bfloat16, rounded back for the recompute",
       "disk": "policy layer: the block input, in the scratch file until the backward"}


def checkpoint_keep(kind: str, shape: tuple, dtype) -> Keep:
    """The declaration of one layer's checkpoint in store `kind`."""
    if kind == "bf16":
        return Keep("checkpoint", "block_input", shape, np.uint16, WHY[kind])
    if kind == "disk":                           # in the file: no memory to share
        return Keep("checkpoint", "block_input", shape, dtype, WHY[kind], category="disk")
    return Keep("checkpoint", "block_input", shape, dtype, WHY[kind], buffer="h_in")


def read_buffer_keep(shape: tuple, dtype) -> Keep:
    """The disk store's one read-back buffer (layer -1): each recompute's input in turn."""
    return Keep("checkpoint", "read_buffer", shape, dtype,
                "disk store: the block input read back for the recompute", buffer="h_in")


class RamStore:
    """Block inputs kept as they are."""

    def __init__(self, ledger, shape: tuple, dtype):
        self.ledger, self.shape, self.dtype = ledger, tuple(shape), np.dtype(dtype)
        self.held = {}

    def _saved(self, layer: int) -> Saved:
        keep = checkpoint_keep(self.kind, self.shape, self.dtype)
        return Saved(self.ledger, layer, {(keep.op, keep.name): keep})

    kind = "ram"

    def put(self, layer: int, h: np.ndarray) -> None:
        self.held[layer] = self._saved(layer)
        self.held[layer].keep("checkpoint", "block_input", h)

    def take(self, layer: int) -> np.ndarray:
        return self.held[layer].get("checkpoint", "block_input")

    def release(self, layer: int) -> None:
        self.held.pop(layer).release("checkpoint")

    def close(self) -> None:
        for layer in list(self.held):
            RamStore.release(self, layer)


class Bf16Store(RamStore):
    """Block inputs kept as bfloat16 bits; take() rounds them back to the compute dtype
    and lets the bits go (the recompute keeps the float copy)."""
    kind = "bf16"

    def put(self, layer: int, h: np.ndarray) -> None:
        self.held[layer] = self._saved(layer)
        self.held[layer].keep("checkpoint", "block_input", bf16_bits(h))

    def take(self, layer: int) -> np.ndarray:
        h = bf16_values(super().take(layer)).astype(self.dtype, copy=False)
        super().release(layer)
        return h

    def release(self, layer: int) -> None:
        pass                                     # take() already did


class DiskStore:
    """Block inputs in a scratch file, layer i at offset i * bytes-per-input; read back into
    one reused buffer. Writes and reads are plain (no memory map whose pages would stay
    resident); an error names the file."""
    kind = "disk"

    def __init__(self, ledger, shape: tuple, dtype, directory: str | None = None,
                 outer: Saved | None = None):
        self.ledger, self.shape, self.dtype = ledger, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.outer, self.buffer = outer, None
        directory = directory or tempfile.gettempdir()
        try:
            fd, self.path = tempfile.mkstemp(prefix="minilars-checkpoints-", suffix=".bin",
                                             dir=directory)
        except OSError as e:
            raise OSError(f"checkpoint store: cannot create a scratch file in {directory}: "
                          f"{e.strerror or e}") from None
        self.file = os.fdopen(fd, "r+b", buffering=0)

    def put(self, layer: int, h: np.ndarray) -> None:
        data = np.ascontiguousarray(h, dtype=self.dtype)
        try:
            self.file.seek(layer * self.nbytes)
            self.file.write(memoryview(data).cast("B"))
        except OSError as e:
            raise OSError(f"checkpoint store {self.path}: writing layer {layer}'s block input "
                          f"({self.nbytes} bytes) failed: {e.strerror or e}") from None
        keep = checkpoint_keep("disk", self.shape, self.dtype)
        self.ledger.keep_on_disk(layer, keep.op, keep.name, keep.shape, keep.dtype,
                                 self.nbytes, keep.why)

    def take(self, layer: int) -> np.ndarray:
        if self.buffer is None:
            self.buffer = np.empty(self.shape, dtype=self.dtype)
            if self.outer is not None:
                self.outer.keep("checkpoint", "read_buffer", self.buffer)
        self.file.seek(layer * self.nbytes)
        got = self.file.readinto(memoryview(self.buffer).cast("B"))
        if got != self.nbytes:
            raise OSError(f"checkpoint store {self.path}: layer {layer}'s block input is "
                          f"{got} of {self.nbytes} bytes (the file was cut short)")
        return self.buffer

    def release(self, layer: int) -> None:
        self.ledger.release(layer, "checkpoint", "block_input")

    def close(self) -> None:
        """Delete the file (also after an error) and forget what it held."""
        for key in [k for k, e in self.ledger.entries.items()
                    if e.category == "disk" and k[1] == "checkpoint"]:
            self.ledger.release(*key)
        if self.outer is not None and self.buffer is not None:
            self.outer.release("checkpoint")
        self.file.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def open_store(kind: str, ledger, shape: tuple, dtype, directory: str | None = None,
               outer: Saved | None = None):
    """The checkpoint store `kind` for (B, T, C) block inputs of `dtype`."""
    if kind == "ram":
        return RamStore(ledger, shape, dtype)
    if kind == "bf16":
        return Bf16Store(ledger, shape, dtype)
    if kind == "disk":
        return DiskStore(ledger, shape, dtype, directory, outer)
    raise ValueError(f"unknown checkpoint store {kind!r}; expected one of {CHECKPOINT_STORES}")
