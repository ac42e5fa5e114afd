"""The PyTorch side of `minilars bench compare`: the same training step in PyTorch 2 +
transformers + PEFT, timed the same way. Imported only inside its own worker process
(it needs the optional `reference` extra: torch, transformers, peft). Run as
`python -m minilars.lab.torch_side '<cell JSON>' THREADS STEPS` by compare.run_side.

The model is transformers' LlamaForCausalLM built from minilars's ModelConfig, random
weights in float32 (speed does not depend on the values). LoRA and IA3 are PEFT's, with
minilars's defaults (LoRA r=8, alpha 16, dropout 0 on all seven linears; IA3 on k, v and
down's input). LARS is DESIGN.md's definition written in plain PyTorch (`LARSLinear`),
since PEFT has no LARS. Recompute `layer` is transformers' gradient checkpointing of each
decoder layer, which is what minilars's `layer` policy does.
"""
from __future__ import annotations

import json
import sys
import time

import peft
import torch
import transformers
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from minilars.config import ModelConfig, named_config
from minilars.memory import peak_rss_bytes
from minilars.params import LINEAR_NAMES


class LARSLinear(torch.nn.Module):
    """y = W x~, x~ = x with block j of `block` features scaled by 1 + alpha s_j,
    s = (rmsnorm(x) U) V, around a frozen nn.Linear; U, V and alpha train."""

    def __init__(self, base: torch.nn.Linear, rank: int = 8, block: int = 32,
                 alpha: float = 0.1, eps: float = 1e-5):
        super().__init__()
        n_in = base.in_features
        self.base, self.block, self.eps = base, block, eps
        self.U = torch.nn.Parameter(torch.empty(n_in, rank).uniform_(-n_in ** -0.5, n_in ** -0.5))
        self.V = torch.nn.Parameter(torch.randn(rank, n_in // block) * 1e-4)
        self.alpha = torch.nn.Parameter(torch.tensor([alpha]))

    def forward(self, x):                                           # x (..., in)
        z = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        gate = 1 + self.alpha * ((z @ self.U) @ self.V)             # (..., in/block)
        blocks = x.unflatten(-1, (-1, self.block)) * gate.unsqueeze(-1)
        return self.base(blocks.flatten(-2))


def attach_lars(model: LlamaForCausalLM, targets=LINEAR_NAMES) -> LlamaForCausalLM:
    """Freeze every weight and wrap each target linear of each layer in LARSLinear."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:
        for part in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(part, name):
                    setattr(part, name, LARSLinear(getattr(part, name)))
    return model


def build(cfg: ModelConfig, method: str, policy: str, seed: int = 0):
    """transformers' model of cfg with `method` on it, gradient checkpointing for `layer`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg.to_dict(), use_cache=False))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=list(LINEAR_NAMES)))
    elif method == "ia3":
        model = get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
    elif method == "lars":
        model = attach_lars(model)
    if policy == "layer":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):        # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def step_seconds(cfg: ModelConfig, method: str, policy: str, seq: int, batch: int,
                 steps: int, threads: int) -> list[float]:
    """Seconds of each of `steps` training steps (forward, backward, clip, AdamW) after
    one warm-up step, on `threads` threads."""
    torch.set_num_threads(threads)
    model = build(cfg, method, policy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return times


def versions() -> str:
    return (f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, peft {peft.__version__}")


def _main(cell_json: str, n_threads: str, steps: str) -> None:
    """The PyTorch side's worker: one JSON line of compare.run_side's result on stdout."""
    cell = json.loads(cell_json)
    times = step_seconds(named_config(cell["arch"]), cell["method"], cell["policy"], cell["seq"],
                         cell["batch"], int(steps), int(n_threads))
    print(json.dumps({"seconds": times, "rss_peak": peak_rss_bytes(), "about": versions()}))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
