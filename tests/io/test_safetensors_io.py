"""Model folders in safetensors: round trips, stored dtypes, sharding, and one test per
kind of malformed input, each checking that its own specific error is raised."""
import json
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minilars.config import ConfigError, named_config
from minilars.io import safetensors_io
from minilars.io.safetensors_io import (CheckpointError, CheckpointWarning, load_model,
                                        load_safetensors, read_safetensors_header,
                                        save_model, save_safetensors_atomic)
from minilars.params import init_params, param_shapes


def write_raw_safetensors(path, tensors, header_override=None):
    """Hand-written safetensors file: tensors = {name: (dtype string, shape, raw bytes)}."""
    header, chunks, offset = {}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header_override if header_override is not None else header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def saved_tiny(tmp_path, name="tiny", seed=0):
    cfg = named_config(name)
    params = init_params(cfg, seed)
    folder = str(tmp_path / name)
    save_model(folder, cfg, params)
    return folder, cfg, params


def rewrite_weights(folder, change):
    """Loads model.safetensors as a dict, applies change(dict), writes it back."""
    path = os.path.join(folder, "model.safetensors")
    tensors = load_safetensors(path)
    change(tensors)
    save_safetensors_atomic(path, tensors)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2"])
def test_round_trip_is_exact(tmp_path, name):
    folder, cfg, params = saved_tiny(tmp_path, name)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    cfg2, params2 = load_model(folder)
    assert cfg2 == cfg
    assert list(params2) == list(param_shapes(cfg))
    for k in params:
        assert params2[k].dtype == np.float32
        np.testing.assert_array_equal(params2[k], params[k])
    if name == "tiny-qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in params2 and "lm_head.weight" in params2


def test_float64_compute_dtype_and_float16_frozen_storage(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path, "tiny-qwen2")
    _, p64 = load_model(folder, dtype=np.float64)
    assert all(v.dtype == np.float64 for v in p64.values())
    _, p16 = load_model(folder, dtype=np.float32, frozen_dtype="float16")
    for k, v in p16.items():
        expected = np.float16 if params[k].ndim == 2 else np.float32
        assert v.dtype == expected, k
        np.testing.assert_allclose(v.astype(np.float32), params[k], rtol=1e-3, atol=1e-6)
    assert p16["model.layers.0.self_attn.q_proj.bias"].dtype == np.float32
    assert p16["model.norm.weight"].dtype == np.float32
    assert p16["model.embed_tokens.weight"].dtype == np.float16


