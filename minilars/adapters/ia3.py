"""IA3 (Liu et al. 2022; Hugging Face PEFT layout): learned vectors, initialised to ones,
that scale a linear's output (k_proj, v_proj) or, for "feed-forward" targets (down_proj),
its input. PEFT's default for Llama: targets k_proj, v_proj, down_proj; feed-forward
down_proj.

  output scaling:  y = (x W^T + b) * l          l (out,)   stored (out, 1) as in PEFT
     keeps y0 = x W^T + b (..., out): dl = sum over rows of dy * y0.   dx = (dy * l) W
  input scaling:   y = (x * l) W^T + b          l (in,)    stored (1, in) as in PEFT
     keeps x (..., in): dl = sum over rows of x * (dy W).               dx = (dy W) * l

Few parameters, but each adapted linear keeps one (T, width) tensor for backward: the
paper's point that parameter efficiency is not memory efficiency.
Merge: W * l along the scaled side (and b * l for output scaling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from minilars.adapters.common import AdapterError, Site, config_linears, resolve_targets
from minilars.ops.linear import linear_backward, linear_forward
from minilars.saved import Keep

DEFAULT_TARGETS = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD = ("down_proj",)


@dataclass
class IA3:
    """IA3's settings. feedforward: the targets whose input, not output, is scaled
    (default: down_proj when it is a target)."""
    method: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"
    tensors: ClassVar[tuple] = ("ia3_l",)

    targets: tuple = DEFAULT_TARGETS
    feedforward: tuple | None = None

    def __post_init__(self):
        self.targets = resolve_targets(self.targets, DEFAULT_TARGETS)
        if self.feedforward is None:
            self.feedforward = tuple(t for t in DEFAULT_FEEDFORWARD if t in self.targets)
        else:
            self.feedforward = resolve_targets(self.feedforward, (), what="IA3 feedforward")
            stray = [t for t in self.feedforward if t not in self.targets]
            if stray:
                raise AdapterError(f"IA3 feedforward {stray[0]!r} is not one of the targets "
                                   f"({', '.join(self.targets)}); feed-forward modules must be "
                                   f"targets")

    # ---- tensors
    def shapes(self, linear: str, out_features: int, in_features: int) -> dict:
        """(1, in) for an input-scaled linear, (out, 1) for an output-scaled one."""
        return {"ia3_l": (1, in_features) if linear in self.feedforward else (out_features, 1)}

    def init(self, linear: str, out_features: int, in_features: int, rng, dtype) -> dict:
        """l = ones."""
        return {"ia3_l": np.ones(self.shapes(linear, out_features, in_features)["ia3_l"], dtype=dtype)}

    def trains(self, suffix: str) -> bool:
        return True

    # ---- forward and backward
    def saves(self, linear: str, x_buffer: str, x_shape: tuple, out_features: int, dtype) -> list:
        if linear in self.feedforward:
            return [Keep(linear, "x", x_shape, dtype, "dl = sum of x * (dy W) needs the input",
                         buffer=x_buffer)]
        return [Keep(linear, "y0", tuple(x_shape[:-1]) + (out_features,), dtype,
                     "dl = sum of dy * y0 needs the output before scaling")]

    def backward_workspace(self, linear: str, x_shape: tuple, out_features: int, dtype) -> int:
        """d(x * l) and dx (input scaling), or dy * l and dx (output scaling)."""
        rows, in_features = int(np.prod(x_shape[:-1])), x_shape[-1]
        width = in_features if linear in self.feedforward else out_features
        return rows * (width + in_features) * np.dtype(dtype).itemsize

    def forward(self, site: Site, x: np.ndarray, saved) -> np.ndarray:
        """x (..., in) -> y (..., out); keeps x (input scaling) or y0 (output scaling)."""
        l = site.tensors["ia3_l"].reshape(-1)
        if site.linear in self.feedforward:
            saved.keep(site.linear, "x", x)
            return linear_forward(x * l, site.W, site.b)
        y0 = saved.keep(site.linear, "y0", linear_forward(x, site.W, site.b))
        return y0 * l

    def backward(self, site: Site, dy: np.ndarray, saved, need_dx: bool = True):
        """Returns (dx or None, {"ia3_l": dl shaped like l})."""
        l_stored = site.tensors["ia3_l"]
        l = l_stored.reshape(-1)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if site.linear in self.feedforward:
            x = saved.get(site.linear, "x")
            dxs = linear_backward(dy, None, site.W, need_dx=True)[0]    # d(x * l)
            dl = np.einsum("nc,nc->c", dxs.reshape(-1, x.shape[-1]), x.reshape(-1, x.shape[-1]))
            dx = dxs * l if need_dx else None
        else:
            y0 = saved.get(site.linear, "y0")
            dl = np.einsum("nc,nc->c", dy2, y0.reshape(-1, y0.shape[-1]))
            dx = linear_backward(dy * l, None, site.W, need_dx=True)[0] if need_dx else None
        return dx, {"ia3_l": dl.reshape(l_stored.shape)}

    # ---- files
    def peft_config(self, layers) -> dict:
        # PEFT's IA3Config has no layers_to_transform (PEFT 0.21 warns about and ignores
        # the key): it is written only for a subset of layers, which minilars reads back
        extra = {} if layers is None else {"layers_to_transform": layers}
        return {**extra, "feedforward_modules": sorted(self.feedforward),
                "fan_in_fan_out": False, "init_ia3_weights": True}

    @classmethod
    def from_peft_config(cls, cfg: dict, folder: str) -> "IA3":
        """From an adapter_config.json (target_modules checked by read_adapter_config).
        feedforward_modules must be targets; missing or null is PEFT's default (down_proj
        when it is a target)."""
        targets = cfg["target_modules"]
        feedforward = config_linears(cfg, "feedforward_modules", folder, allowed=targets,
                                     required=False)
        return cls(targets=targets, feedforward=feedforward)

    def merge(self, site: Site):
        """W * l along the scaled side; output scaling also scales the bias."""
        l = site.tensors["ia3_l"]
        if site.linear in self.feedforward:
            return site.W * l.reshape(1, -1), site.b
        b = None if site.b is None else site.b * l.reshape(-1)
        return site.W * l.reshape(-1, 1), b

    # ---- command line
    @classmethod
    def add_options(cls, group) -> None:
        group.add_argument("--ia3-feedforward", default=None, metavar="LIST",
                           help="IA3 targets whose input (not output) is scaled (default down_proj)")

    @classmethod
    def from_options(cls, args) -> "IA3":
        return cls(targets=args.targets, feedforward=args.ia3_feedforward)
