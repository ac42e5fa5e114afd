"""Generation: the training blocks with a KV cache give the reference's logits position by
position (prefill, then one token at a time, with and without an adapter); greedy decoding
follows the argmax; sampling obeys top-p; a full cache and bad arguments are named errors."""
import numpy as np
import pytest

from minilars.adapters import LoRA, attach
from minilars.config import named_config
from minilars.generate import KVCache, forward_cached, generate, repeat_cache, sample_next
from minilars.model import Model, forward_logits
from minilars.reference import reference_logits
from tests.gradcheck import rel_err


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_cached_forward_equals_the_reference(name):
    cfg = named_config(name)
    model = Model.random(cfg, 3, np.float64)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 11))
    ref = reference_logits(cfg, model.params, tokens)                       # (2, 11, V)
    cache = KVCache.empty(model, 2, 11)
    assert rel_err(forward_cached(model, tokens[:, :6], cache), ref[:, 5]) < 1e-12
    for t in range(6, 11):                                                  # one at a time
        assert rel_err(forward_cached(model, tokens[:, t:t + 1], cache), ref[:, t]) < 1e-12
    assert cache.length == 11


def test_cached_forward_runs_the_adapter_too():
    cfg = named_config("tiny")
    model = attach(Model.random(cfg, 0, np.float64), LoRA(rank=2))
    for n in model.trainable:
        model.params[n] += 0.3 * np.random.default_rng(1).normal(size=model.params[n].shape)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(1, 8))
    full = forward_logits(model, tokens)
    cache = KVCache.empty(model, 1, 8)
    hidden_logits = forward_cached(model, tokens[:, :5], cache)
    assert rel_err(hidden_logits, full[:, 4]) < 1e-12
    assert rel_err(forward_cached(model, tokens[:, 5:8], cache), full[:, 7]) < 1e-12


def test_repeated_cache_continues_each_copy():
    cfg = named_config("tiny")
    model = Model.random(cfg, 0, np.float64)
    prompt = np.array([[5, 9, 2, 7]])
    cache = KVCache.empty(model, 1, 4)
    forward_cached(model, prompt, cache)
    conts = np.array([[1, 3], [4, 4]])
    hidden = forward_cached(model, conts, repeat_cache(cache, 2, 2), return_hidden=True)
    for b in range(2):
        whole = np.concatenate([prompt[0], conts[b]])[None]
        one = KVCache.empty(model, 1, 6)
        np.testing.assert_allclose(hidden[b], forward_cached(model, whole, one, return_hidden=True)[0, 4:],
                                   rtol=1e-12, atol=1e-12)


def test_greedy_generation_follows_the_argmax():
    cfg = named_config("tiny")
    model = Model.random(cfg, 4, np.float64)
    model.params["model.embed_tokens.weight"] *= 5          # logits far enough apart to be sure
    ids = [3, 1, 4]
    out = list(generate(model, ids, max_new_tokens=5))
    assert len(out) == 5
    seq = list(ids)
    for token in out:
        logits = reference_logits(cfg, model.params, np.array([seq]))[0, -1]
        assert token == int(np.argmax(logits))
        seq.append(token)
    eos = out[1]                                            # stops right after the first eos
    assert list(generate(model, ids, max_new_tokens=5, eos_ids=(eos,))) == out[:out.index(eos) + 1]


def test_top_p_keeps_the_smallest_set():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    seen = {sample_next(logits, 1.0, 0.7, rng) for _ in range(300)}
    assert seen == {0, 1}
    assert sample_next(logits, 0.0, 1.0, rng) == 0


def test_errors_are_named():
    cfg = named_config("tiny")
    model = Model.random(cfg, 0, np.float32)
    cache = KVCache.empty(model, 1, 4)
    with pytest.raises(ValueError, match="the KV cache holds 4 positions; 5 were asked for"):
        forward_cached(model, np.zeros((1, 5), dtype=np.int64), cache)
    assert cache.length == 0
    with pytest.raises(ValueError, match="the prompt is empty"):
        list(generate(model, []))
    with pytest.raises(ValueError, match="top_p"):
        list(generate(model, [1], top_p=0))
    with pytest.raises(ValueError, match=r"prompt has 300 tokens; the model allows 256"):
        list(generate(model, [1] * 300))
