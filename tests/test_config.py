"""ModelConfig from config.json: supported architectures, derived sizes, and errors that
name the problem for unsupported or inconsistent configs."""
import json

import pytest

from minilars.config import ConfigError, ModelConfig, named_config

LLAMA = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "rope_theta": 10000.0,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def test_llama_and_qwen2_from_dict():
    cfg = ModelConfig.from_dict(LLAMA)
    assert cfg.head_dim == 8 and cfg.q_dim == 32 and cfg.kv_dim == 16
    assert not cfg.attention_bias
    qwen = ModelConfig.from_dict({**LLAMA, "architectures": ["Qwen2ForCausalLM"],
                                  "tie_word_embeddings": False})
    assert qwen.attention_bias and not qwen.tie_word_embeddings
    by_type = ModelConfig.from_dict({k: v for k, v in LLAMA.items() if k != "architectures"}
                                    | {"model_type": "llama"})
    assert by_type == cfg


def test_round_trip_through_json(tmp_path):
    for name in ("tiny", "tiny-qwen2", "smollm2-135m"):
        cfg = named_config(name)
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
        assert ModelConfig.from_json(str(tmp_path)) == cfg


def test_smollm2_parameter_count():
    # 134,515,008: SmolLM2-135M's published parameter count (tied embeddings)
    cfg = named_config("smollm2-135m")
    C, F, V, L = 576, 1536, 49152, 30
    per_layer = C * 576 + 2 * C * 192 + 576 * C + 3 * C * F + 2 * C
    assert cfg.n_params == V * C + L * per_layer + C == 134_515_008


@pytest.mark.parametrize("change, msg", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
    ({"hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 4},
     r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"),
    ({"hidden_size": 30}, "hidden_size 30 is not divisible by num_attention_heads 4 and no head_dim"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling .* is not supported"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"hidden_size": "wide"}, "some/config.json: .*'wide'"),
])
def test_bad_configs_name_the_problem(change, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        ModelConfig.from_dict({**LLAMA, **change}, source="some/config.json")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("field", ["hidden_size", "vocab_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads"])
def test_missing_field(field):
    d = {k: v for k, v in LLAMA.items() if k != field}
    with pytest.raises(ConfigError, match=f"some/config.json: missing required field '{field}'"):
        ModelConfig.from_dict(d, source="some/config.json")


def test_head_dim_given_explicitly_allows_any_hidden_size():
    cfg = ModelConfig.from_dict({**LLAMA, "hidden_size": 30, "head_dim": 8})
    assert cfg.q_dim == 32 and cfg.hidden_size == 30


def test_files_and_names(tmp_path):
    with pytest.raises(ConfigError, match="no config.json found"):
        ModelConfig.from_json(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(str(tmp_path / "config.json"))
    with pytest.raises(ConfigError, match="unknown config 'huge'; built-in configs are"):
        named_config("huge")


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="unsupported architecture 'MistralForCausalLM'"):
        ModelConfig(architecture="MistralForCausalLM")
    with pytest.raises(ConfigError, match="must be a multiple of"):
        named_config("tiny").replace(num_key_value_heads=3)
