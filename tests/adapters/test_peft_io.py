"""Adapter files in the Hugging Face PEFT layout (minilars.io.peft): round trips, tensor
names and config fields PEFT reads, malformed folders, and merging into the base."""
import json
import os
import re
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minilars.adapters import AdapterError, adapter_for, attach
from minilars.config import named_config
from minilars.io.peft import (CONFIG_FILE, WEIGHTS_FILE, load_adapter, merged_params,
                              read_adapter_config, save_adapter)
from minilars.model import Model, forward_logits
from tests.gradcheck import rel_err

CONFIGS = ("tiny", "tiny-qwen2")
METHODS = {"lora": dict(rank=4, alpha=8.0), "ia3": {}, "lars": dict(rank=3, block=16)}


def _perturbed(name, method, dtype=np.float64, seed=0, **kw):
    """A base model with `method` attached and its tensors moved away from init."""
    model = Model.random(named_config(name), seed, dtype)
    kw = dict(METHODS[method], **kw)
    layers = kw.pop("layers", None)
    attach(model, adapter_for(method, **kw), layers=layers, seed=seed)
    rng = np.random.default_rng(seed + 10)
    for n in sorted(model.trainable):
        model.params[n] = (model.params[n] + 0.3 * rng.normal(size=model.params[n].shape)
                           ).astype(dtype)
    return model


def _tokens(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, 9))


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_gives_identical_logits(tmp_path, method, name, dtype):
    model = _perturbed(name, method, dtype)
    save_adapter(str(tmp_path), model, base_model_name="tiny-base")
    fresh = load_adapter(str(tmp_path), Model.random(named_config(name), 0, dtype))
    assert sorted(fresh.adapted) == sorted(model.adapted)
    assert fresh.adapter == model.adapter             # hyper-parameters too
    assert fresh.trainable == model.trainable
    for n in model.trainable:
        assert fresh.params[n].dtype == dtype
        np.testing.assert_array_equal(fresh.params[n], model.params[n], err_msg=n)
    tokens = _tokens(model.cfg)
    np.testing.assert_array_equal(forward_logits(fresh, tokens), forward_logits(model, tokens))


def test_lars_round_trip_keeps_its_options(tmp_path):
    model = _perturbed("tiny", "lars", train_alpha=False, eps=1e-6, save="keep", layers=[1],
                       targets=["q_proj", "down_proj"])
    save_adapter(str(tmp_path), model)
    cfg = read_adapter_config(str(tmp_path))
    assert (cfg["peft_type"], cfg["r"], cfg["block_size"], cfg["eps"], cfg["train_alpha"],
            cfg["saved_for_backward"]) == ("LARS", 3, 16, 1e-6, False, "keep")
    fresh = load_adapter(str(tmp_path), Model.random(named_config("tiny"), 0, np.float64))
    assert fresh.adapter == model.adapter and sorted(fresh.adapted) == sorted(model.adapted)


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_on_a_subset_of_layers_round_trips(tmp_path, method):
    """attach(layers=[1]) is recorded as PEFT's layers_to_transform, so the file loads
    (before the fix the config claimed every layer and loading said 'missing tensor')."""
    model = _perturbed("tiny", method, layers=[1])
    save_adapter(str(tmp_path), model)
    assert read_adapter_config(str(tmp_path))["layers_to_transform"] == [1]
    fresh = load_adapter(str(tmp_path), Model.random(named_config("tiny"), 0, np.float64))
    assert sorted(fresh.adapted) == sorted(model.adapted)
    tokens = _tokens(model.cfg)
    np.testing.assert_array_equal(forward_logits(fresh, tokens), forward_logits(model, tokens))
    full = _perturbed("tiny", method)
    save_adapter(str(tmp_path / "all"), full)
    assert read_adapter_config(str(tmp_path / "all")).get("layers_to_transform") is None


def test_layers_to_transform_out_of_range(tmp_path):
    save_adapter(str(tmp_path), _perturbed("tiny", "lora", layers=[1]))
    conf = json.loads((tmp_path / CONFIG_FILE).read_text())
    conf["layers_to_transform"] = [1, 5]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: layers_to_transform 5 is not "
                                           r"a layer of this 2-layer model"):
        _load(tmp_path)


# ------------------------------------------------------------------ what PEFT reads

