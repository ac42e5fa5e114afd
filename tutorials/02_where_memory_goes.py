"""Tutorial 2: where fine-tuning memory goes.

Run: `python tutorials/02_where_memory_goes.py` (`MINILARS_FAST=1` for smaller sizes)

Peak training memory = frozen weights + trainable weights + gradients + optimizer state +
the activations saved for backward + workspace. The first four do not depend on the
sequence length T; the saved activations grow with it. The ledger names every saved
tensor, and tracemalloc says what the process really allocated, so nothing is estimated.
"""
import os
import tracemalloc

import numpy as np

from minilars.config import named_config
from minilars.lab.memory_curve import build_model, measure_lengths, slope_per_token
from minilars.memory import Ledger, mib
from minilars.model import StepOptions, forward_backward, next_token_targets, zero_grads

FAST = os.environ.get("MINILARS_FAST") == "1"
arch = "tiny" if FAST else "smollm2-135m"
T = 64 if FAST else 512

# %% 1. One step, every saved tensor by name ----------------------------------------------
tracemalloc.start()
model = build_model(named_config(arch), "full")
rows = measure_lengths(model, [T], StepOptions(policy="none"))
r = rows[0]
print(f"{arch}, full fine-tuning, T={T}, policy none")
for category, nbytes in r["peak_by_category"].items():
    print(f"  {category:<12} {mib(nbytes):8.1f} MiB")
print(f"  ledger peak  {mib(r['ledger_peak']):8.1f} MiB")
# tracemalloc's peak moves a little from run to run; its ratio to the ledger's, to 2 places, does not
print(f"  traced peak  {r['traced_peak'] / r['ledger_peak']:8.2f} x the ledger peak (the rest is workspace)")
print("  largest saved tensors at the peak (summed over layers):")
for op in r["per_op"][:6]:
    print(f"    {op['op']:<10} {op['name']:<6} x{op['count']:<3} {mib(op['bytes']):8.2f} MiB")

# %% 2. Recompute: keep only each block's input ------------------------------------------
# With policy "layer" a block keeps just its input h (T x C); its backward first re-runs
# the block's forward. Saved bytes per token drop by ~10x for one extra forward.
lengths = [32, 64] if FAST else [256, 512]
for policy in ("none", "layer"):
    rows = measure_lengths(model, lengths, StepOptions(policy=policy))
    print(f"policy {policy:<5}: saved bytes per token {slope_per_token(rows):>10,.0f}")
tracemalloc.stop()

# %% 3. The checkpoints are exactly L x T x C floats ----------------------------------------
cfg = model.cfg
ledger = Ledger()
grads = zero_grads(model)
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, T))
forward_backward(model, tokens, next_token_targets(tokens), grads, StepOptions(policy="layer"), ledger)
checkpoints = sum(e.nbytes for e in ledger.peak_entries if e.op == "checkpoint")
print(f"checkpointed block inputs at the peak: {checkpoints:,} bytes = "
      f"{cfg.num_hidden_layers} x {T} x {cfg.hidden_size} x 4")
assert checkpoints <= cfg.num_hidden_layers * T * cfg.hidden_size * 4
