"""The PyTorch side of `minilars bench compare` is the same model as minilars's: its plain
PyTorch LARS (minilars.lab.torch_side) gives minilars's logits on the same weights, and a
tiny compare run goes through both sides' fresh processes. Needs the reference extra."""
import json

import numpy as np
import pytest

from minilars.cli import main
from minilars.config import named_config
from minilars.lab.memory_curve import build_model
from minilars.model import forward_logits

pytestmark = pytest.mark.reference


def test_torch_lars_gives_minilars_logits(torch):
    from minilars.lab import torch_side
    cfg = named_config("tiny")
    ours = build_model(cfg, "lars")
    rng = np.random.default_rng(1)
    for name in ours.params:            # V of std 0.1 and alpha 0.5, so the gates matter
        if name.endswith("lars_V"):
            ours.params[name][...] = rng.normal(0, 0.1, ours.params[name].shape)
        if name.endswith("lars_alpha"):
            ours.params[name][...] = 0.5
    theirs = torch_side.build(cfg, "lars", "none")
    state = {}
    for name, value in ours.params.items():
        linear, _, suffix = name.rpartition(".")
        if suffix.startswith("lars_"):
            state[f"{linear}.{suffix[len('lars_'):]}"] = value
        elif suffix == "weight" and linear.split(".")[-1] in torch_side.LINEAR_NAMES:
            state[f"{linear}.base.weight"] = value
        else:
            state[name] = value
    missing, unexpected = theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                                 strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)   # tied to the embedding
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(1, 12))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(tokens)).logits.numpy()
    plain = forward_logits(build_model(cfg, "full"), tokens)
    got = forward_logits(ours, tokens)
    assert np.abs(got - ref).max() < 2e-5
    assert np.abs(got - plain).max() > 1e-2                 # the gates changed the logits


def test_bench_compare_runs_both_sides_on_tiny(torch, capsys):
    assert main(["bench", "compare", "--arch", "tiny", "--method", "lars,lora", "--policy", "none,layer",
                 "--seq", "32", "--rounds", "1", "--steps", "1", "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)                                 # JSON alone on stdout
    assert report["threads"] == 1 and report["gemm_flops_per_s"] > 1e8
    assert report["gemm_flops_per_s_at_end"] > 1e8             # measured again after the last row
    assert any(line.startswith("BLAS: ") for line in report["about"])      # the kernel is stated
    rows = report["rows"]
    assert [(r["method"], r["policy"]) for r in rows] == [("lars", "none"), ("lars", "layer"),
                                                          ("lora", "none"), ("lora", "layer")]
    for r in rows:
        for side in ("minilars", "torch"):
            assert r[side]["seconds"] > 0 and r[side]["rss_peak"] > 10 * 2**20
            assert r[side]["spread"] >= 0
        assert "torch 2" in r["about"]["torch"]