def test_lora_file_has_peft_names_and_config(tmp_path):
    model = _perturbed("tiny", "lora")
    save_adapter(str(tmp_path), model, base_model_name="HuggingFaceTB/SmolLM2-135M")
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    cfg = named_config("tiny")
    C, F, kv = cfg.hidden_size, cfg.intermediate_size, cfg.kv_dim
    expect = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, C),
              "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (cfg.q_dim, 4),
              "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight": (kv, 4),
              "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": (4, F),
              "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight": (F, 4)}
    for k, shape in expect.items():
        assert tensors[k].shape == shape, k
    assert len(tensors) == 2 * 7 * cfg.num_hidden_layers
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    conf = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["lora_dropout"] == 0.0
    assert sorted(conf["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"])
    assert conf["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"


def test_ia3_file_has_peft_names_and_config(tmp_path):
    model = _perturbed("tiny", "ia3")
    save_adapter(str(tmp_path), model)
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    cfg = named_config("tiny")
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (cfg.kv_dim, 1)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.ia3_l"].shape == (cfg.kv_dim, 1)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, cfg.intermediate_size)
    assert len(tensors) == 3 * cfg.num_hidden_layers
    conf = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert conf["peft_type"] == "IA3"
    assert sorted(conf["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
    assert conf["feedforward_modules"] == ["down_proj"]


def test_peft_adapter_name_in_keys_is_accepted(tmp_path):
    """Some PEFT versions write ".default" (the adapter name) into the keys."""
    model = _perturbed("tiny", "lora")
    save_adapter(str(tmp_path), model)
    path = str(tmp_path / WEIGHTS_FILE)
    tensors = load_file(path)
    save_file({k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in tensors.items()}, path)
    fresh = load_adapter(str(tmp_path), Model.random(named_config("tiny"), 0, np.float64))
    tokens = _tokens(model.cfg)
    np.testing.assert_array_equal(forward_logits(fresh, tokens), forward_logits(model, tokens))


def test_ia3_without_feedforward_modules_round_trips(tmp_path):
    model = _perturbed("tiny", "ia3", targets=["k_proj", "v_proj"])
    save_adapter(str(tmp_path), model)
    fresh = load_adapter(str(tmp_path), Model.random(named_config("tiny"), 0, np.float64))
    tokens = _tokens(model.cfg)
    np.testing.assert_array_equal(forward_logits(fresh, tokens), forward_logits(model, tokens))


# ------------------------------------------------------------------ malformed folders

@pytest.fixture
def saved_lora(tmp_path):
    model = _perturbed("tiny", "lora")
    save_adapter(str(tmp_path), model)
    return tmp_path


def _load(folder):
    return load_adapter(str(folder), Model.random(named_config("tiny"), 0, np.float64))


def _rewrite(folder, edit):
    path = str(folder / WEIGHTS_FILE)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def test_missing_config_file(saved_lora):
    os.remove(saved_lora / CONFIG_FILE)
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*no adapter_config\.json"):
        _load(saved_lora)


def test_config_not_json(saved_lora):
    (saved_lora / CONFIG_FILE).write_text("{peft_type: LORA")
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not valid JSON"):
        _load(saved_lora)


def test_missing_weights_file(saved_lora):
    os.remove(saved_lora / WEIGHTS_FILE)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: adapter weights file is missing"):
        _load(saved_lora)


def test_missing_tensor(saved_lora):
    _rewrite(saved_lora, lambda t: t.pop(KEY))
    with pytest.raises(AdapterError, match=rf"adapter_model\.safetensors: missing tensor {KEY}"):
        _load(saved_lora)


def test_unexpected_tensor(saved_lora):
    extra = KEY.replace("layers.1", "layers.7")
    _rewrite(saved_lora, lambda t: t.__setitem__(extra, t[KEY]))
    with pytest.raises(AdapterError, match=rf"unexpected tensor {extra}"):
        _load(saved_lora)


def test_wrong_shape(saved_lora):
    _rewrite(saved_lora, lambda t: t.__setitem__(KEY, np.ascontiguousarray(t[KEY][:, :3])))
    with pytest.raises(AdapterError, match=rf"tensor {KEY} has shape \(32, 3\), expected \(32, 4\)"):
        _load(saved_lora)


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", None, "lora"])
def test_bad_peft_type(saved_lora, peft_type):
    conf = json.loads((saved_lora / CONFIG_FILE).read_text())
    conf["peft_type"] = peft_type
    (saved_lora / CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=rf"adapter_config\.json: peft_type {peft_type!r} is not "
                                           r"one of LORA, IA3, LARS"):
        _load(saved_lora)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved_lora, damage):
    path = saved_lora / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 64,
                      "empty": b""}[damage])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: cannot read safetensors"):
        _load(saved_lora)


def test_unknown_target_in_config(saved_lora):
    conf = json.loads((saved_lora / CONFIG_FILE).read_text())
    conf["target_modules"] = ["q_proj", "c_attn"]
    (saved_lora / CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: key 'target_modules' lists "
                                           r"'c_attn'; expected a list of module names among q_proj"):
        _load(saved_lora)


