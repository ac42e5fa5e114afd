"""What every adapter shares: the linear it sits on (Site), its target list, its error, and
the checked reading of adapter_config.json values."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from minilars.config import shown
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


_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a finite number"),
          "bool": ((bool,), "true or false"), "str": ((str,), "a string"),
          "object": ((dict,), "an object")}


def _absent(cfg: dict, key: str) -> str | None:
    """"missing" or "null" when an adapter_config.json gives no value for key, else None."""
    return "missing" if key not in cfg else "null" if cfg[key] is None else None


def config_value(cfg: dict, key: str, kind: str, folder: str, default=None, required=True,
                 valid=None, expected: str | None = None):
    """cfg[key] from an adapter_config.json, checked: a missing required key, a null where
    a value is required, a value of the wrong kind ("int", "float", "bool", "str", "object"; 8.7 is
    not an int, true is not a number, NaN is not finite) or one that `valid(value)` refuses
    is an AdapterError naming the file, the key, what was found and what was `expected`
    (default: the kind). A missing or null optional key gives `default`."""
    path = os.path.join(folder, "adapter_config.json")
    types, kind_text = _KINDS[kind]
    expected = expected or kind_text
    if _absent(cfg, key):
        if required:
            raise AdapterError(f"{path}: key {key!r} is {_absent(cfg, key)}; expected {expected}")
        return default
    value = cfg[key]
    ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
    ok = ok and (kind != "float" or math.isfinite(value)) and (valid is None or valid(value))
    if not ok:
        raise AdapterError(f"{path}: key {key!r} is {shown(value)}; expected {expected}")
    return float(value) if kind == "float" else value


def config_linears(cfg: dict, key: str, folder: str, allowed=LINEAR_NAMES,
                   required=True) -> list | None:
    """cfg[key] from an adapter_config.json as a list of linear names, each one of
    `allowed` ("all-linear", PEFT's shorthand, is all seven); a regex string, a number or
    an unknown name is an AdapterError naming the file and the key. A missing or null
    optional key gives None."""
    path = os.path.join(folder, "adapter_config.json")
    expected = f"a list of module names among {', '.join(allowed)}"
    if _absent(cfg, key):
        if required:
            raise AdapterError(f"{path}: key {key!r} is {_absent(cfg, key)}; expected {expected}")
        return None
    names = cfg[key]
    if names in ("all-linear", ["all-linear"]):
        names = list(LINEAR_NAMES)
    if isinstance(names, str):
        raise AdapterError(f"{path}: key {key!r} is the pattern {shown(names)}; regex "
                           f"patterns are not supported: list the module names")
    if not isinstance(names, list):
        raise AdapterError(f"{path}: key {key!r} is {shown(names)}; expected {expected}")
    for name in names:
        if not isinstance(name, str) or name not in allowed:
            raise AdapterError(f"{path}: key {key!r} lists {shown(name)}; expected {expected}")
    return names
