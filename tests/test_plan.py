"""The planner (minilars.plan) predicts the ledger of a real step to the byte: the peak, the
peak's categories and moment, the per-category maxima, on a grid of methods, policies,
checkpoint stores, attention forms, frozen forms, batches and lengths."""
import itertools

import numpy as np
import pytest

from minilars.adapters import IA3, LARS, LoRA
from minilars.config import named_config
from minilars.lab.memory_curve import build_model, measure_lengths
from minilars.model import StepOptions
from minilars.plan import plan_model, replay_step

ADAPTERS = {"full": None, "lora": LoRA(rank=3), "ia3": IA3(),
            "lars": LARS(rank=3, block=16), "lars-keep": LARS(rank=2, block=8, save="keep"),
            "lora-qv": LoRA(rank=2, targets="q_proj,v_proj")}
OPTS = {"none": StepOptions(policy="none", tile=8),
        "none-plain": StepOptions(policy="none", attention="plain", ce_chunk=7),
        "layer": StepOptions(policy="layer", tile=16),
        "layer-bf16": StepOptions(policy="layer", checkpoints="bf16"),
        "layer-disk": StepOptions(policy="layer", checkpoints="disk")}


def _measured(cfg, method, adapter, opts, frozen, B, T):
    model = build_model(cfg, "full" if method == "full" else method.split("-")[0],
                        frozen_dtype=frozen, adapter=adapter)
    row = measure_lengths(model, [T], opts, batch=B)[0]
    return row


CASES = [(c, m, o, f, bt) for c, m, o, f, bt in itertools.product(
    ["tiny", "tiny-qwen2"], ADAPTERS, OPTS, [None, "float16"], [(1, 16), (2, 37)])
    if not (m == "full" and f)]


@pytest.mark.parametrize("name, method, opts, frozen, bt", CASES,
                         ids=[f"{c}-{m}-{o}-{f or 'f32'}-{b}x{t}" for c, m, o, f, (b, t) in CASES])
def test_the_plan_is_the_ledger_to_the_byte(name, method, opts, frozen, bt):
    cfg, (B, T) = named_config(name), bt
    adapter = ADAPTERS[method]
    kind = "full" if method == "full" else method.split("-")[0]
    model, sizes = plan_model(cfg, kind, adapter, frozen_dtype=frozen)
    plan = replay_step(model, sizes, B, T, OPTS[opts])
    got = _measured(cfg, method, adapter, OPTS[opts], frozen, B, T)
    assert plan.peak_total == got["ledger_peak"]
    assert plan.peak_by_category == got["peak_by_category"]
    assert plan.max_by_category["activations"] == got["activations_peak"]
    assert plan.peak_moment == got["peak_moment"]
