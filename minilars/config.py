"""ModelConfig: the shape of a Llama-family model, read from a Hugging Face config.json.

Three architectures share one forward pass (see ../shared/DESIGN.md):
  LlamaForCausalLM   the reference; SmolLM2 is Llama with tied embeddings
  Qwen2ForCausalLM   Llama plus biases on q_proj, k_proj, v_proj
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A config.json (or a named config) that minilars cannot build a model from."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 49152
    hidden_size: int = 576            # C
    intermediate_size: int = 1536     # F, width of the MLP
    num_hidden_layers: int = 30       # L
    num_attention_heads: int = 9      # nh, query heads
    num_key_value_heads: int = 3      # nkv, shared key/value heads (GQA)
    head_dim: int = 64                # hd = C / nh unless the config says otherwise
    max_position_embeddings: int = 8192
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    attention_bias: bool = False      # q/k/v biases (Qwen2)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; minilars supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("rope_theta and rms_norm_eps must be positive")

    # derived sizes, named as in the shape comments
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def n_params(self) -> int:
        C, F, V = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = (C * self.q_dim + 2 * C * self.kv_dim + self.q_dim * C  # q, k, v, o
                     + 3 * C * F + 2 * C)                                   # gate, up, down, norms
        if self.attention_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + self.num_hidden_layers * per_layer + C + head

    # ---- reading and writing config.json ----
    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        archs = d.get("architectures") or []
        if not archs:
            mt = d.get("model_type")
            archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [mt])
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported architecture {arch!r}; minilars supports "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            C = int(d["hidden_size"])
            nh = int(d["num_attention_heads"])
            hd = d.get("head_dim") or (C // nh)
            if not d.get("head_dim") and C % nh:
                raise ConfigError(f"{source}: hidden_size {C} is not divisible by "
                                  f"num_attention_heads {nh} and no head_dim is given")
            rope_scaling = d.get("rope_scaling")
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
                raise ConfigError(f"{source}: rope_scaling {rope_scaling} is not supported")
            eos = d.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if eos else None
            return cls(
                architecture=arch,
                vocab_size=int(d["vocab_size"]),
                hidden_size=C,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=nh,
                num_key_value_heads=int(d.get("num_key_value_heads") or nh),
                head_dim=int(hd),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            bad = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim",
                               "max_position_embeddings", "rope_theta", "rms_norm_eps")
                   if k in d and not _is_number(d[k])]
            where = f"field {bad[0]!r} = {d[bad[0]]!r} is not a number" if bad else str(e)
            raise ConfigError(f"{source}: {where}") from None

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict:
        model_type = "qwen2" if self.architecture == "Qwen2ForCausalLM" else "llama"
        d = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.architecture == "LlamaForCausalLM":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Built-in named configs: `tiny` for tests, `smollm2-135m` for memory curves without weights.
NAMED_CONFIGS = {
    "tiny": ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=True),
    "tiny-qwen2": ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=96, hidden_size=64,
                              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                              rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                              attention_bias=True),
    "smollm2-135m": ModelConfig(),
}


def named_config(name: str) -> ModelConfig:
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise ConfigError(f"unknown config {name!r}; built-in configs are "
                          f"{', '.join(sorted(NAMED_CONFIGS))}") from None
