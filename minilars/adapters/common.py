"""What every adapter shares: the linear it sits on (Site), its target list, its error, and
the checked reading of adapter_config.json values."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from minilars.params import LINEAR_NAMES


class AdapterError(ValueError):
    """Adapter options or files that do not fit the model: the message names the option,
    file or key, what was found and what was expected."""


@dataclass
class Site:
    """One frozen linear y = x W^T (+ b) with an adapter on it, as the adapter's forward
    and backward see it. The adapter's own tensors for this linear are `tensors`, keyed by
    the adapter's suffixes (they live in model.params as module + "." + suffix)."""
    layer: int
    linear: str                 # "q_proj"
    module: str                 # "model.layers.3.self_attn.q_proj"
    W: np.ndarray               # (out, in), frozen
    b: np.ndarray | None        # (out,) or None, frozen
    tensors: dict               # suffix -> array


def resolve_targets(targets, default: tuple, what: str = "targets") -> tuple[str, ...]:
    """A tuple of linear names, in the block's order (so the same set always draws the
    same init), from None (the default), "all-linear", a comma string or a list; unknown
    names are refused with the list of valid ones."""
    if targets is None:
        return tuple(default)
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if targets == ["all-linear"]:
        return LINEAR_NAMES
    for t in targets:
        if t not in LINEAR_NAMES:
            raise AdapterError(f"{what[:-1] if what.endswith('s') else what} {t!r} does not "
                               f"exist in a Llama block; available targets: "
                               f"{', '.join(LINEAR_NAMES)} or all-linear")
    if not targets and what == "targets":
        raise AdapterError("no adapter targets given")
    return tuple(t for t in LINEAR_NAMES if t in targets)


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise AdapterError(f"rank must be an integer, got {rank!r}")
    if rank < 1:
        raise AdapterError(f"rank must be at least 1, got {rank}")
    return int(rank)


_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def config_value(cfg: dict, key: str, kind: str, folder: str, default=None, required=True):
    """cfg[key] from an adapter_config.json, checked: a missing required key, a null, or a
    value of the wrong kind ("int", "float", "bool", "str") is an AdapterError that names
    the file, the key, what was found and what was expected."""
    path = os.path.join(folder, "adapter_config.json")
    if key not in cfg or cfg[key] is None:
        if required:
            raise AdapterError(f"{path}: key {key!r} is missing; expected {kind}")
        return default
    value = cfg[key]
    ok = isinstance(value, _KINDS[kind]) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        raise AdapterError(f"{path}: key {key!r} is {value!r}; expected {kind}")
    return float(value) if kind == "float" else value
