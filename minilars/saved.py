"""What a forward keeps for its backward: declared before it exists, then held and counted.

Every op declares the tensors it keeps (its saved set) as a function of shapes and
settings, the way llm.c's ActivationTensors lists every activation buffer:

    Keep(op="attn_norm", name="rstd", shape=(B, T), dtype="float32",
         why="one number per row; the backward needs it and would otherwise redo a reduction")

A block's declaration is the concatenation of its ops' declarations (model.block_saved).
Two names may share one buffer (q, k and v's adapters all keep the same normalised input):
their Keeps then carry the same `buffer` name, and the buffer's bytes count once, as the
ledger counts them. The step keeps tensors through `Saved`, which refuses a tensor that
was not declared, or one whose shape or dtype differs from its declaration, and whose
`get` raises for a name that was never kept. So the declaration the memory planner reads
is checked on every real step: it cannot drift from what the code keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minilars.memory import Ledger


@dataclass(frozen=True)
class Keep:
    """One tensor an op keeps for its backward.
    buffer: the name of the memory it lives in. Keeps with the same buffer name share
    bytes (a view, or one array kept under two names); by default each has its own.
    category: "activations" (in memory), or "disk" (waiting in a scratch file)."""
    op: str
    name: str
    shape: tuple
    dtype: str
    why: str
    buffer: str = ""
    category: str = "activations"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)
        if not self.buffer:
            object.__setattr__(self, "buffer", f"{self.op}.{self.name}")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def declared_bytes(keeps) -> int:
    """Resident bytes of the distinct buffers behind `keeps` (a shared buffer counts once;
    what waits on disk does not count)."""
    sizes = {}
    for k in keeps:
        if k.category != "activations":
            continue
        sizes[k.buffer] = max(sizes.get(k.buffer, 0), k.nbytes)
    return sum(sizes.values())


class UndeclaredTensor(KeyError):
    """A tensor kept without a declaration, against a different one, or read without
    having been kept: the saved set and its declaration disagree."""

    def __str__(self):
        return str(self.args[0])


@dataclass
class Saved:
    """What one layer keeps for its backward, by (op, name), mirrored in the ledger.

    declared:  (op, name) -> Keep, what this layer may keep. None: keep nothing (a
               forward-only pass, or a block that policy "layer" will recompute).
    training:  whether this forward is part of a training step (LoRA dropout applies).
    dropout_key: (seed, step) from which dropout masks are drawn, so a recompute and the
               backward regenerate the same masks instead of keeping them.
    """
    ledger: Ledger | None
    layer: int
    declared: dict | None = None
    training: bool = True
    dropout_key: tuple = (0, 0)
    tensors: dict = field(default_factory=dict)

    @classmethod
    def nothing(cls, training: bool = False, dropout_key: tuple = (0, 0)) -> "Saved":
        """A store that keeps nothing: inference, and forwards that are not differentiated."""
        return cls(None, -1, None, training, dropout_key)

    @property
    def enabled(self) -> bool:
        return self.declared is not None

    def keep(self, op: str, name: str, array: np.ndarray) -> np.ndarray:
        """Hold `array` for the backward (when enabled); it must match its declaration."""
        if self.declared is None:
            return array
        spec = self.declared.get((op, name))
        if spec is None:
            raise UndeclaredTensor(f"layer {self.layer}: {op}.{name} is kept but not declared "
                                   f"in this layer's saved set ({len(self.declared)} tensors)")
        if tuple(array.shape) != spec.shape or array.dtype.name != spec.dtype:
            raise UndeclaredTensor(f"layer {self.layer}: {op}.{name} is kept as {array.shape} "
                                   f"{array.dtype}, declared {spec.shape} {spec.dtype}")
        self.tensors[(op, name)] = array
        self.ledger.keep(self.layer, op, name, array, why=spec.why)
        return array

    def get(self, op: str, name: str) -> np.ndarray:
        try:
            return self.tensors[(op, name)]
        except KeyError:
            raise UndeclaredTensor(f"layer {self.layer}: {op}.{name} was never kept "
                                   f"(kept: {sorted(f'{o}.{n}' for o, n in self.tensors)})") from None

    def release(self, op: str) -> None:
        """The backward of `op` is done with its tensors."""
        for key in [k for k in self.tensors if k[0] == op]:
            del self.tensors[key]
        self.ledger.release_op(self.layer, op)
