"""The memory ledger: every byte of training memory, named.

Peak training memory = frozen weights + trainable parameters + their gradients + optimizer
state + live saved activations + live workspace, at the largest moment of a step. The
ledger holds the first five by name; the workspace is what the process really allocated
(tracemalloc traces NumPy's allocations) minus what the ledger names, reported as
"unattributed", never hidden.

Each entry is keyed (layer, op, name). Entries are counted by the buffer they keep alive,
not by the view: two names for one buffer (q, k and v all saving the same normalised
input, say) count once, and a view keeps its whole base buffer alive, so that is what it
costs. An entry is released when the backward that needed it has consumed it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from minilars.frozen import storage

RESIDENT = ("frozen", "trainable", "gradients", "optimizer", "activations")
CATEGORIES = RESIDENT + ("disk",)       # disk: held in a scratch file, not in memory


def owning_buffer(array: np.ndarray) -> np.ndarray:
    """The array that owns the memory `array` looks into (itself if it owns it)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def buffer_nbytes(array: np.ndarray) -> int:
    """Bytes held alive by `array`: its owning buffer's size; 0 for memory-mapped files,
    which the page cache holds rather than the process heap."""
    root = owning_buffer(array)
    if isinstance(root, np.memmap) or isinstance(root.base, mmap.mmap):
        return 0
    return root.nbytes


@dataclass
class Entry:
    category: str
    layer: int          # -1 for tensors outside the blocks (embedding, final norm, loss)
    op: str
    name: str
    shape: tuple
    dtype: str
    nbytes: int         # bytes of the owning buffer
    buffer_id: int
    why: str = ""       # the declaration's reason for keeping it (minilars.saved.Keep)


