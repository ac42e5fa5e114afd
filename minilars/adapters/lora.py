"""LoRA on a frozen linear (Hu et al. 2021; Hugging Face PEFT layout).

    y = x W^T (+ b) + s * (drop(x) A^T) B^T,    s = alpha / r
    A (r, in) uniform in +-1/sqrt(in),  B (out, r) zeros,  so y starts equal to the base.

Keeps for backward, and why:
    x   (..., in)  dA = (s dy B)^T drop(x) needs the layer input. This is the tensor that
                   makes LoRA's memory grow with T: one (T, in) input per adapted linear
                   (q, k and v share theirs, and gate and up theirs).
    xa  (..., r)   drop(x) A^T, for dB = s dy^T xa. Tiny (r = 8 numbers per token).
    With dropout, not the mask: the mask is regenerated in backward from its seed.
Backward: dxa = s dy B;  dB = s dy^T xa;  dA = dxa^T drop(x);  dx = dy W + drop'(dxa A).
Merge: W + s B A.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from minilars.adapters.common import (AdapterError, Site, check_rank, config_value,
                                      resolve_targets)
from minilars.ops.linear import linear_backward, linear_forward
from minilars.params import LINEAR_NAMES
from minilars.saved import Keep


@dataclass
class LoRA:
    """LoRA's settings; one LoRA config serves every linear it adapts."""
    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    tensors: ClassVar[tuple] = ("lora_A.weight", "lora_B.weight")

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = LINEAR_NAMES

    def __post_init__(self):
        self.targets = resolve_targets(self.targets, LINEAR_NAMES)
        self.rank = check_rank(self.rank)
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # ---- tensors
    def shapes(self, linear: str, out_features: int, in_features: int) -> dict:
        return {"lora_A.weight": (self.rank, in_features), "lora_B.weight": (out_features, self.rank)}

    def init(self, linear: str, out_features: int, in_features: int, rng, dtype) -> dict:
        """A (r, in) uniform +-1/sqrt(in) (PEFT's kaiming-uniform with a=sqrt(5)), B (out, r) zeros."""
        shape = self.shapes(linear, out_features, in_features)
        bound = 1.0 / np.sqrt(in_features)
        return {"lora_A.weight": rng.uniform(-bound, bound, size=shape["lora_A.weight"]).astype(dtype),
                "lora_B.weight": np.zeros(shape["lora_B.weight"], dtype=dtype)}

    def trains(self, suffix: str) -> bool:
        return True

    # ---- forward and backward
    def saves(self, linear: str, x_buffer: str, x_shape: tuple, out_features: int, dtype) -> list:
        lead = tuple(x_shape[:-1])
        return [Keep(linear, "x", x_shape, dtype, "dA = dxa^T drop(x) needs the layer input",
                     buffer=x_buffer),
                Keep(linear, "xa", lead + (self.rank,), dtype,
                     "drop(x) A^T, r numbers per token, for dB")]

    def backward_workspace(self, linear: str, x_shape: tuple, out_features: int, dtype) -> int:
        """dx = dy W and dxa A (and drop(x) with dropout), each (..., in)."""
        n = int(np.prod(x_shape)) * np.dtype(dtype).itemsize
        return (3 if self.dropout else 2) * n

    def _mask(self, site: Site, dropout_key: tuple, shape) -> np.ndarray:
        """Keep-mask scaled by 1/(1-p): the same for a given (seed, step, module)."""
        key = list(dropout_key) + [ord(c) for c in site.module]
        keep = np.random.default_rng(key).random(shape) >= self.dropout
        return keep / (1.0 - self.dropout)

    def forward(self, site: Site, x: np.ndarray, saved) -> np.ndarray:
        """x (..., in) -> y (..., out); keeps x and xa. Dropout only in training forwards."""
        A, B = site.tensors["lora_A.weight"], site.tensors["lora_B.weight"]
        saved.keep(site.linear, "x", x)
        use_dropout = saved.training and self.dropout > 0
        xd = x * self._mask(site, saved.dropout_key, x.shape).astype(x.dtype) if use_dropout else x
        xa = saved.keep(site.linear, "xa", linear_forward(xd, A))       # (..., r)
        y = linear_forward(x, site.W, site.b)                            # (..., out)
        y += linear_forward(self.scale * xa, B)     # scale the (..., r) factor: one (..., out) temporary
        return y

    def backward(self, site: Site, dy: np.ndarray, saved, need_dx: bool = True):
        """Returns (dx or None, {suffix: gradient})."""
        A, B = site.tensors["lora_A.weight"], site.tensors["lora_B.weight"]
        x, xa = saved.get(site.linear, "x"), saved.get(site.linear, "xa")
        dy2 = dy.reshape(-1, dy.shape[-1])                              # (N, out)
        dB = self.scale * (dy2.T @ xa.reshape(-1, xa.shape[-1]))        # (out, r)
        dxa = self.scale * (dy2 @ B)                                    # (N, r)
        mask = (self._mask(site, saved.dropout_key, x.shape).astype(x.dtype)
                if self.dropout > 0 else None)
        xd = x if mask is None else x * mask
        dA = dxa.T @ xd.reshape(-1, x.shape[-1])                        # (r, in)
        dx = None
        if need_dx:
            dx = linear_backward(dy, None, site.W, need_dx=True)[0]
            dxd = (dxa @ A).reshape(x.shape)
            dx += dxd if mask is None else dxd * mask
        return dx, {"lora_A.weight": dA, "lora_B.weight": dB}

    # ---- files
    def peft_config(self, layers) -> dict:
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                "use_rslora": False, "use_dora": False, "layers_to_transform": layers,
                "layers_pattern": None}

    @classmethod
    def from_peft_config(cls, cfg: dict, folder: str) -> "LoRA":
        """From an adapter_config.json (target_modules checked by read_adapter_config).
        PEFT's LoRA variants minilars does not compute (rsLoRA, DoRA, fan-in/fan-out
        weights, per-module ranks or alphas, trained biases) are refused, not ignored."""
        for key, what in (("use_rslora", "rsLoRA's alpha / sqrt(r) scale"),
                          ("use_dora", "DoRA"), ("fan_in_fan_out", "(in, out) weights")):
            config_value(cfg, key, "bool", folder, required=False, valid=lambda v: not v,
                         expected=f"false (minilars's LoRA has no {what})")
        for key in ("rank_pattern", "alpha_pattern"):
            config_value(cfg, key, "object", folder, required=False, valid=lambda v: not v,
                         expected="{} (one r and one lora_alpha for every module)")
        config_value(cfg, "bias", "str", folder, required=False, valid=lambda v: v == "none",
                     expected="'none' (LoRA trains no biases here)")
        return cls(rank=config_value(cfg, "r", "int", folder, valid=lambda r: r >= 1,
                                     expected="an integer >= 1"),
                   alpha=config_value(cfg, "lora_alpha", "float", folder),
                   dropout=config_value(cfg, "lora_dropout", "float", folder, 0.0,
                                        required=False, valid=lambda p: 0 <= p < 1,
                                        expected="a number in [0, 1)"),
                   targets=cfg["target_modules"])

    def merge(self, site: Site):
        """(W + s B A, b)."""
        A, B = site.tensors["lora_A.weight"], site.tensors["lora_B.weight"]
        return site.W + self.scale * (B @ A), site.b

    # ---- command line
    @classmethod
    def add_options(cls, group) -> None:
        group.add_argument("--lora-alpha", type=float, default=cls.alpha,
                           help=f"LoRA alpha (default {cls.alpha:g})")
        group.add_argument("--lora-dropout", type=float, default=cls.dropout,
                           help=f"LoRA dropout (default {cls.dropout:g})")

    @classmethod
    def from_options(cls, args) -> "LoRA":
        """From the parsed command line (--targets and --rank are shared by adapters)."""
        return cls(rank=cls.rank if args.rank is None else args.rank, alpha=args.lora_alpha,
                   dropout=args.lora_dropout, targets=args.targets)
