"""The real SmolLM2 GGUF, loaded directly (Q4_1 linears and Q8_0 embedding kept as blocks),
against the fetched float32 folder (the same file dequantized): the same logits, and the
same LARS gradients, within float32 reordering. Measured here (third prompt, 32 tokens):
logits equal exactly (max |difference| 0.0: forward dequantizes a tile of output rows and
multiplies it with the same BLAS, so no sum is reordered); gradients differ by 9.1e-6
relative over the whole gradient, median 8.7e-6 per tensor, because dx = dy W sums over
W's rows tile by tile. The largest per-tensor difference, 8.7e-4, is a LARS alpha: one
scalar summed over every token and feature, where terms cancel. Asserted: logits within
1e-5 of their largest, the whole gradient within 1e-4, each tensor within 5e-3 of its
largest entry."""
import os

import numpy as np
import pytest

from minilars.adapters import LARS, attach
from minilars.frozen import Packed
from minilars.model import StepOptions, forward_backward, forward_logits, next_token_targets, zero_grads
from minilars.train import load_base

pytestmark = pytest.mark.reference
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GGUF = os.path.join(ROOT, "weights", "smollm2-135m.Q4_1.gguf")


@pytest.fixture(scope="module")
def gguf_base():
    if not os.path.isfile(GGUF):
        pytest.skip(f"{GGUF} is missing; run `minilars fetch smollm2-135m`")
    return load_base(GGUF)


def test_the_gguf_keeps_its_blocks(gguf_base):
    model, _ = gguf_base
    forms = {W.format for W in model.params.values() if isinstance(W, Packed)}
    assert forms == {"q4_1", "q8_0"}


def test_gguf_logits_equal_the_float32_folders(gguf_base, base, prompts):
    g, f = gguf_base[0], base[0]
    for tokens in prompts:
        lg, lf = forward_logits(g, tokens), forward_logits(f, tokens)
        assert np.abs(lg - lf).max() <= 1e-5 * np.abs(lf).max()


def test_lars_gradients_on_the_blocks_equal_the_dequantized_models(gguf_base, smollm2_folder, prompts):
    models = [attach(load_base(GGUF)[0], LARS(rank=4, block=32), seed=3),
              attach(load_base(smollm2_folder)[0], LARS(rank=4, block=32), seed=3)]
    tokens = prompts[2]
    grads = []
    for model in models:
        g = zero_grads(model)
        forward_backward(model, tokens, next_token_targets(tokens), g, StepOptions(policy="layer"))
        grads.append(g)
    diff = sum(float(np.sum((grads[0][k] - grads[1][k]) ** 2)) for k in grads[1])
    total = sum(float(np.sum(grads[1][k] ** 2)) for k in grads[1])
    assert np.sqrt(diff / total) <= 1e-4
    for name in grads[1]:
        scale = np.abs(grads[1][name]).max()
        assert np.abs(grads[0][name] - grads[1][name]).max() <= 5e-3 * scale, name