def test_f16_stored_file_loads_as_compute_dtype(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path)
    rewrite_weights(folder, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    assert {e["dtype"] for e in read_safetensors_header(
        os.path.join(folder, "model.safetensors"))[0].values()} == {"F16"}
    _, loaded = load_model(folder)
    for k in params:
        assert loaded[k].dtype == np.float32
        np.testing.assert_array_equal(loaded[k], params[k].astype(np.float16).astype(np.float32))


def to_bf16_bits(x):
    """float32 -> bfloat16 bits by truncation (exact for values with zero low 16 bits)."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype("<u2")


def test_bf16_stored_file_loads_exactly(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path)
    entries = {k: ("BF16", v.shape, to_bf16_bits(v).tobytes()) for k, v in params.items()}
    write_raw_safetensors(os.path.join(folder, "model.safetensors"), entries)
    _, loaded = load_model(folder, dtype=np.float64)
    for k, v in params.items():
        expected = (to_bf16_bits(v).astype(np.uint32) << 16).view(np.float32)
        assert loaded[k].dtype == np.float64
        np.testing.assert_array_equal(loaded[k], expected.astype(np.float64))
        np.testing.assert_allclose(loaded[k], v, rtol=2 ** -7)


@given(st.lists(st.floats(-2.0 ** 100, 2.0 ** 100, width=32), min_size=1, max_size=40))
def test_bf16_conversion_is_the_upper_half_of_float32(tmp_path_factory, values):
    exact = (np.array(values, np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    path = str(tmp_path_factory.mktemp("bf16") / "t.safetensors")
    write_raw_safetensors(path, {"x": ("BF16", exact.shape, to_bf16_bits(exact).tobytes())})
    np.testing.assert_array_equal(load_safetensors(path)["x"], exact)


def test_sharded_folder_loads_like_single_file(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path, "tiny-qwen2")
    os.remove(os.path.join(folder, "model.safetensors"))
    names = list(params)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        save_safetensors_atomic(os.path.join(folder, shard), {n: params[n] for n in shard_names})
    weight_map = {n: shard for shard, ns in shards.items() for n in ns}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _, loaded = load_model(folder)
    for k in params:
        np.testing.assert_array_equal(loaded[k], params[k])
    # an index that points a tensor at the wrong shard
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(CheckpointError, match=r"maps tensor 'model.embed_tokens.weight'.*00002"):
        load_model(folder)


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write("{}")
    params2 = init_params(cfg, seed=1)
    save_model(folder, cfg, params2, extra_files={"notes.txt": "hello"})
    assert open(os.path.join(folder, "tokenizer.json")).read() == "{}"
    assert open(os.path.join(folder, "notes.txt")).read() == "hello"
    np.testing.assert_array_equal(load_model(folder)[1]["model.norm.weight"], params2["model.norm.weight"])
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_interrupted_save_leaves_no_folder(tmp_path, monkeypatch):
    cfg = named_config("tiny")
    params = init_params(cfg)

    def failing_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minilars.io.safetensors_io.write_safetensors", failing_write)
    with pytest.raises(KeyboardInterrupt):
        save_model(str(tmp_path / "m"), cfg, params)
    assert os.listdir(tmp_path) == []


def test_save_rejects_params_that_do_not_match_the_config(tmp_path):
    cfg = named_config("tiny")
    params = init_params(cfg)
    params["model.norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[3\], expected \[64\]"):
        save_model(str(tmp_path / "m"), cfg, params)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- malformed inputs

def test_ignored_buffers_and_redundant_tied_lm_head(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path)
    assert cfg.tie_word_embeddings

    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    rewrite_weights(folder, add)
    with pytest.warns(CheckpointWarning, match=r"ignoring 2 tensor\(s\)") as record:
        _, loaded = load_model(folder)
    message = str(record[0].message)
    assert "rotary_emb.inv_freq (a buffer" in message and "lm_head.weight (config.json ties" in message
    assert "lm_head.weight" not in loaded and not any("inv_freq" in k for k in loaded)


def test_missing_tensor(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\).*missing.*model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_unexpected_tensor(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.extra.weight": np.ones(2, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: 1 unexpected.*model.layers.0.extra.weight"):
        load_model(folder)


def test_misshapen_tensor(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    rewrite_weights(folder, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn."
                                              r"k_proj.weight' has shape \[64, 64\], expected \[32, 64\]"):
        load_model(folder)


def test_truncated_data(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' ends at byte .*truncated"):
        load_model(folder)


def test_truncated_header(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"model.safetensors: header claims \d+ bytes but the file has 100"):
        load_model(folder)
    with open(path, "wb") as f:
        f.write(b"abc")
    with pytest.raises(CheckpointError, match="too short for a safetensors header"):
        load_model(folder)


def test_header_not_json(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    with open(path, "wb") as f:
        f.write((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(CheckpointError, match=r"bad.safetensors: header: not valid JSON"):
        load_safetensors(path)


def test_declared_bytes_disagree_with_shape(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    write_raw_safetensors(path, {}, header_override={
        "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}})
    with pytest.raises(CheckpointError, match=r"tensor 'w' declares 20 bytes but its shape \(2, 3\) of F32 needs 24"):
        load_safetensors(path)


def test_unknown_dtype(tmp_path):
    folder, _, params = saved_tiny(tmp_path)
    entries = {k: ("F32", v.shape, v.tobytes()) for k, v in params.items()}
    entries["model.norm.weight"] = ("F8_E4M3", (64,), bytes(64))
    write_raw_safetensors(os.path.join(folder, "model.safetensors"), entries)
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' is stored as F8_E4M3"):
        load_model(folder)


def test_folder_without_weights_or_config(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(folder)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(ValueError, match="no config.json"):
        load_model(folder)


def test_save_safetensors_atomic_rejects_integer_arrays(tmp_path):
    with pytest.raises(CheckpointError, match=r"x.safetensors: tensor 'ids' has dtype int64"):
        save_safetensors_atomic(str(tmp_path / "x.safetensors"), {"ids": np.arange(3)})
    assert os.listdir(tmp_path) == []


def test_metadata_is_written(tmp_path):
    path = str(tmp_path / "a.safetensors")
    save_safetensors_atomic(path, {"a": np.ones(2, np.float32)})
    assert read_safetensors_header(path)[1] == {"format": "pt"}
    save_safetensors_atomic(path, {"a": np.ones(2, np.float32)}, metadata={"k": "v"})
    assert read_safetensors_header(path)[1] == {"k": "v"}
    assert safetensors_io.load_safetensors(path)["a"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("form", ["q8_0", "q4_0", "q4_1"])
def test_a_width_the_block_size_does_not_divide_is_refused_at_load(tmp_path, form):
    cfg = named_config("tiny").replace(intermediate_size=80)    # down_proj takes 80 inputs
    save_model(str(tmp_path), cfg, init_params(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' cannot "
                                              rf"be held as {form}: .*80"):
        load_model(str(tmp_path), frozen_dtype=form)
    assert load_model(str(tmp_path), frozen_dtype="float16")[1]["model.layers.0.mlp.down_proj.weight"].dtype == np.float16


# ---------------------------------------------------------------- one header validation for every reader

def write_header(path, header, data=b"", raw_text=None):
    """A safetensors file from a header given as a Python object (or as raw JSON text)."""
    text = (raw_text if raw_text is not None else json.dumps(header)).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def f32(shape, begin):
    n = int(np.prod(shape)) * 4
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


READERS = {"read_safetensors_header": read_safetensors_header, "load_safetensors": load_safetensors}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("header, data, message", [
    ({"a": f32([2], 0), "b": f32([2], 0)}, bytes(8),
     r"tensor 'b' \(bytes \[0, 8\]\) overlaps tensor 'a'"),                         # aliased
    ({"a": f32([2], 0), "b": f32([2], 4)}, bytes(12), r"tensor 'b' \(bytes \[4, 12\]\) overlaps tensor 'a'"),
    ({"a": f32([2], 0), "b": f32([2], 12)}, bytes(20), r"a hole of 4 bytes before tensor 'b'"),
    ({"a": f32([2], 4)}, bytes(12), r"a hole of 4 bytes before tensor 'a'"),
    ({"a": f32([2], 0)}, bytes(12), r"4 bytes after the last tensor belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'a' has shape \[2.5\]"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'a' has shape \['2'\]"),
    ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'a' has shape \[True, 2\]"),
    ({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, bytes(8), r"has shape \[-2, -1\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, bytes(8), r"data_offsets \[0.0, 8\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, bytes(8), r"data_offsets \['0', '8'\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]}}, bytes(8), r"data_offsets \[0, 8, 16\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8), r"data_offsets \[-8, 0\]"),
    ({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, bytes(8), r"tensor 'a' has shape 2"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8), r"tensor 'a' is stored as \['F32'\]"),
    ({"a": [1, 2]}, b"", r"tensor 'a' has the header entry \[1, 2\]; expected an object"),
    ([1, 2], b"", r"header is a JSON list; expected an object"),
    ({"__metadata__": {"format": 1}}, b"", r"__metadata__ is \{'format': 1\}; expected an object of string -> string"),
    ({"__metadata__": "pt"}, b"", r"__metadata__ is 'pt'"),
    # 2^32 x 2^32 x 4 elements of 4 bytes: a product that wraps to 0 in int64
    ({"a": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32, 4], "data_offsets": [0, 0]}}, b"",
     r"declares 0 bytes but its shape \(4294967296, 4294967296, 4\) of F32 needs 295147905179352825856"),
])
def test_every_reader_refuses_a_malformed_header_by_name(tmp_path, reader, header, data, message):
    path = str(tmp_path / "bad.safetensors")
    write_header(path, header, data)
    with pytest.raises(CheckpointError, match=rf"bad.safetensors: .*{message}"):
        READERS[reader](path)


@pytest.mark.parametrize("reader", list(READERS))
def test_a_key_twice_in_the_header_is_refused(tmp_path, reader):
    """json.loads keeps the last of two equal keys: a second entry would silently win."""
    path = str(tmp_path / "twice.safetensors")
    write_header(path, None, bytes(8), raw_text='{"a": %s, "a": %s}' % (
        json.dumps(f32([2], 0)), json.dumps(f32([1], 0))))
    with pytest.raises(CheckpointError, match=r"twice.safetensors: header: key 'a' appears twice"):
        READERS[reader](path)


def test_a_header_claiming_a_trillion_elements_is_refused_before_allocating(tmp_path):
    path = str(tmp_path / "huge.safetensors")
    write_header(path, {"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6],
                              "data_offsets": [0, 4 * 10 ** 12]}}, bytes(16))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"tensor 'w' ends at byte 4000000000000 .*truncated"):
            load_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_load_model_uses_the_same_validation(tmp_path):
    """load_model reads tensors through memory maps; it accepted what load_safetensors
    refused: here two parameters read from the same bytes."""
    folder, _, _ = saved_tiny(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    entries, _, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        data = f.read()[start:]
    header = {k: {"dtype": e["dtype"], "shape": list(e["shape"]), "data_offsets": [e["begin"], e["end"]]}
              for k, e in entries.items()}
    header["model.norm.weight"]["data_offsets"] = \
        header["model.layers.0.input_layernorm.weight"]["data_offsets"]
    write_header(path, header, data)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' \(bytes .*\) overlaps"):
        load_model(folder)


# ---------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_weight_is_refused_at_load(tmp_path, value):
    folder, _, _ = saved_tiny(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"

    def spoil(t):
        t[name] = t[name].copy()
        t[name][3, 7] = value
    rewrite_weights(folder, spoil)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' holds NaN or Inf"):
        load_model(folder)


def test_a_weight_beyond_float16_is_refused_when_held_as_float16(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    name = "model.embed_tokens.weight"
    rewrite_weights(folder, lambda t: t[name].__setitem__((0, 0), 1e6))
    assert load_model(folder)[1][name][0, 0] == 1e6
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds NaN or Inf values "
                                              r"\(stored as F32, held as float16\)"):
        load_model(folder, frozen_dtype="float16")


def test_a_weight_whose_block_scale_overflows_is_refused(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight"
    rewrite_weights(folder, lambda t: t[name].__setitem__((0, 0), 1e30))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds NaN or Inf values "
                                              r"\(stored as F32, held as q8_0\)"):
        load_model(folder, frozen_dtype="q8_0")


# ---------------------------------------------------------------- sharded index files

def sharded_tiny(tmp_path):
    folder, cfg, params = saved_tiny(tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    names = list(params)
    save_safetensors_atomic(os.path.join(folder, "a.safetensors"), {n: params[n] for n in names[:5]})
    save_safetensors_atomic(os.path.join(folder, "b.safetensors"), {n: params[n] for n in names[5:]})
    weight_map = {n: "a.safetensors" if i < 5 else "b.safetensors" for i, n in enumerate(names)}
    return folder, weight_map


def write_index(folder, obj=None, text=None):
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        f.write(text if text is not None else json.dumps(obj))


@pytest.mark.parametrize("index, message", [
    ("{not json", r"index.json: not valid JSON"),
    ("[1, 2]", r"index.json: expected a JSON object with a 'weight_map' object"),
    ('{"weight_map": ["a.safetensors"]}', r"index.json: expected a JSON object with a 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map maps 'model.norm.weight' to 3; expected the name of a shard file"),
    ('{"weight_map": {"model.norm.weight": null}}', r"maps 'model.norm.weight' to None"),
    ('{"weight_map": {"model.norm.weight": ""}}', r"maps 'model.norm.weight' to ''"),
    ('{"weight_map": {"model.norm.weight": "../a.safetensors"}}', r"to '../a.safetensors', outside the model folder"),
    ('{"weight_map": {"model.norm.weight": "/etc/passwd"}}', r"to '/etc/passwd', outside the model folder"),
    ('{"weight_map": {"a": "a.safetensors", "a": "b.safetensors"}}', r"index.json: key 'a' appears twice"),
    ('{"weight_map": {"model.norm.weight": "c.safetensors"}}', r"c.safetensors: file not found"),
])
def test_a_malformed_index_is_refused_by_name(tmp_path, index, message):
    folder, _ = sharded_tiny(tmp_path)
    write_index(folder, text=index)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_an_index_entry_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder, weight_map = sharded_tiny(tmp_path)
    os.rename(os.path.join(folder, "b.safetensors"), tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", os.path.join(folder, "b.safetensors"))
    write_index(folder, {"weight_map": weight_map})
    with pytest.raises(CheckpointError, match=r"to 'b.safetensors', outside the model folder"):
        load_model(folder)
    os.remove(os.path.join(folder, "b.safetensors"))                 # a link inside is fine
    os.rename(tmp_path / "outside.safetensors", os.path.join(folder, "b-real.safetensors"))
    os.symlink("b-real.safetensors", os.path.join(folder, "b.safetensors"))
    assert load_model(folder)[1]


def test_config_json_errors_are_named_through_load_model(tmp_path):
    folder, _, _ = saved_tiny(tmp_path)
    path = os.path.join(folder, "config.json")
    with open(path, "wb") as f:
        f.write(b'{"hidden_size": "\xff"}')
    with pytest.raises(ConfigError, match=r"config.json: not UTF-8 text"):
        load_model(folder)


def test_a_config_claiming_millions_of_layers_is_refused_without_building_them(tmp_path):
    """Found by the readers' fuzz test (a flipped byte in a GGUF's block count): the name
    table of 10^7 claimed layers took seconds and hundreds of MB for a file of kilobytes."""
    folder, cfg, _ = saved_tiny(tmp_path)
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    config["num_hidden_layers"] = 10 ** 7
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"the config implies 10000000 layers but only "
                                                  r"\d+ tensors were found"):
            load_model(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
