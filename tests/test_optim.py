"""AdamW and gradient clipping: a step computed by hand, decay skipped for norms and
biases, clipping to the max norm, and the optimizer state round trip."""
import math

import numpy as np
import pytest

import minilars.optim as optim
from minilars.memory import Ledger
from minilars.optim import AdamW, clip_grad_norm


def test_single_step_by_hand():
    p = np.array([1.0, -2.0, 3.0])
    g = np.array([0.1, -0.2, 0.0])
    opt = AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    params, grads = {"w.weight": p.copy()}, {"w.weight": g.copy()}
    opt.step(params, grads)
    # first step: m = 0.1 g, v = 0.001 g^2; bias-corrected m^ = g, v^ = g^2;
    # p <- p (1 - lr wd) - lr g / (|g| + eps)
    expected = [1.0 * (1 - 0.1 * 0.01) - 0.1 * 0.1 / (0.1 + 1e-8),
                -2.0 * (1 - 0.1 * 0.01) - 0.1 * -0.2 / (0.2 + 1e-8),
                3.0 * (1 - 0.1 * 0.01) - 0.0]
    np.testing.assert_allclose(params["w.weight"], expected, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(opt.m["w.weight"], [0.01, -0.02, 0.0], rtol=1e-14)
    np.testing.assert_allclose(opt.v["w.weight"], [1e-5, 4e-5, 0.0], rtol=1e-12)
    assert opt.step_count == 1

    # second step with g2: m = 0.9 m + 0.1 g2, v = 0.999 v + 0.001 g2^2, bc1 = 0.19, bc2 = 0.001999
    g2 = np.array([0.3, 0.0, -0.1])
    before = params["w.weight"].copy()
    opt.step(params, {"w.weight": g2.copy()})
    m = 0.9 * np.array([0.01, -0.02, 0.0]) + 0.1 * g2
    v = 0.999 * np.array([1e-5, 4e-5, 0.0]) + 0.001 * g2 ** 2
    want = before * (1 - 0.001) - 0.1 * (m / 0.19) / (np.sqrt(v / (1 - 0.999 ** 2)) + 1e-8)
    np.testing.assert_allclose(params["w.weight"], want, rtol=1e-13)


def test_weight_decay_skips_norms_and_biases():
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight",
             "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"]
    params = {n: np.full(3, 2.0) for n in names}
    grads = {n: np.zeros(3) for n in names}          # no gradient: only the decay moves p
    AdamW(lr=0.5, weight_decay=0.1).step(params, grads)
    np.testing.assert_allclose(params[names[0]], 2.0 * (1 - 0.5 * 0.1))
    for n in names[1:]:
        np.testing.assert_array_equal(params[n], 2.0)


def test_slabs_give_the_same_update(monkeypatch):
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    a, b = {"w": p.copy()}, {"w": p.copy()}
    AdamW(lr=0.01, weight_decay=0.1).step(a, {"w": g.copy()})
    monkeypatch.setattr(optim, "OPTIM_SLAB", 4)     # 35 entries in 9 slabs
    AdamW(lr=0.01, weight_decay=0.1).step(b, {"w": g.copy()})
    np.testing.assert_array_equal(a["w"], b["w"])


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0], [4.0]])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(5.0)
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    assert total == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grads["b"], [[0.0], [0.8]], rtol=1e-6)
    # below the max, or no max: untouched
    small = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small["a"], [0.3, 0.4])
    assert clip_grad_norm({"a": np.array([30.0, 40.0])}, None) == pytest.approx(50.0)
    bad = {"a": np.array([np.inf, 1.0])}
    assert not math.isfinite(clip_grad_norm(bad, 1.0))
    assert bad["a"][1] == 1.0


def test_state_dict_round_trip():
    rng = np.random.default_rng(1)
    params = {"w.weight": rng.standard_normal((3, 2)), "b.bias": rng.standard_normal(3)}
    gs = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    a = AdamW(lr=0.01, weight_decay=0.05)
    pa = {k: v.copy() for k, v in params.items()}
    for g in gs[:2]:
        a.step(pa, {k: v.copy() for k, v in g.items()})
    state = a.state_dict()
    assert set(state["arrays"]) == {"m.w.weight", "v.w.weight", "m.b.bias", "v.b.bias"}
    b = AdamW(lr=0.01, weight_decay=0.05)
    b.load_state_dict(state)
    assert b.step_count == 2
    pb = {k: v.copy() for k, v in pa.items()}
    for g in gs[2:]:
        a.step(pa, {k: v.copy() for k, v in g.items()})
        b.step(pb, {k: v.copy() for k, v in g.items()})
    for k in params:
        np.testing.assert_array_equal(pa[k], pb[k])
    # the loaded state is a copy: stepping `a` did not change what `b` loaded from
    assert not np.shares_memory(b.m["w.weight"], a.m["w.weight"])


def test_optimizer_state_in_the_ledger():
    params = {"w.weight": np.zeros((4, 4), dtype=np.float32)}
    led = Ledger()
    AdamW().init_state(params, params, led)
    assert led.live["optimizer"] == 2 * params["w.weight"].nbytes
