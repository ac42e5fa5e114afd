"""Where policy layer's block checkpoints live (minilars.checkpoints): disk gives gradients
bit-identical to ram and keeps them out of the resident total; bf16 halves them and is
close (the bound below is measured); the scratch file is gone after every step, also after
an error; a full disk stops the step with a message naming the file."""
import errno
import os

import numpy as np
import pytest

from minilars import checkpoints
from minilars.adapters import LARS, LoRA, attach
from minilars.config import named_config
from minilars.memory import Ledger
from minilars.model import Model, StepOptions, forward_backward, next_token_targets, zero_grads
from tests.gradcheck import rel_err

# bf16 against ram, per gradient tensor (rel_err), measured on these tiny float32 models
# over seeds 0-2: median 1.9e-3..2.1e-3 (full), 5.9e-3..1.4e-2 (LoRA), 2.5e-3..3.7e-3
# (LARS); worst 4.9e-3 (full), 2.8e-2 (LoRA), 7.8e-2 (a LARS alpha: one scalar summing
# many terms that nearly cancel). bfloat16 keeps 8 mantissa bits (rounding 2^-9 = 2e-3).
BF16_MEDIAN_BOUND, BF16_WORST_BOUND = 3e-2, 0.25


def _model(adapter, seed=0, layers=2):
    cfg = named_config("tiny-qwen2").replace(num_hidden_layers=layers)
    model = Model.random(cfg, seed, np.float32)
    if adapter is None:
        return model.train_all()
    attach(model, adapter, seed=seed)
    for n in model.trainable:           # away from init, so every gradient path is live
        model.params[n] += 0.1 * np.random.default_rng(1).normal(size=model.params[n].shape
                                                                  ).astype(np.float32)
    return model


def _step(model, opts, ledger=None):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, model.cfg.vocab_size, size=(2, 13))
    grads = zero_grads(model)
    loss = forward_backward(model, tokens, next_token_targets(tokens), grads, opts, ledger)
    return loss, grads


ADAPTERS = {"full": None, "lora": LoRA(rank=3), "lars": LARS(rank=3, block=16)}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_disk_is_exact_and_bf16_is_close(name, tmp_path):
    model = _model(ADAPTERS[name])
    loss, ram = _step(model, StepOptions(policy="layer", tile=4))
    disk_loss, disk = _step(model, StepOptions(policy="layer", tile=4, checkpoints="disk",
                                               scratch_dir=str(tmp_path)))
    assert disk_loss == loss
    for n in ram:
        np.testing.assert_array_equal(disk[n], ram[n], err_msg=n)
    assert os.listdir(tmp_path) == []                         # the file went with the step
    bf_loss, bf = _step(model, StepOptions(policy="layer", tile=4, checkpoints="bf16"))
    assert bf_loss == loss               # the forward's loss is computed before any rounding
    errs = [rel_err(bf[n], ram[n]) for n in ram]
    assert 0 < np.median(errs) < BF16_MEDIAN_BOUND and max(errs) < BF16_WORST_BOUND, errs


def test_the_ledger_counts_disk_apart_and_bf16_at_half():
    model = _model(LARS(rank=3, block=16), layers=6)
    peaks = {}
    for kind in checkpoints.CHECKPOINT_STORES:
        ledger = Ledger()
        _step(model, StepOptions(policy="layer", checkpoints=kind), ledger)
        peaks[kind] = ledger
        assert ledger.live["disk"] == 0 and ledger.live_entries("activations") == []
    cfg, B, T = model.cfg, 2, 13
    one = B * T * cfg.hidden_size * 4                           # one block input, float32
    L = cfg.num_hidden_layers
    assert peaks["disk"].max_by_category["disk"] == L * one
    assert peaks["ram"].max_by_category["disk"] == 0
    # the peak is the top block's recompute: ram holds the L - 1 lower inputs besides the
    # one being recomputed, disk none (its read buffer is the one being recomputed), and
    # bf16 the L - 1 lower ones in half precision (the top one's bits went when it was read)
    assert peaks["ram"].peak_total - peaks["disk"].peak_total == (L - 1) * one
    assert peaks["ram"].peak_total - peaks["bf16"].peak_total == (L - 1) * one // 2


def test_the_file_goes_after_an_error(tmp_path, monkeypatch):
    model = _model(LoRA(rank=2))
    import minilars.model as model_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the backward")
    monkeypatch.setattr(model_module, "block_backward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _step(model, StepOptions(policy="layer", checkpoints="disk", scratch_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr(checkpoints.os, "fdopen", lambda *a, **k: Full(real(*a, **k)))
    with pytest.raises(OSError, match=r"checkpoint store .*minilars-checkpoints-.*\.bin: writing "
                                      r"layer 0's block input .* No space left on device"):
        _step(_model(LoRA(rank=2)), StepOptions(policy="layer", checkpoints="disk",
                                                scratch_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_bad_store_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint store 'nvme'"):
        StepOptions(policy="layer", checkpoints="nvme")
    with pytest.raises(ValueError, match="--checkpoints disk stores the block inputs of "
                                         "--policy layer"):
        StepOptions(policy="none", checkpoints="disk")
    with pytest.raises(OSError, match=r"cannot create a scratch file in .*missing"):
        _step(_model(LoRA(rank=2)), StepOptions(policy="layer", checkpoints="disk",
                                                scratch_dir=str(tmp_path / "missing")))