def test_regex_target_modules(saved_lora):
    conf = json.loads((saved_lora / CONFIG_FILE).read_text())
    conf["target_modules"] = ".*proj"
    (saved_lora / CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match=r"key 'target_modules' is the pattern '\.\*proj'; regex "
                                           r"patterns are not supported"):
        _load(saved_lora)


# ------------------------------------------------------------------ merging

@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_params_give_the_adapted_logits(name, method):
    model = _perturbed(name, method)
    before = {n: v.copy() for n, v in model.params.items()}
    merged = merged_params(model)
    assert not any(t in n for n in merged for t in (".lora_", ".ia3_"))
    assert set(merged) == set(Model.random(named_config(name), 0).params)
    for n, v in before.items():                       # the model is left unchanged
        np.testing.assert_array_equal(model.params[n], v, err_msg=n)
    tokens = _tokens(model.cfg, 3)
    got = forward_logits(Model(model.cfg, merged, dtype=np.float64), tokens)
    assert got.dtype == np.float64
    assert rel_err(got, forward_logits(model, tokens)) < 1e-10


def test_lars_cannot_be_merged():
    with pytest.raises(AdapterError, match="LARS cannot be merged"):
        merged_params(_perturbed("tiny", "lars"))


# ------------------------------------------------------------------ bad configs, named

def _saved(tmp_path, method, **kw):
    folder = tmp_path / method
    save_adapter(str(folder), _perturbed("tiny", method, **kw))
    return folder


def _edit_config(folder, edit):
    conf = json.loads((folder / CONFIG_FILE).read_text())
    edit(conf)
    (folder / CONFIG_FILE).write_text(json.dumps(conf))


def _drop(key):
    return lambda conf: conf.pop(key)


def _set(key, value):
    return lambda conf: conf.__setitem__(key, value)


CONFIG = r"adapter_config\.json"


@pytest.mark.parametrize("method, edit, message", [
    ("lora", _drop("r"), r"key 'r' is missing; expected an integer >= 1"),
    ("lora", _set("r", None), r"key 'r' is null; expected an integer >= 1"),
    ("lora", _set("r", 8.7), r"key 'r' is 8.7; expected an integer >= 1"),
    ("lora", _set("r", 4.0), r"key 'r' is 4.0; expected an integer >= 1"),
    ("lora", _set("r", "4"), r"key 'r' is '4'; expected an integer >= 1"),
    ("lora", _set("r", True), r"key 'r' is True; expected an integer >= 1"),
    ("lora", _set("r", 0), r"key 'r' is 0; expected an integer >= 1"),
    ("lora", _drop("lora_alpha"), r"key 'lora_alpha' is missing; expected a finite number"),
    ("lora", _set("lora_alpha", "8"), r"key 'lora_alpha' is '8'; expected a finite number"),
    ("lora", _set("lora_dropout", 1.5), r"key 'lora_dropout' is 1.5; expected a number in \[0, 1\)"),
    ("lora", _set("use_rslora", True), r"key 'use_rslora' is True; expected false"),
    ("lora", _set("use_dora", True), r"key 'use_dora' is True; expected false"),
    ("lora", _set("alpha_pattern", {"q_proj": 2}), r"key 'alpha_pattern' is \{'q_proj': 2\}; expected \{\}"),
    ("lars", _drop("block_size"), r"key 'block_size' is missing; expected an integer >= 1"),
    ("lars", _drop("eps"), r"key 'eps' is missing; expected a positive number"),
    ("lars", _set("eps", -1e-5), r"key 'eps' is -1e-05; expected a positive number"),
    ("lars", _drop("train_alpha"), r"key 'train_alpha' is missing; expected true or false"),
    ("lars", _set("train_alpha", "yes"), r"key 'train_alpha' is 'yes'; expected true or false"),
    ("lars", _set("saved_for_backward", "all"), r"key 'saved_for_backward' is 'all'; expected 'recompute' or 'keep'"),
    ("lars", _set("block_size", 5), r"LARS block size 5 does not divide the input width 64"),
    ("ia3", _set("feedforward_modules", ["q_proj"]),
     r"key 'feedforward_modules' lists 'q_proj'; expected a list of module names among down_proj, "
     r"k_proj, v_proj"),
    ("ia3", _set("feedforward_modules", "down_proj"), r"key 'feedforward_modules' is the pattern 'down_proj'"),
    ("ia3", _set("target_modules", []), r"key 'target_modules' is \[\]; expected at least one"),
    ("ia3", _set("target_modules", None), r"key 'target_modules' is null; expected a list of module names"),
    ("ia3", _set("target_modules", [3]), r"key 'target_modules' lists 3; expected a list"),
    ("lora", _set("layers_to_transform", []), r"key 'layers_to_transform' is \[\]; expected a non-empty list"),
    ("lora", _set("layers_to_transform", [1, 1]), r"key 'layers_to_transform' is \[1, 1\]; expected .*distinct"),
    ("lora", _set("layers_to_transform", "1"), r"key 'layers_to_transform' is '1'"),
])
def test_a_bad_adapter_config_names_the_file_the_key_and_what_was_expected(
        tmp_path, method, edit, message):
    folder = _saved(tmp_path, method)
    _edit_config(folder, edit)
    model = Model.random(named_config("tiny"), 0, np.float64)
    with pytest.raises(AdapterError, match=rf"{CONFIG}: {message}"):
        load_adapter(str(folder), model)
    assert model.adapter is None and not model.trainable     # nothing attached


