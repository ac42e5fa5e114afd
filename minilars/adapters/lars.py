"""LARS (Low-memory Activation-Rank Subspace, arXiv 2604.22783) on a frozen linear.

    y = W x~ (+ b),  x~ = x with block j of Bk features scaled by gate_j = 1 + alpha s_j,
    s = (rmsnorm(x) U) V           U (in, r), V (r, in/Bk), alpha a scalar

The gate's math, forward and backward, is minilars.ops.lars_gate (the C kernels' twin);
this module is the adapter around it: its settings, tensors and init, what it keeps, its
file layout, and why it cannot be merged.

Init: U uniform in +-1/sqrt(in) (u_init="in", minilars's default) or +-1/sqrt(r)
(u_init="rank", the authors' other variant); V normal with std 1e-4; alpha = 0.1. So the
adapted model starts equal to the base to about 1e-5.

Keeps for backward (save="recompute", the default): x only. The backward recomputes rstd,
z, zU and s from x (one (N, in) x (in, r) product, ~r/out of the linear's own cost). x is
the same buffer for every linear that reads it (q, k, v share one; gate and up share one),
so the attention and MLP inputs cost one (T, C) tensor each, however many linears are
adapted. save="keep" also keeps rstd (N, 1), z (N, in), zU (N, r) and s (N, g) of each
linear: no recompute, but each adapted linear adds its own (T, in) z.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from minilars import kernels
from minilars.adapters.common import (AdapterError, Site, check_rank, config_value,
                                      resolve_targets)
from minilars.ops.lars_gate import apply_gate, lars_gate_backward, lars_gate_statistics
from minilars.ops.linear import linear_backward, linear_forward
from minilars.params import LINEAR_NAMES
from minilars.saved import Keep

SAVE_MODES = ("recompute", "keep")
U_INITS = ("in", "rank")


@dataclass
class LARS:
    """LARS's settings. alpha is the initial value of the trainable (or, with
    train_alpha=False, frozen) gate scale."""
    method: ClassVar[str] = "lars"
    peft_type: ClassVar[str] = "LARS"
    tensors: ClassVar[tuple] = ("lars_U", "lars_V", "lars_alpha")

    rank: int = 8
    block: int = 32
    alpha: float = 0.1
    train_alpha: bool = True
    eps: float = 1e-5
    u_init: str = "in"
    save: str = "recompute"
    targets: tuple = LINEAR_NAMES

    def __post_init__(self):
        self.targets = resolve_targets(self.targets, LINEAR_NAMES)
        self.rank = check_rank(self.rank)
        if isinstance(self.block, bool) or not isinstance(self.block, (int, np.integer)) \
                or self.block < 1:
            raise AdapterError(f"LARS block size must be a positive integer, got {self.block!r}")
        if self.save not in SAVE_MODES:
            raise AdapterError(f"LARS save must be one of {SAVE_MODES}, got {self.save!r}")
        if self.u_init not in U_INITS:
            raise AdapterError(f"LARS u_init must be one of {U_INITS}, got {self.u_init!r}")
        if not self.eps > 0:
            raise AdapterError(f"LARS eps must be positive, got {self.eps}")

    # ---- tensors
    def shapes(self, linear: str, out_features: int, in_features: int) -> dict:
        """U (in, r), V (r, in/block), alpha (1,); the block must divide the input width."""
        if in_features % self.block:
            raise AdapterError(f"LARS block size {self.block} does not divide the input width "
                               f"{in_features} of {linear}; choose a divisor of {in_features}")
        return {"lars_U": (in_features, self.rank), "lars_V": (self.rank, in_features // self.block),
                "lars_alpha": (1,)}

    def init(self, linear: str, out_features: int, in_features: int, rng, dtype) -> dict:
        shape = self.shapes(linear, out_features, in_features)
        bound = 1.0 / np.sqrt(in_features if self.u_init == "in" else self.rank)
        return {"lars_U": rng.uniform(-bound, bound, size=shape["lars_U"]).astype(dtype),
                "lars_V": rng.normal(0.0, 1e-4, size=shape["lars_V"]).astype(dtype),
                "lars_alpha": np.full(shape["lars_alpha"], self.alpha, dtype=dtype)}

    def trains(self, suffix: str) -> bool:
        return suffix != "lars_alpha" or self.train_alpha

    # ---- forward and backward
    def saves(self, linear: str, x_buffer: str, x_shape: tuple, out_features: int, dtype) -> list:
        keeps = [Keep(linear, "x", x_shape, dtype, "the gate's backward recomputes everything "
                      "else from the input", buffer=x_buffer)]
        if self.save == "keep":
            N, in_features = int(np.prod(x_shape[:-1])), x_shape[-1]
            why = "save='keep': kept instead of recomputed from x"
            keeps += [Keep(linear, "rstd", (N, 1), dtype, why),
                      Keep(linear, "z", (N, in_features), dtype, why),
                      Keep(linear, "zU", (N, self.rank), dtype, why),
                      Keep(linear, "s", (N, in_features // self.block), dtype, why)]
        return keeps

    def backward_workspace(self, linear: str, x_shape: tuple, out_features: int, dtype) -> int:
        """dx~ = dy W and dx, each (..., in) (the fused gate kernel's scratch is small;
        the NumPy twin's is larger)."""
        return 2 * int(np.prod(x_shape)) * np.dtype(dtype).itemsize

    def forward(self, site: Site, x: np.ndarray, saved) -> np.ndarray:
        """x (..., in) -> y (..., out) = W x~ (+ b); keeps x (and with save="keep" the
        gate's statistics)."""
        U, V, alpha = (site.tensors[k] for k in self.tensors)
        x2d = x.reshape(-1, x.shape[-1])                                # (N, in)
        saved.keep(site.linear, "x", x)
        if self.save == "keep":
            rstd, z, zU, s, gate = lars_gate_statistics(x2d, U, V, alpha, self.eps)
            for name, array in (("rstd", rstd), ("z", z), ("zU", zU), ("s", s)):
                saved.keep(site.linear, name, array)
            x_tilde = apply_gate(x2d, gate)
        else:
            x_tilde = kernels.lars_gate_forward(x2d, U, V, alpha, self.block, self.eps)
        return linear_forward(x_tilde.reshape(x.shape), site.W, site.b)

    def backward(self, site: Site, dy: np.ndarray, saved, need_dx: bool = True):
        """Returns (dx or None, {suffix: gradient}). dx~ = dy W is always needed: the gate's
        gradients come from it, even when dx is not."""
        U, V, alpha = (site.tensors[k] for k in self.tensors)
        x = saved.get(site.linear, "x")
        in_features = x.shape[-1]
        dx_tilde = linear_backward(dy, None, site.W, need_dx=True)[0]   # (..., in)
        x2d, dxt2d = x.reshape(-1, in_features), dx_tilde.reshape(-1, in_features)
        if self.save == "keep":
            stats = tuple(saved.get(site.linear, n) for n in ("rstd", "z", "zU", "s"))
            dx, dU, dV, dalpha = lars_gate_backward(dxt2d, x2d, U, V, alpha, self.block,
                                                    self.eps, need_dx, statistics=stats)
        else:
            dx, dU, dV, dalpha = kernels.lars_gate_backward(dxt2d, x2d, U, V, alpha,
                                                            self.block, self.eps, need_dx)
        dx = dx.reshape(x.shape) if dx is not None else None
        return dx, {"lars_U": dU, "lars_V": dV, "lars_alpha": np.reshape(dalpha, (1,))}

    # ---- files
    def peft_config(self, layers) -> dict:
        extra = {} if layers is None else {"layers_to_transform": layers}
        return {**extra, "r": self.rank, "block_size": self.block, "eps": self.eps,
                "train_alpha": self.train_alpha, "saved_for_backward": self.save}

    @classmethod
    def from_peft_config(cls, cfg: dict, folder: str) -> "LARS":
        """From an adapter_config.json (target_modules checked by read_adapter_config)."""
        return cls(rank=config_value(cfg, "r", "int", folder, valid=lambda r: r >= 1,
                                     expected="an integer >= 1"),
                   block=config_value(cfg, "block_size", "int", folder, valid=lambda b: b >= 1,
                                      expected="an integer >= 1"),
                   eps=config_value(cfg, "eps", "float", folder, valid=lambda e: e > 0,
                                    expected="a positive number"),
                   train_alpha=config_value(cfg, "train_alpha", "bool", folder),
                   save=config_value(cfg, "saved_for_backward", "str", folder, "recompute",
                                     required=False, valid=lambda v: v in SAVE_MODES,
                                     expected=" or ".join(map(repr, SAVE_MODES))),
                   targets=cfg["target_modules"])

    def merge(self, site: Site):
        raise AdapterError("LARS cannot be merged into the base weights: its gate depends on "
                           "each input; keep the adapter file beside the base model")

    # ---- command line
    @classmethod
    def add_options(cls, group) -> None:
        group.add_argument("--block", type=int, default=cls.block,
                           help=f"LARS block size Bk (default {cls.block})")
        group.add_argument("--lars-alpha", type=float, default=cls.alpha,
                           help=f"LARS initial alpha (default {cls.alpha:g})")
        group.add_argument("--lars-freeze-alpha", action="store_true", help="LARS: do not train alpha")
        group.add_argument("--lars-eps", type=float, default=cls.eps,
                           help=f"LARS norm epsilon (default {cls.eps:g})")
        group.add_argument("--lars-u-init", choices=U_INITS, default=cls.u_init,
                           help="LARS U init: uniform +-1/sqrt(in) (default) or +-1/sqrt(r)")
        group.add_argument("--lars-save", choices=SAVE_MODES, default=cls.save,
                           help="LARS backward: recompute z and s from the input (default) "
                                "or keep them")

    @classmethod
    def from_options(cls, args) -> "LARS":
        return cls(rank=cls.rank if args.rank is None else args.rank, block=args.block,
                   alpha=args.lars_alpha, train_alpha=not args.lars_freeze_alpha,
                   eps=args.lars_eps, u_init=args.lars_u_init, save=args.lars_save,
                   targets=args.targets)
