"""Tutorial 5: will it fit? Planning a fine-tune for a 512 MB board.

Run: `python tutorials/05_fit_a_small_board.py` (`MINILARS_FAST=1` for smaller sizes)

A Raspberry Pi Zero 2 W has 512 MB. Before a long download and a long run, we want to know
whether a fine-tune fits, and what to change if it does not. minilars declares every tensor
a step keeps, with its shape, so the peak can be worked out from shapes alone: this
tutorial plans a LARS step on SmolLM2-135M, then shrinks it the three ways minilars has
(frozen weights as 4-bit blocks, block checkpoints in a file, the MLP by row blocks),
checks each against a real step, and lets the budget search choose.

Peak RSS = runtime baseline (Python, NumPy, minilars: about 60 MiB, measured when a run
starts) + the ledger's peak + the workspace beside it. The baseline is this machine's, so
the tutorial fixes it at 60 MiB to print the same page everywhere.
"""
import os

import numpy as np

from minilars import kernels, quant
from minilars.config import named_config
from minilars.frozen import freeze, to_float
from minilars.lab.memory_curve import build_model, measure_lengths
from minilars.memory import Ledger, mib
from minilars.model import StepOptions, forward_backward, next_token_targets, zero_grads
from minilars.plan import Setting, fitting_settings, plan_model, predict, replay_step

FAST = os.environ.get("MINILARS_FAST") == "1"
BASELINE = 60 * 2**20
cfg = named_config("smollm2-135m")
T = 2048

# %% 1. The plan of a plain step --------------------------------------------------------
# `predict` replays the step's declared keeps and releases through the ledger's rule; it
# allocates nothing, so planning T=2048 takes a fraction of a second.
plain = predict(cfg, "lars", seq=T, opts=StepOptions(policy="layer"), baseline=BASELINE)
print(f"LARS on SmolLM2-135M, T={T}, policy layer, float32 frozen weights:")
for category, nbytes in plain["peak_by_category"].items():
    if nbytes:
        print(f"  {category:<12} {mib(nbytes):7.1f} MiB")
print(f"  workspace    {mib(plain['workspace_bytes']):7.1f} MiB  (at {plain['workspace_moment']})")
print(f"  predicted peak RSS {mib(plain['peak_rss_bytes']):.1f} MiB: over 512 MB before we start")

# %% 2. Frozen weights as 4-bit blocks --------------------------------------------------
# Q4_1, as llama.cpp stores it: 32 weights share a float16 scale d and minimum m, and each
# weight is a 4-bit q, w = d*q + m. 20 bytes hold what float32 keeps in 128.
rng = np.random.default_rng(0)
row = (0.02 * rng.standard_normal((1, 64))).astype(np.float32)
blocks = quant.quantize(row, "q4_1")
back = quant.dequantize(blocks, "q4_1", 64)
print(f"one row of 64 weights: {row.nbytes} bytes in float32, {blocks.nbytes} in Q4_1; "
      f"largest error {np.abs(back - row).max() / np.abs(row).max():.3f} of the largest weight")
for form in (None, "float16", "q8_0", "q4_1"):
    p = predict(cfg, "lars", seq=T, opts=StepOptions(policy="layer"), frozen_dtype=form,
                baseline=BASELINE, slope=False)
    print(f"  frozen {form or 'float32':<8} {mib(p['peak_by_category']['frozen']):6.1f} MiB of weights, "
          f"predicted peak RSS {mib(p['peak_rss_bytes']):6.1f} MiB")

# %% 3. The kernels work on the blocks ---------------------------------------------------
# y = x W^T and dx = dy W dequantize one tile of W at a time into a small buffer and
# multiply by it; W never exists whole in float32. The NumPy twin (dequantize all of W,
# then multiply) is the specification.
W32 = (0.02 * rng.standard_normal((96, 64))).astype(np.float32)
W = freeze(W32, "q4_1")
x = rng.standard_normal((5, 64)).astype(np.float32)
dy = rng.standard_normal((5, 96)).astype(np.float32)
y_spec, dx_spec = x @ to_float(W).T, dy @ to_float(W)
y, dx = kernels.matmul_xwT(x, W), kernels.matmul_dyW(dy, W)
print(f"x W^T on Q4_1 blocks agrees with dequantize-then-multiply to 1e-6 relative: "
      f"{np.abs(y - y_spec).max() / np.abs(y_spec).max() < 1e-6}")
print(f"dy W on Q4_1 blocks agrees with dequantize-then-multiply to 1e-6 relative: "
      f"{np.abs(dx - dx_spec).max() / np.abs(dx_spec).max() < 1e-6}")

# %% 4. Block checkpoints in a file ------------------------------------------------------
# With --checkpoints disk each block's input is written to a scratch file in forward and
# read back, into one reused buffer, in backward: exact, and not resident. bf16 halves the
# checkpoints in RAM but rounds them. A real step on a small model shows both.
small = named_config("tiny") if FAST else cfg.replace(num_hidden_layers=4)
T_small = 64 if FAST else 256
model = build_model(small, "lars", frozen_dtype="q4_1")
tokens = rng.integers(0, small.vocab_size, size=(1, T_small))
targets = next_token_targets(tokens)
grads = {}
for store in ("ram", "disk", "bf16"):
    ledger = Ledger()
    grads[store] = zero_grads(model)
    forward_backward(model, tokens, targets, grads[store], StepOptions(policy="layer", checkpoints=store), ledger)
    print(f"  checkpoints {store:<4}: saved activations at the peak "
          f"{ledger.peak_by_category['activations']:>10,} bytes, on disk {ledger.peak_by_category['disk']:>9,} bytes")
same = all(np.array_equal(grads["ram"][k], grads["disk"][k]) for k in grads["ram"])
worst = max(np.abs(grads["bf16"][k] - grads["ram"][k]).max() / np.abs(grads["ram"][k]).max()
            for k in grads["ram"])
print(f"disk gradients equal ram's bit for bit: {same}; bf16's largest error {worst:.1e} of a tensor's largest")

# %% 5. The plan equals the measured ledger, to the byte ---------------------------------
plan_of, sizes = plan_model(small, "lars", frozen_dtype="q4_1")
# measure_lengths runs a real step with the weights, gradients and AdamW state in its ledger
for store in ("ram", "disk"):
    opts = StepOptions(policy="layer", checkpoints=store)
    measured = measure_lengths(model, [T_small], opts)[0]
    replay = replay_step(plan_of, sizes, 1, T_small, opts)
    print(f"  {store:<4}: planned {replay.peak_total:,} bytes, measured {measured['ledger_peak']:,} bytes")

# %% 6. Let the budget search choose -----------------------------------------------------
# Given a budget, the search tries the policy, the checkpoint store, the frozen form, the
# loss's chunk and the MLP's row blocks, and lists what fits, cheapest extra time first,
# each needing less memory than every cheaper one (`minilars plan --budget 320MiB`). A
# setting fits when its predicted peak RSS plus 5% does: the planner has run up to 4% below
# a measured peak, and a budget is a limit.
start = Setting("layer", "ram", None, 128, 1, T)
for budget_mib in (512, 320):
    fits = fitting_settings(cfg, "lars", None, start, budget_mib * 2**20, StepOptions(policy="layer"),
                            baseline=BASELINE)
    print(f"budget {budget_mib} MiB:")
    for setting, plan, factor in fits:
        print(f"  {mib(plan['peak_rss_bytes']):6.1f} MiB, ~{factor:.2f}x time: "
              f"{' '.join(setting.changes(start)) or '(as asked)'}")