def test_an_infinite_number_is_refused(saved_lora):
    """JSON has no Infinity, but Python reads 1e400 as one."""
    path = saved_lora / CONFIG_FILE
    path.write_text(re.sub(r'"lora_alpha": [0-9.]+', '"lora_alpha": 1e400', path.read_text()))
    with pytest.raises(AdapterError, match=rf"{CONFIG}: key 'lora_alpha' is inf; expected a finite number"):
        _load(saved_lora)


def test_a_huge_rank_is_refused_before_anything_is_allocated(tmp_path):
    """r = 10^12: before, attach drew (64, 10^12) init tensors before reading the file."""
    folder = _saved(tmp_path, "lars")
    _edit_config(folder, _set("r", 10 ** 12))
    model = Model.random(named_config("tiny"), 0, np.float64)
    tracemalloc.start()
    try:
        with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor .*lars_U has "
                                               r"shape \(\d+, 3\), expected \(\d+, 1000000000000\)"):
            load_adapter(str(folder), model)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


def test_a_config_that_is_a_json_list(saved_lora):
    (saved_lora / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(AdapterError, match=rf"{CONFIG}: expected a JSON object, found list"):
        _load(saved_lora)


@pytest.mark.parametrize("text, message", [
    (b'{"peft_type": "LORA", "peft_type": "IA3"}', r"key 'peft_type' appears twice"),
    (b'{"peft_type": "LORA", "r": NaN}', r"not valid JSON"),
    (b'{"peft_type": "\xff"}', r"not UTF-8 text"),
    (b"[" * 100000, r"not valid JSON \(RecursionError"),
])
def test_a_config_that_is_not_strict_json(saved_lora, text, message):
    (saved_lora / CONFIG_FILE).write_bytes(text)
    with pytest.raises(AdapterError, match=rf"{CONFIG}: {message}"):
        _load(saved_lora)


def test_a_lars_config_on_lora_tensors_says_what_the_file_holds(tmp_path):
    folder = _saved(tmp_path, "lora")
    _edit_config(folder, lambda c: c.update(peft_type="LARS", block_size=16, eps=1e-5,
                                            train_alpha=True))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: missing tensor .*lars_U.* "
                                           r"the file holds LORA tensors, .*adapter_config\.json "
                                           r"describes a LARS adapter"):
        _load(folder)


def test_ia3_feedforward_modules_null_is_peft_default(tmp_path):
    """PEFT fills a null feedforward_modules with down_proj; it was read as 'none'."""
    model = _perturbed("tiny", "ia3")
    save_adapter(str(tmp_path), model)
    _edit_config(tmp_path, _set("feedforward_modules", None))
    fresh = _load(tmp_path)
    assert fresh.adapter == model.adapter


def test_target_modules_all_linear(tmp_path):
    model = _perturbed("tiny", "lora")
    save_adapter(str(tmp_path), model)
    _edit_config(tmp_path, _set("target_modules", "all-linear"))
    assert _load(tmp_path).adapter == model.adapter


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_adapter_tensors_are_refused(saved_lora, value):
    def spoil(t):
        t[KEY] = t[KEY].copy()
        t[KEY][0, 0] = value
    _rewrite(saved_lora, spoil)
    model = Model.random(named_config("tiny"), 0, np.float64)
    with pytest.raises(AdapterError, match=rf"adapter_model\.safetensors: tensor base_model\.model\."
                                           rf"{KEY[len('base_model.model.'):]} holds NaN or Inf"):
        load_adapter(str(saved_lora), model)
    assert model.adapter is None


def test_a_failed_load_leaves_the_model_unchanged(saved_lora):
    """The weights file is checked before the adapter is attached."""
    os.remove(saved_lora / WEIGHTS_FILE)
    model = Model.random(named_config("tiny"), 0, np.float64)
    names = set(model.params)
    with pytest.raises(AdapterError, match="adapter weights file is missing"):
        load_adapter(str(saved_lora), model)
    assert model.adapter is None and set(model.params) == names
