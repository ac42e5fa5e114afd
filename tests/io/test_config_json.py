"""config.json read by ModelConfig.from_json: strict JSON and strictly typed fields, every
error a ConfigError naming the file and the field (no int() that makes 2.5 a 2 or "3" a
3, no raw UnicodeDecodeError, TypeError or AttributeError)."""
import json

import pytest

from minilars.config import ConfigError, ModelConfig, named_config

GOOD = named_config("tiny").to_dict()
# JSON has no Infinity, but Python reads 1e400 as one
INFINITE_EPS = (json.dumps({k: v for k, v in GOOD.items() if k != "rms_norm_eps"})[:-1]
                + ', "rms_norm_eps": 1e400}').encode()


def write(tmp_path, obj=None, raw=None):
    path = tmp_path / "config.json"
    path.write_bytes(raw if raw is not None else json.dumps(obj).encode())
    return str(path)


def test_a_good_config_reads(tmp_path):
    assert ModelConfig.from_json(write(tmp_path, GOOD)) == named_config("tiny")


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 64.5}, r"field 'hidden_size' is 64.5; expected an integer"),
    ({"hidden_size": 64.0}, r"field 'hidden_size' is 64.0; expected an integer"),
    ({"num_hidden_layers": "2"}, r"field 'num_hidden_layers' is '2'; expected an integer"),
    ({"num_hidden_layers": True}, r"field 'num_hidden_layers' is True; expected an integer"),
    ({"vocab_size": None}, r"missing required field 'vocab_size'"),
    ({"vocab_size": [96]}, r"field 'vocab_size' is \[96\]; expected an integer"),
    ({"head_dim": "16"}, r"field 'head_dim' is '16'; expected an integer"),
    ({"rms_norm_eps": "1e-5"}, r"field 'rms_norm_eps' is '1e-5'; expected a finite number"),
    ({"rope_theta": False}, r"field 'rope_theta' is False; expected a finite number"),
    ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be a positive finite number, got 0.0"),
    ({"tie_word_embeddings": "false"}, r"field 'tie_word_embeddings' is 'false'; expected true or false"),
    ({"attention_bias": 1}, r"field 'attention_bias' is 1; expected true or false"),
    ({"bos_token_id": "1"}, r"field 'bos_token_id' is '1'; expected a token id"),
    ({"eos_token_id": [-2]}, r"field 'eos_token_id' is -2; expected a token id"),
    ({"architectures": "LlamaForCausalLM"}, r"field 'architectures' is 'LlamaForCausalLM'; expected a list"),
    ({"architectures": [5]}, r"field 'architectures' is \[5\]"),
    ({"architectures": None, "model_type": ["llama"]}, r"field 'model_type' is \['llama'\]"),
    ({"rope_scaling": "linear"}, r"field 'rope_scaling' is 'linear'; expected an object or null"),
    ({"num_attention_heads": 0}, r"num_attention_heads must be a positive integer, got 0"),
    ({"num_hidden_layers": -1}, r"num_hidden_layers must be a positive integer, got -1"),
])
def test_a_bad_field_is_named_with_the_file(tmp_path, change, message):
    path = write(tmp_path, {**GOOD, **change})
    with pytest.raises(ConfigError, match=rf"config.json: {message}"):
        ModelConfig.from_json(path)


@pytest.mark.parametrize("raw, message", [
    (b"[1, 2]", r"expected a JSON object of model settings, found list"),
    (b'"llama"', r"expected a JSON object of model settings, found str"),
    (b'{"hidden_size": 64, "hidden_size": 32}', r"key 'hidden_size' appears twice"),
    (b'{"rms_norm_eps": NaN}', r"not valid JSON \(ValueError: NaN is not a JSON value\)"),
    (INFINITE_EPS, r"field 'rms_norm_eps' is inf; expected a finite number"),
    (b'{"a": "\xff"}', r"not UTF-8 text"),
    (b"[" * 100000, r"not valid JSON \(RecursionError"),
    (b'{"vocab_size": 1' + b"0" * 5000 + b"}", r"not valid JSON \(ValueError: Exceeds the limit"),
])
def test_a_file_that_is_not_strict_json_is_named(tmp_path, raw, message):
    path = write(tmp_path, raw=raw)
    with pytest.raises(ConfigError, match=rf"config.json: {message}"):
        ModelConfig.from_json(path)


def test_a_folder_named_config_json(tmp_path):
    (tmp_path / "m" / "config.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"config.json: cannot read"):
        ModelConfig.from_json(str(tmp_path / "m"))
