"""ModelConfig: the shape of a Llama-family model, read from a Hugging Face config.json.

Three architectures share one forward pass (see ../shared/DESIGN.md):
  LlamaForCausalLM   the reference; SmolLM2 is Llama with tied embeddings
  Qwen2ForCausalLM   Llama plus biases on q_proj, k_proj, v_proj
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A config.json (or a named config) that minilars cannot build a model from."""


# ----------------------------------------------------------------------------------------
# strict JSON: the one parser every reader of a user's JSON file goes through
# ----------------------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        raise _DuplicateKey(next(k for k in obj if keys.count(k) > 1))
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text, source: str, error: type = ConfigError):
    """A JSON document (bytes or str), parsed strictly: UTF-8, no key twice in one object,
    no NaN or Infinity (not JSON), no nesting deeper than Python follows. Anything else
    raises `error` (a ValueError class) naming `source` (a file, or file:line)."""
    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except _DuplicateKey as e:
        raise error(f"{source}: key {e.args[0]!r} appears twice in one object; expected "
                    f"each key once") from None
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e})") from None
    except (ValueError, RecursionError) as e:    # NaN, a 5000-digit number, [[[[...]]]]
        raise error(f"{source}: not valid JSON ({type(e).__name__}: {e})") from None


def shown(value, limit: int = 80) -> str:
    """repr of a value found in a file, cut to `limit` characters, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def read_json_file(path: str, error: type = ConfigError, missing: str = "file not found"):
    """parse_json of a file's bytes; a missing file raises `error` saying `missing`, an
    unreadable one (a folder, no permission) `error` with the OS's reason."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json(raw, path, error)


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
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")

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
        """From a config.json's object. Every field minilars reads is checked for its type
        (an integer is an integer: not 2.5, "3" or true); errors name `source` and the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of model settings, found "
                              f"{type(d).__name__}")
        archs = d.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: field 'architectures' is {shown(archs)}; expected a list "
                              f"of architecture names")
        if not archs:
            mt = d.get("model_type")
            if not isinstance(mt, (str, type(None))):
                raise ConfigError(f"{source}: field 'model_type' is {shown(mt)}; expected a name")
            archs = {"llama": ["LlamaForCausalLM"], "qwen2": ["Qwen2ForCausalLM"]}.get(mt, [mt])
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported architecture {shown(arch)}; minilars supports "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")

        def field(key, kind, default=_REQUIRED):
            return _checked_field(d, key, kind, source, default)

        C, nh = field("hidden_size", "int"), field("num_attention_heads", "int")
        hd = field("head_dim", "int", None)
        if not hd:
            if nh > 0 and C % nh:
                raise ConfigError(f"{source}: hidden_size {C} is not divisible by "
                                  f"num_attention_heads {nh} and no head_dim is given")
            hd = C // nh if nh > 0 else 0
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise ConfigError(f"{source}: field 'rope_scaling' is {rope_scaling!r}; expected "
                              f"an object or null")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: rope_scaling {shown(rope_scaling)} is not supported")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        settings = dict(
            architecture=arch,
            vocab_size=field("vocab_size", "int"),
            hidden_size=C,
            intermediate_size=field("intermediate_size", "int"),
            num_hidden_layers=field("num_hidden_layers", "int"),
            num_attention_heads=nh,
            num_key_value_heads=field("num_key_value_heads", "int", None) or nh,
            head_dim=hd,
            max_position_embeddings=field("max_position_embeddings", "int", 2048),
            rope_theta=field("rope_theta", "float", 10000.0),
            rms_norm_eps=field("rms_norm_eps", "float", 1e-6),
            tie_word_embeddings=field("tie_word_embeddings", "bool", False),
            attention_bias=field("attention_bias", "bool", arch == "Qwen2ForCausalLM"),
            bos_token_id=field("bos_token_id", "token id", None),
            eos_token_id=_checked_field({"eos_token_id": eos}, "eos_token_id", "token id",
                                        source, None))
        try:
            return cls(**settings)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        return cls.from_dict(read_json_file(path, ConfigError, "no config.json found"), source=path)

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


_REQUIRED = object()
_KINDS = {"int": "an integer", "float": "a finite number", "bool": "true or false",
          "token id": "a token id (an integer >= 0) or null"}


def _checked_field(d: dict, key: str, kind: str, source: str, default=_REQUIRED):
    """d[key] of a config.json, of `kind` ("int", "float", "bool", "token id"); a missing
    key (or a null) gives `default`, or a ConfigError when the field is required."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{source}: missing required field {key!r}")
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"int": isinstance(value, int) and number,
          "float": number and math.isfinite(value),
          "bool": isinstance(value, bool),
          "token id": isinstance(value, int) and number and value >= 0}[kind]
    if not ok:
        raise ConfigError(f"{source}: field {key!r} is {shown(value)}; expected {_KINDS[kind]}")
    return float(value) if kind == "float" else value


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