@dataclass
class Ledger:
    """Live bytes by category, with the peak and what was alive at the peak."""
    entries: dict = field(default_factory=dict)         # (layer, op, name) -> Entry
    names_by_op: dict = field(default_factory=dict)     # (layer, op) -> {name: None}, in order
    buffers: dict = field(default_factory=dict)         # buffer id -> [array, refcount, category]
    live: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak_total: int = 0
    peak_by_category: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak_entries: list = field(default_factory=list)    # entries alive at the peak
    peak_moment: tuple | None = None                    # the keep that made the peak
    max_by_category: dict = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    # ---- registering and releasing ----
    def keep(self, layer: int, op: str, name: str, array: np.ndarray,
             category: str = "activations", why: str = "") -> np.ndarray:
        """Register `array` as kept for backward (or as a parameter, gradient, optimizer
        state when `category` says so). Returns the array, so a forward can write
        `x = ledger.keep(...)`."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown ledger category {category!r}; expected one of {CATEGORIES}")
        key = (layer, op, name)
        if key in self.entries:
            self.release(layer, op, name)
        root = owning_buffer(array)
        bid = id(root)
        nbytes = buffer_nbytes(array)
        self.entries[key] = Entry(category, layer, op, name, tuple(array.shape),
                                  str(array.dtype), nbytes, bid, why)
        self.names_by_op.setdefault((layer, op), {})[name] = None
        if bid in self.buffers:
            self.buffers[bid][1] += 1
        else:
            self.buffers[bid] = [root, 1, category]
            self.live[category] += nbytes
            self._update_peak(key)
        return array

    def keep_on_disk(self, layer: int, op: str, name: str, shape: tuple, dtype, nbytes: int,
                     why: str = "") -> None:
        """Register bytes that wait in a scratch file: counted as "disk", never in the
        resident total."""
        key = (layer, op, name)
        if key in self.entries:
            self.release(layer, op, name)
        self.entries[key] = Entry("disk", layer, op, name, tuple(shape), str(np.dtype(dtype)),
                                  nbytes, id(key), why)
        self.names_by_op.setdefault((layer, op), {})[name] = None
        self.buffers[id(key)] = [None, 1, "disk"]
        self.live["disk"] += nbytes
        self._update_peak(key)

    def release(self, layer: int, op: str, name: str) -> None:
        entry = self.entries.pop((layer, op, name))
        names = self.names_by_op[(layer, op)]
        del names[name]
        if not names:
            del self.names_by_op[(layer, op)]
        slot = self.buffers[entry.buffer_id]
        slot[1] -= 1
        if slot[1] == 0:
            del self.buffers[entry.buffer_id]
            self.live[slot[2]] -= entry.nbytes

    def release_op(self, layer: int, op: str) -> None:
        """Release every name kept under (layer, op): an index, not a scan of every
        entry (the parameters among them), because a step releases ops hundreds of times."""
        for name in list(self.names_by_op.get((layer, op), ())):
            self.release(layer, op, name)

    def release_category(self, category: str) -> None:
        for key in [k for k, e in self.entries.items() if e.category == category]:
            self.release(*key)

    def _update_peak(self, moment=None) -> None:
        """moment: the (layer, op, name) just kept; at a new peak it becomes peak_moment."""
        for c, v in self.live.items():
            if v > self.max_by_category[c]:
                self.max_by_category[c] = v
        total = sum(self.live[c] for c in RESIDENT)
        if total > self.peak_total:
            self.peak_total = total
            self.peak_by_category = dict(self.live)
            self.peak_entries = list(self.entries.values())
            self.peak_moment = moment

    def reset_peak(self) -> None:
        self.peak_total = 0
        self.max_by_category = dict(self.live)
        self._update_peak()

    # ---- reading ----
    def live_entries(self, category: str | None = None) -> list[Entry]:
        return [e for e in self.entries.values() if category is None or e.category == category]

    def peak_table_by_op(self) -> list[dict]:
        """Saved activations alive at the peak, summed per (op, name) over layers."""
        rows: dict = defaultdict(lambda: {"count": 0, "bytes": 0, "shape": None, "dtype": None,
                                          "why": ""})
        seen = set()
        for e in self.peak_entries:
            if e.category != "activations":
                continue
            row = rows[(e.op, e.name)]
            row["count"] += 1
            row["shape"], row["dtype"], row["why"] = e.shape, e.dtype, e.why
            if e.buffer_id not in seen:      # a buffer shared by two names counts once
                seen.add(e.buffer_id)
                row["bytes"] += e.nbytes
        return [{"op": op, "name": name, **row} for (op, name), row in
                sorted(rows.items(), key=lambda kv: -kv[1]["bytes"])]


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def register_params(model, ledger: Ledger) -> None:
    """Every parameter into the ledger at the bytes it is held in (float16, GGUF blocks,
    ...): "trainable" if it trains, else "frozen"."""
    for name, array in model.params.items():
        category = "trainable" if name in model.trainable else "frozen"
        ledger.keep(-1, "param", name, storage(array), category=category)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30     # both thresholds: 1 GiB (mallopt takes a C int)
_kept = {"tried": False, "set": False}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it
    back to the system; every training step (model.forward_backward) calls this, and only
    the first call does anything (MINILARS_KEEP_FREED=0 leaves malloc as it is). True when
    set, False where malloc is not glibc's (nothing changes there).

    A training step frees its saved activations in the backward and allocates them again
    in the next forward. By default glibc returns a freed block above 128 KiB-32 MiB to
    the system (munmap, or trimming the heap's top), so every step's forward touches
    fresh pages and the kernel zero-fills each one on first touch: a LARS `layer` step at
    T=2048 on SmolLM2 took 132,000 page faults (about 520 MiB) and 1.0 s of system time
    per step, 21.2 s a step; kept, 12 faults, 0.07 s and 20.2 s. The peak is unchanged (a
    step reaches it anyway, and RSS stays there between steps as before): peak RSS
    measured at most 1 MiB above the default's (LARS, T=512 and 2048), and 14 MiB below
    it for LoRA at T=2048."""
    if _kept["tried"]:
        return _kept["set"]
    _kept["tried"] = True
    if os.environ.get("MINILARS_KEEP_FREED") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept["set"] = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                        and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return _kept["set"]


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory() took effect in this process (so far)."""
    return _kept["set"]


def _status_bytes(key: str) -> int:
    """A kB field of /proc/self/status in bytes (Linux); 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM), Linux; 0 where unknown."""
    return _status_bytes("VmHWM:")


def current_rss_bytes() -> int:
    """This process's resident set now (VmRSS; 0 where unknown): the runtime a run of
    minilars starts from (Python, NumPy, the C core, the tokenizer's library)."""
    return _status_bytes("VmRSS:")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
