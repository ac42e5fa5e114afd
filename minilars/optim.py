"""AdamW (decoupled weight decay) and gradient-norm clipping, in place over dicts of arrays.

    m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr * wd * p

State: two arrays (m, v) per trainable tensor, allocated at the first step and registered
in the ledger as "optimizer" memory: for full fine-tuning that is twice the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from minilars.memory import Ledger


OPTIM_SLAB = 1 << 18    # entries updated at once: temporaries of at most 1 MiB in float32


def _adamw_update(p, g, m, v, lr, b1, b2, bc1, bc2, eps, decay):
    """One AdamW update of a 1-D slab, in place on p, m, v."""
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * np.square(g)
    if decay:
        p *= 1.0 - decay
    denom = np.sqrt(v / bc2)
    denom += eps
    p -= (lr / bc1) * m / denom


def clip_grad_norm(grads: dict, max_norm: float | None) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping (inf/nan when a gradient is not finite: callers should stop)."""
    total = float(np.sqrt(sum(float(np.vdot(g, g)) for g in grads.values())))
    if max_norm is not None and max_norm > 0 and np.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= scale
    return total


@dataclass
class AdamW:
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: tuple = ("norm.weight", ".bias")   # name endings that never decay
    step_count: int = 0
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    def init_state(self, params: dict, names, ledger: Ledger | None = None) -> None:
        for name in names:
            if name not in self.m:
                self.m[name] = np.zeros(params[name].shape, dtype=params[name].dtype)
                self.v[name] = np.zeros(params[name].shape, dtype=params[name].dtype)
                if ledger is not None:
                    ledger.keep(-1, "adamw", name + ":m", self.m[name], category="optimizer")
                    ledger.keep(-1, "adamw", name + ":v", self.v[name], category="optimizer")

    def step(self, params: dict, grads: dict, lr: float | None = None,
             ledger: Ledger | None = None) -> None:
        """Update params[name] in place for every name in grads."""
        lr = self.lr if lr is None else lr
        self.init_state(params, grads, ledger)
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.step_count
        bc2 = 1.0 - b2 ** self.step_count
        for name, g in grads.items():
            decay = lr * self.weight_decay if not name.endswith(self.no_decay) else 0.0
            p, m, v = params[name].reshape(-1), self.m[name].reshape(-1), self.v[name].reshape(-1)
            g = g.reshape(-1)
            # in slabs, so the temporaries stay small next to a 28M-entry embedding
            for s0 in range(0, g.size, OPTIM_SLAB):
                sl = slice(s0, s0 + OPTIM_SLAB)
                _adamw_update(p[sl], g[sl], m[sl], v[sl], lr, b1, b2, bc1, bc2, self.eps, decay)

    def state_dict(self) -> dict:
        """Arrays and scalars for checkpoints (names prefixed m./v.)."""
        arrays = {f"m.{k}": a for k, a in self.m.items()}
        arrays.update({f"v.{k}": a for k, a in self.v.items()})
        return {"arrays": arrays, "step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.m = {k[2:]: np.array(a) for k, a in state["arrays"].items() if k.startswith("m.")}
        self.v = {k[2:]: np.array(a) for k, a in state["arrays"].items() if k.startswith("v.")}
