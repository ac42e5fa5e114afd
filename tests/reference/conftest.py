"""Fixtures for the reference tests: the real SmolLM2-135M folder (git-ignored; fetched with
`minilars fetch smollm2-135m`) and the optional torch/transformers/peft reference stack
(`pip install -e .[reference]`). Either missing: the tests skip and say why."""
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOLLM2 = os.environ.get("MINILARS_SMOLLM2", os.path.join(ROOT, "weights", "smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_folder():
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    if not all(os.path.isfile(os.path.join(SMOLLM2, f)) for f in needed):
        pytest.skip(f"{SMOLLM2} is missing (it is git-ignored); run `minilars fetch smollm2-135m` "
                    "to download and convert it")
    return SMOLLM2


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch", reason="reference tests need torch (pip install -e .[reference])")
    pytest.importorskip("transformers", reason="reference tests need transformers")
    torch.manual_seed(0)
    return torch


@pytest.fixture(scope="session")
def peft():
    return pytest.importorskip("peft", reason="PEFT interop tests need peft (pip install -e .[reference])")


@pytest.fixture(scope="session")
def base(smollm2_folder):
    """(minilars float32 Model, Tokenizer) of the real checkpoint."""
    from minilars.train import load_base
    return load_base(smollm2_folder)


@pytest.fixture(scope="session")
def hf_model(torch, smollm2_folder):
    """transformers' model of the same folder, float32, eval mode (no dropout)."""
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    except TypeError:     # transformers < 4.56 only knows torch_dtype
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder, torch_dtype=torch.float32)
    return model.eval()


PROMPTS = ("The capital of France is",
           "def fibonacci(n):\n    if n < 2:\n        return n",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who")


@pytest.fixture(scope="session")
def prompts(base):
    """Token arrays (1, T) of three prompts, T <= 32."""
    _, tok = base
    out = [np.array([tok.encode(p)[:32]]) for p in PROMPTS]
    assert all(1 < t.shape[1] <= 32 for t in out)
    return out
