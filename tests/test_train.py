"""Training: completion-only masks, batches by (seed, step), exact resume, NaN handling."""
import json
import os

import numpy as np
import pytest

from minilars.adapters import IA3, LARS
from minilars.cli import main
from minilars.examples import Example, batch_indices, encode_prompt_completion, make_batch
from minilars.io.tokenizer import Tokenizer
from minilars.ops.loss import IGNORE
from minilars.runs import latest_checkpoint
from minilars.train import NonFiniteLoss, TrainOptions, learning_rate, train


def test_completion_only_loss_masks_exactly_the_prompt(folder):
    tok = Tokenizer.from_folder(folder)
    ex = encode_prompt_completion(tok, "Question: yes or no?\nAnswer:", " yes", seq=64)
    n_prompt = len(tok.encode("Question: yes or no?\nAnswer:"))
    n_completion = len(tok.encode(" yes")) + 1                      # + eos
    assert ex.loss_mask == [False] * n_prompt + [True] * n_completion
    tokens, targets = make_batch([ex, Example([5, 6, 7], [True] * 3)], pad_id=0)
    # position t predicts token t+1: exactly the completion tokens are targets
    kept = targets[0] != IGNORE
    assert kept.sum() == n_completion
    assert (targets[0][kept] == tokens[0][n_prompt:n_prompt + n_completion]).all()
    # padding of the short row carries no loss
    assert (targets[1][2:] == IGNORE).all() and (targets[1][:2] == [6, 7]).all()


def test_long_prompt_is_cut_from_the_left_and_keeps_the_completion(folder):
    tok = Tokenizer.from_folder(folder)
    ex = encode_prompt_completion(tok, "reckless spirit " * 40, " yes", seq=16)
    assert len(ex.tokens) == 16
    assert ex.tokens[-2:] == tok.encode(" yes") + [tok.eos_id]


def test_batches_depend_only_on_seed_and_step():
    a = [batch_indices(10, 4, step, seed=3).tolist() for step in range(6)]
    b = [batch_indices(10, 4, step, seed=3).tolist() for step in range(6)]
    assert a == b
    # every example appears once per epoch
    first_epoch = sum(a[:2], []) + a[2][:2]
    assert sorted(first_epoch) == list(range(10))
    assert batch_indices(10, 4, 0, seed=4).tolist() != a[0]


def test_learning_rate_warms_up_then_decays():
    o = TrainOptions(model="x", data="y", lr=1.0, warmup=4, steps=20, min_lr_ratio=0.1)
    lrs = [learning_rate(o, s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:])) and lrs[-1] >= 0.1


@pytest.mark.parametrize("method", ["lora", "ia3", "lars", "full"])
def test_training_lowers_the_loss(folder, data_file, tmp_path, method):
    # A random tiny model moves slowly through adapters (its logits come mostly from the
    # frozen tied embedding), so the bar for adapters is lower than for full fine-tuning.
    lr = {"lora": 3e-2, "ia3": 1e-1, "lars": 1e-1, "full": 3e-3}[method]
    opts = TrainOptions(model=folder, method=method, data=data_file, seq=32, steps=30, batch=4,
                        lr=lr, warmup=2, out=str(tmp_path / "run"), save_every=100)
    summary = train(opts, log=lambda m: None)
    losses = summary["losses"]
    assert np.mean(losses[-5:]) < (0.5 if method == "full" else 0.97) * np.mean(losses[:5])
    assert os.path.exists(os.path.join(latest_checkpoint(str(tmp_path / "run")), "state.json"))


def _losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(l)["loss"] for l in f]


@pytest.mark.parametrize("method", ["lora", "lars"])
def test_resume_is_bit_identical(folder, data_file, tmp_path, method):
    kw = dict(model=folder, method=method, data=data_file, seq=32, batch=3, lr=1e-2, warmup=2,
              save_every=3, adapter={"dropout": 0.1} if method == "lora" else {})
    straight = TrainOptions(steps=8, out=str(tmp_path / "a"), **kw)
    train(straight, log=lambda m: None)
    # the interrupted run: killed after step 5 (last checkpoint at 3), then resumed
    def interrupt_after_step_5(line):
        if line.startswith("step 5 "):
            raise KeyboardInterrupt
    interrupted = TrainOptions(steps=8, out=str(tmp_path / "b"), **kw)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, log=interrupt_after_step_5)
    train(interrupted, resume=True, log=lambda m: None)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")      # exact, not approximate
    from safetensors.numpy import load_file
    a = load_file(os.path.join(latest_checkpoint(str(tmp_path / "a")), "adapter_model.safetensors"))
    b = load_file(os.path.join(latest_checkpoint(str(tmp_path / "b")), "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, data_file, tmp_path, monkeypatch):
    import minilars.train as train_module
    real = train_module.forward_backward
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:          # step 5 (1-based) blows up
            next(iter(model.params.values()))[...] = np.nan
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", poisoned)
    opts = TrainOptions(model=folder, method="lora", data=data_file, seq=32, steps=10, batch=2,
                        lr=1e-3, out=str(tmp_path / "run"), save_every=2)
    # the message numbers steps as the step lines do (1-based): step 5 failed, 4 is saved
    with pytest.raises(NonFiniteLoss, match=r"step 5: loss is nan.*checkpoint, step 4 in .*step-000004"):
        train(opts, log=lambda m: None)
    with open(os.path.join(latest_checkpoint(str(tmp_path / "run")), "state.json")) as f:
        state = json.load(f)
    assert state["step"] == 4 and all(np.isfinite(state["losses"]))


def test_train_cli_errors_are_clear(folder, tmp_path, capsys):
    assert main(["train", "--model", folder, "--method", "lora", "--out", str(tmp_path / "r")]) != 0
    assert "exactly one of --task" in capsys.readouterr().err
    assert main(["train", "--model", folder, "--data", str(tmp_path / "missing.jsonl"),
                 "--seq", "32", "--out", str(tmp_path / "r2")]) != 0
    assert "missing.jsonl" in capsys.readouterr().err


def test_one_frozen_dtype_rule_for_every_command(folder, tmp_path, capsys):
    """Full fine-tuning with --frozen-dtype is refused by train and memory alike (train
    used to ignore it silently), before anything is loaded."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c d e f g"}\n')
    for argv in (["train", "--model", folder, "--method", "full", "--data", str(data),
                  "--frozen-dtype", "float16", "--out", str(tmp_path / "r")],
                 ["memory", "--arch", "tiny", "--method", "full", "--frozen-dtype", "float16",
                  "--seq", "16"]):
        assert main(argv) == 1
        assert "--frozen-dtype float16 applies to adapter methods" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_run_json_round_trips_the_adapter_settings(folder, tmp_path):
    """run.json holds the adapter's settings as a dict, and TrainOptions rebuilds the same
    adapter from it (what --resume reads)."""
    opts = TrainOptions(model=folder, method="lars", data="x.jsonl",
                        adapter=LARS(rank=3, block=16, train_alpha=False, targets="q_proj,v_proj"))
    saved = json.loads(json.dumps(opts.to_json()))
    assert saved["adapter"]["targets"] == ["q_proj", "v_proj"]
    again = TrainOptions(**saved)
    assert again.adapter == opts.adapter and again == opts
    assert TrainOptions(model=folder, method="ia3", data="x.jsonl").adapter == IA3()
    assert TrainOptions(model=folder, method="full", data="x.jsonl").adapter is None
