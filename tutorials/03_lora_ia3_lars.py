"""Tutorial 3: what LoRA, IA3 and LARS keep for backward.

Run: `python tutorials/03_lora_ia3_lars.py` (`MINILARS_FAST=1` for smaller sizes)

All three freeze the base model. A frozen linear y = x W^T needs nothing from its forward
to pass gradients down (dx = dy W), so under full fine-tuning each linear keeps its input
x, and under an adapter it keeps whatever the adapter's own gradients need:

- LoRA: x (for dA) and x A^T (r numbers per token, for dB)
- IA3: the pre-scale output (k, v) or the input (down_proj)
- LARS: x, from which the backward recomputes the RMS statistic, z U and the gate

The rest of a block (attention's q, k, v, output; the MLP's gate and up) is kept by every
method alike. So the adapter itself changes little; what changes memory a lot is the
recompute policy. This tutorial measures both.
"""
import os
import tracemalloc

from minilars.adapters import adapter_for, trainable_report
from minilars.config import named_config
from minilars.lab.memory_curve import build_model, measure_lengths, slope_per_token
from minilars.memory import mib
from minilars.model import StepOptions

FAST = os.environ.get("MINILARS_FAST") == "1"
arch = "tiny" if FAST else "smollm2-135m"
lengths = [32, 64] if FAST else [256, 512]
cfg = named_config(arch)

# %% 1. Each adapter under each recompute policy --------------------------------------------
# One real forward + backward + AdamW step per length for every (method, policy): the
# ledger's peak at the longest length, the saved bytes per token (the slope of the peak
# against T) and the trainable parameters. For LARS without recompute, what it keeps.
print(f"{arch}: peak MiB at T={lengths[-1]}, saved bytes per token, trainable parameters")
results = {}
for method in ("lora", "ia3", "lars"):
    for policy in ("none", "layer"):
        tracemalloc.start()
        settings = {"block": 16} if FAST and method == "lars" else {}   # tiny: 4 gates on 64 features
        model = build_model(cfg, method, adapter=adapter_for(method, **settings))
        rows = measure_lengths(model, lengths, StepOptions(policy=policy))
        tracemalloc.stop()
        rep = trainable_report(model)
        results[method, policy] = rows[-1]["ledger_peak"]
        print(f"  {method:<5} {policy:<6} {mib(rows[-1]['ledger_peak']):8.1f} MiB "
              f"{slope_per_token(rows):>10,.0f} B/token {rep['trainable']:>10,} "
              f"({rep['percent']:.2f}%)")
        if policy == "none" and method == "lars":
            print("    what LARS keeps per layer, summed over layers:")
            for op in rows[-1]["per_op"][:8]:
                print(f"      {op['op']:<10} {op['name']:<5} {mib(op['bytes']):8.2f} MiB")

# %% 2. The adapter, or the recompute policy? ------------------------------------------------
# Same policy: the ratio is what the adapter saves. LARS with recompute against LoRA without
# it mixes the adapter with the policy, and credits the adapter with the policy's saving.
for policy in ("none", "layer"):
    print(f"LARS / LoRA peak, policy {policy}: {results['lars', policy] / results['lora', policy]:.3f}")
print(f"LARS with layer / LoRA with none: {results['lars', 'layer'] / results['lora', 'none']:.3f}"
      "  <- the comparison that mixes a method with a recompute policy")
