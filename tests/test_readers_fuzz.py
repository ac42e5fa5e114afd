"""Property-based fuzzing of every reader of a file a user can hand minilars: safetensors
headers and data, sharded index files, config.json, adapter_config.json (with its
tensors), run.json, data JSONL, and GGUF headers.

Each case builds one file (or folder) from a valid one by hypothesis-drawn damage, reads
it, and asserts three things:
  - the read succeeds, or raises one of minilars's named errors (a class defined in
    minilars, derived from ValueError): never another exception;
  - it ends within a deadline: a 10 s alarm per read turns a hang into a failure;
  - the peak traced allocation (tracemalloc) stays under 16 x the input's size + 4 MiB,
    so a header claiming a 10^12-element tensor in a 100-byte file is refused before
    anything is allocated.
MINILARS_FUZZ_EXAMPLES=N runs N cases per reader (the defaults take about 30 s on a busy
2-core machine); every test prints "fuzz: READER: N cases (L loaded, R refused)" (-s)."""
import gzip
import json
import math
import os
import shutil
import signal
import tracemalloc
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from minilars.adapters import adapter_for, attach
from minilars.config import ModelConfig, named_config
from minilars.data.tasks import read_jsonl
from minilars.examples import encode_rows
from minilars.io.gguf import read_gguf
from minilars.io.gguf_model import load_gguf
from minilars.io.peft import load_adapter, read_adapter_config, save_adapter
from minilars.io.safetensors_io import (load_model, load_safetensors, read_safetensors_header,
                                        save_model, save_safetensors_atomic)
from minilars.io.tokenizer import Tokenizer
from minilars.model import Model
from minilars.params import LINEAR_NAMES, init_params
from minilars.runs import RunError, read_run_json
from tests.tiny_folder import make_tiny_folder

MiB = 1 << 20
EXAMPLES = int(os.environ.get("MINILARS_FUZZ_EXAMPLES", "0"))
COUNTS: dict[str, Counter] = defaultdict(Counter)


def fuzz(default_examples: int):
    """Hypothesis settings of one reader's fuzz test. The deadline is attempt's alarm, not
    hypothesis's (which fails a case that a busy 2-core machine merely slowed once)."""
    return settings(max_examples=EXAMPLES or default_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.large_base_example])


def _timeout(signum, frame):
    raise TimeoutError("a reader ran for 10 s")


@pytest.fixture(scope="module", autouse=True)
def alarm_handler():
    previous = signal.signal(signal.SIGALRM, _timeout)
    yield
    signal.signal(signal.SIGALRM, previous)


def attempt(reader: str, read, size: int):
    """read() under tracemalloc and a 10 s alarm: its result, or None when it raised a
    named minilars error. Any other exception, or too large an allocation, fails."""
    signal.alarm(10)
    tracemalloc.start()
    try:
        result = read()
        COUNTS[reader]["loaded"] += 1
    except Exception as e:
        if not (type(e).__module__.startswith("minilars.") and isinstance(e, ValueError)):
            raise AssertionError(f"{reader}: not a named minilars error: "
                                 f"{type(e).__module__}.{type(e).__name__}: {e}") from e
        COUNTS[reader]["refused"] += 1
        result = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.alarm(0)
    assert peak <= 16 * size + 4 * MiB, f"{reader}: allocated {peak} bytes for a {size}-byte input"
    return result


def report(*readers: str) -> None:
    for reader in readers:
        c = COUNTS[reader]
        print(f"\nfuzz: {reader}: {c['loaded'] + c['refused']} cases "
              f"({c['loaded']} loaded, {c['refused']} refused)")


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- values a damaged file holds

LEAVES = (st.none() | st.booleans() | st.integers(-2 ** 66, 2 ** 66)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6))
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
SPECIAL = st.sampled_from([2.5, 8.7, "3", "F32", "BF16", "I8", True, False, -1, 0, 1, 2, 10 ** 12,
                           2 ** 63, 2 ** 64 + 1, [], {}, None, [0, 0], [1, 2, 3], [2.5], ["1"],
                           [10 ** 6, 10 ** 6], "all-linear", "..", "/etc/passwd"])
VALUES = SPECIAL | JSON


def damage_bytes(data: st.DataObject, blob: bytearray) -> None:
    """Up to three byte-level damages: flips, a cut, an insertion."""
    for _ in range(data.draw(st.integers(0, 3))):
        if not blob:
            return
        at = data.draw(st.integers(0, len(blob) - 1))
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[at:]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))


# ---------------------------------------------------------------- safetensors headers and data

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def damage_header(data: st.DataObject, header: dict) -> None:
    """One structural damage to a safetensors header (a dict of entries)."""
    names = list(header)
    kind = data.draw(st.sampled_from(["field", "entry", "shift", "huge", "alias", "drop",
                                      "metadata", "new"]))
    if kind in ("metadata", "new") or not names:
        key = "__metadata__" if kind == "metadata" else data.draw(st.text(max_size=4))
        header[key] = data.draw(VALUES)
        return
    name = data.draw(st.sampled_from(names))
    entry = header[name]
    if not isinstance(entry, dict) or kind == "entry":
        header[name] = data.draw(VALUES)
    elif kind == "field":
        entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(VALUES)
    elif kind == "shift" and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
        i = data.draw(st.integers(0, len(entry["data_offsets"]) - 1))
        if isinstance(entry["data_offsets"][i], int):
            entry["data_offsets"][i] += data.draw(st.integers(-8, 8))
    elif kind == "huge":                      # 10^12 elements claimed
        entry.update(dtype="F32", shape=[10 ** 6, 10 ** 6], data_offsets=[0, 4 * 10 ** 12])
    elif kind == "alias":
        other = header[data.draw(st.sampled_from(names))]
        if isinstance(other, dict) and "data_offsets" in other:
            entry["data_offsets"] = other["data_offsets"]
    elif kind == "drop" and entry:
        entry.pop(data.draw(st.sampled_from(sorted(entry))))


def safetensors_blob(data: st.DataObject) -> bytes:
    header, offset = {}, 0
    for i in range(data.draw(st.integers(0, 4))):
        dtype = data.draw(st.sampled_from(sorted(SIZES)))
        shape = data.draw(st.lists(st.integers(0, 3), max_size=3))
        n = math.prod(shape) * SIZES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if data.draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    for _ in range(data.draw(st.integers(0, 3))):
        damage_header(data, header)
    text = json.dumps(header)
    if header and data.draw(st.integers(0, 9)) == 0:          # a key twice
        first = next(iter(header))
        text = "{" + json.dumps(first) + ": " + json.dumps(header[first]) + ", " + text[1:]
    raw = text.encode("utf-8", "surrogatepass")
    blob = bytearray(len(raw).to_bytes(8, "little") + raw
                     + data.draw(st.binary(min_size=offset, max_size=offset)))
    if data.draw(st.integers(0, 9)) == 0:                     # a lying header length
        blob[:8] = data.draw(st.sampled_from([0, 1, len(raw) + 1, 2 ** 63, 2 ** 64 - 1])).to_bytes(8, "little")
    damage_bytes(data, blob)
    return bytes(blob)


def test_safetensors_readers(work):
    path = str(work / "t.safetensors")

    @fuzz(800)
    @given(st.data())
    def case(data):
        blob = safetensors_blob(data)
        with open(path, "wb") as f:
            f.write(blob)
        attempt("read_safetensors_header", lambda: read_safetensors_header(path), len(blob))
        attempt("load_safetensors", lambda: load_safetensors(path), len(blob))

    case()
    report("read_safetensors_header", "load_safetensors")


# ---------------------------------------------------------------- sharded index files

@pytest.fixture(scope="module")
def sharded(work):
    """A tiny model folder in two shards, a file outside it and a symlink leading there."""
    folder = str(work / "sharded")
    cfg = named_config("tiny")
    params = init_params(cfg)
    save_model(folder, cfg, params)
    os.remove(os.path.join(folder, "model.safetensors"))
    names = list(params)
    save_safetensors_atomic(os.path.join(folder, "a.safetensors"), {n: params[n] for n in names[:6]})
    save_safetensors_atomic(os.path.join(folder, "b.safetensors"), {n: params[n] for n in names[6:]})
    outside = str(work / "outside.safetensors")
    shutil.copy(os.path.join(folder, "b.safetensors"), outside)
    os.symlink(outside, os.path.join(folder, "escape.safetensors"))
    os.symlink("a.safetensors", os.path.join(folder, "inner.safetensors"))
    return folder, {n: "a.safetensors" if i < 6 else "b.safetensors" for i, n in enumerate(names)}


SHARDS = st.sampled_from(["a.safetensors", "b.safetensors", "inner.safetensors", "escape.safetensors",
                          "../sharded/a.safetensors", "/etc/passwd", "", ".", "missing.safetensors",
                          "config.json", "model.safetensors.index.json", "a.safetensors\x00",
                          "\ud800", 5, None, ["a.safetensors"]])


def index_text(data: st.DataObject, weight_map: dict) -> bytes:
    kind = data.draw(st.sampled_from(["map"] * 6 + ["json", "bytes"]))
    if kind == "bytes":
        return data.draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(data.draw(VALUES)).encode()
    wm = dict(weight_map)
    for _ in range(data.draw(st.integers(0, 3))):
        name = data.draw(st.sampled_from(sorted(wm)))
        change = data.draw(st.sampled_from(["shard", "drop", "add"]))
        if change == "shard":
            wm[name] = data.draw(SHARDS)
        elif change == "drop":
            wm.pop(name, None)
        else:
            wm[data.draw(st.text(max_size=8))] = data.draw(SHARDS)
    index = {"metadata": {}, "weight_map": wm}
    if data.draw(st.integers(0, 5)) == 0:
        index[data.draw(st.sampled_from(["weight_map", "metadata"]))] = data.draw(VALUES)
    return json.dumps(index).encode("utf-8", "surrogatepass")


def test_sharded_index_files(sharded):
    folder, weight_map = sharded
    index = os.path.join(folder, "model.safetensors.index.json")

    def read(text):
        cfg, params = load_model(folder)
        assert b"escape.safetensors" not in text, "loaded a shard from outside the folder"
        return params

    @fuzz(300)
    @given(st.data())
    def case(data):
        text = index_text(data, weight_map)
        with open(index, "wb") as f:
            f.write(text)
        attempt("load_model (sharded index)", lambda: read(text), folder_size(folder))

    case()
    report("load_model (sharded index)")


# ---------------------------------------------------------------- config.json

CONFIG_KEYS = sorted(named_config("tiny").to_dict()) + ["rope_scaling", "head_dim", "model_type"]


def config_blob(data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["fields"] * 6 + ["json", "bytes"]))
    if kind == "bytes":
        return data.draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(data.draw(VALUES)).encode()
    cfg = named_config(data.draw(st.sampled_from(["tiny", "tiny-qwen2"]))).to_dict()
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(CONFIG_KEYS))
        if data.draw(st.booleans()):
            cfg.pop(key, None)
        else:
            cfg[key] = data.draw(VALUES | st.integers(-2, 300))
    blob = bytearray(json.dumps(cfg).encode("utf-8", "surrogatepass"))
    if data.draw(st.integers(0, 4)) == 0:
        damage_bytes(data, blob)
    return bytes(blob)


def test_config_json(work):
    path = str(work / "config.json")

    @fuzz(500)
    @given(st.data())
    def case(data):
        blob = config_blob(data)
        with open(path, "wb") as f:
            f.write(blob)
        attempt("ModelConfig.from_json", lambda: ModelConfig.from_json(path), len(blob))

    case()
    report("ModelConfig.from_json")


# ---------------------------------------------------------------- adapter_config.json and its tensors

ADAPTER_SETTINGS = {"lora": dict(rank=4, alpha=8.0), "ia3": {}, "lars": dict(rank=3, block=16)}
ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "block_size", "eps", "train_alpha",
                "saved_for_backward", "target_modules", "feedforward_modules", "layers_to_transform",
                "use_rslora", "use_dora", "bias", "alpha_pattern"]
MODULE_LISTS = st.lists(st.sampled_from(LINEAR_NAMES + ("c_attn", "all-linear")), max_size=4)


@pytest.fixture(scope="module")
def adapters(work):
    """The tiny base model's parameters, and each method's saved files (config, weights)."""
    cfg = named_config("tiny")
    base = init_params(cfg, 0, np.float32)
    saved = {}
    for method, settings_ in ADAPTER_SETTINGS.items():
        folder = work / f"adapter-{method}"
        model = attach(Model(cfg, dict(base)), adapter_for(method, **settings_))
        save_adapter(str(folder), model)
        saved[method] = (json.loads((folder / "adapter_config.json").read_text()),
                         (folder / "adapter_model.safetensors").read_bytes())
    return cfg, base, saved


def adapter_files(data: st.DataObject, saved: dict) -> tuple[bytes, bytes]:
    config, _ = saved[data.draw(st.sampled_from(sorted(saved)))]
    _, weights = saved[data.draw(st.sampled_from(sorted(saved)))]
    kind = data.draw(st.sampled_from(["keys"] * 6 + ["json", "bytes"]))
    if kind == "bytes":
        return data.draw(st.binary(max_size=200)), weights
    if kind == "json":
        return json.dumps(data.draw(VALUES)).encode(), weights
    config = dict(config)
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(ADAPTER_KEYS))
        if data.draw(st.booleans()):
            config.pop(key, None)
        else:
            config[key] = data.draw(VALUES | MODULE_LISTS | st.integers(-1, 3)
                                    | st.sampled_from(["LORA", "IA3", "LARS"]))
    blob = bytearray(weights)
    if data.draw(st.integers(0, 5)) == 0:
        damage_bytes(data, blob)
    return json.dumps(config).encode("utf-8", "surrogatepass"), bytes(blob)


def test_adapter_configs(adapters, work):
    cfg, base, saved = adapters
    folder = work / "adapter"
    folder.mkdir()

    @fuzz(400)
    @given(st.data())
    def case(data):
        config, weights = adapter_files(data, saved)
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        size = len(config) + len(weights)
        attempt("read_adapter_config", lambda: read_adapter_config(str(folder)), size)
        attempt("load_adapter", lambda: load_adapter(str(folder), Model(cfg, dict(base))), size)

    case()
    report("read_adapter_config", "load_adapter")


# ---------------------------------------------------------------- run.json

RUN = {"model": "weights/m", "method": "lora", "data": "d.jsonl", "steps": 10, "lr": 0.002,
       "seq": 64, "batch": 2, "seed": 0, "threads": 1}


def test_run_json(work):
    run_dir = work / "run"
    run_dir.mkdir()

    def read():
        options = read_run_json(str(run_dir))
        assert isinstance(options, dict)
        return options

    @fuzz(400)
    @given(st.data())
    def case(data):
        kind = data.draw(st.sampled_from(["options"] * 4 + ["json", "bytes"]))
        if kind == "bytes":
            blob = data.draw(st.binary(max_size=200))
        elif kind == "json":
            blob = json.dumps(data.draw(VALUES)).encode()
        else:
            options = dict(RUN)
            for _ in range(data.draw(st.integers(0, 3))):
                options[data.draw(st.sampled_from(sorted(RUN)))] = data.draw(VALUES)
            blob = bytearray(json.dumps(options).encode("utf-8", "surrogatepass"))
            damage_bytes(data, blob)
        (run_dir / "run.json").write_bytes(bytes(blob))
        attempt("read_run_json", read, len(blob))

    case()
    report("read_run_json")


@pytest.mark.parametrize("raw", [b"[" * 100000, b"1" * 5000], ids=["deep", "digits"])
def test_run_json_that_python_json_cannot_hold(tmp_path, raw):
    (tmp_path / "run.json").write_bytes(raw)
    with pytest.raises(RunError):
        read_run_json(str(tmp_path))


# ---------------------------------------------------------------- data JSONL

@pytest.fixture(scope="module")
def tokenizer(work):
    return Tokenizer.from_folder(make_tiny_folder(str(work / "tok")))


TEXTS = st.text(max_size=20)
ROWS = st.one_of(
    st.fixed_dictionaries({"text": TEXTS}),
    st.fixed_dictionaries({"prompt": TEXTS, "completion": TEXTS}),
    st.fixed_dictionaries({"query": TEXTS, "choices": st.lists(TEXTS, min_size=1, max_size=3),
                           "gold": st.integers(0, 2)}),
    st.fixed_dictionaries({"contexts": st.lists(TEXTS, min_size=1, max_size=3),
                           "continuation": TEXTS, "gold": st.integers(0, 2)}))
ROW_KEYS = ["text", "prompt", "completion", "query", "choices", "gold", "contexts", "continuation"]


def jsonl_line(data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["row"] * 5 + ["damaged", "json", "bytes", "surrogate"]))
    if kind == "bytes":
        return data.draw(st.binary(max_size=40)).replace(b"\n", b"")
    if kind == "json":
        return json.dumps(data.draw(VALUES)).encode()
    if kind == "surrogate":
        return b'{"text": "a\\ud800b"}'
    row = data.draw(ROWS)
    if kind == "damaged":
        row[data.draw(st.sampled_from(ROW_KEYS))] = data.draw(VALUES)
    return json.dumps(row).encode()


def test_data_jsonl(work, tokenizer):
    @fuzz(400)
    @given(st.data())
    def case(data):
        blob = b"\n".join(jsonl_line(data) for _ in range(data.draw(st.integers(0, 5))))
        form = data.draw(st.sampled_from(["plain", "plain", "gzip", "cut gzip", "not gzip"]))
        if form in ("gzip", "cut gzip"):
            blob = gzip.compress(blob)
            if form == "cut gzip":
                blob = blob[:data.draw(st.integers(0, len(blob)))]
        path = str(work / ("d.jsonl" if form == "plain" else "d.jsonl.gz"))
        with open(path, "wb") as f:
            f.write(blob)
        attempt("read_jsonl + encode_rows",
                lambda: encode_rows(tokenizer, read_jsonl(path), seq=16), len(blob))

    case()
    report("read_jsonl + encode_rows")


# ---------------------------------------------------------------- GGUF headers

SCALAR_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(blob: bytes, gf) -> list[tuple[int, int]]:
    """(offset, width) of every number in a GGUF header that keeps its layout when
    rewritten: scalar metadata values and their type ids, and each tensor's dims, type
    and offset."""
    out = []
    for key, value in gf.fields.items():
        if isinstance(value, (list, str)):
            continue
        type_at = blob.index(len(key).to_bytes(8, "little") + key.encode()) + 8 + len(key)
        width = SCALAR_WIDTHS[int.from_bytes(blob[type_at:type_at + 4], "little")]
        out += [(type_at, 4), (type_at + 4, width)]
    for name, t in gf.tensors.items():
        at = blob.index(len(name).to_bytes(8, "little") + name.encode()) + 8 + len(name)
        n_dims = len(t.shape)
        out += [(at, 4)] + [(at + 4 + 8 * d, 8) for d in range(n_dims)]
        out += [(at + 4 + 8 * n_dims, 4), (at + 8 + 8 * n_dims, 8)]
    return out


@pytest.fixture(scope="module")
def good_gguf(work):
    """A small valid GGUF (the GGUF tests' writer), where its header's parts begin, and
    where its numbers are."""
    pytest.importorskip("gguf")
    from tests.io.test_gguf_model import tiny_cfg, write_tiny_gguf      # the optional gguf writer
    path = work / "good.gguf"
    cfg = tiny_cfg(tied=True)
    write_tiny_gguf(path, cfg, init_params(cfg, seed=1))
    blob = path.read_bytes()
    gf = read_gguf(str(path))
    name = b"token_embd.weight"
    table = blob.index(len(name).to_bytes(8, "little") + name)
    data_start = min(t.offset for t in gf.tensors.values())
    regions = {"counts": (4, 24), "metadata": (24, table), "table": (table, data_start)}
    return blob, regions, gguf_fields(blob, gf)


NUMBERS = (st.sampled_from([0, 1, 2, 3, 6, 9, 30, 31, 32, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1])
           | st.integers(0, 2 ** 64 - 1))


def damaged_gguf(data: st.DataObject, good: bytes, regions: dict, fields: list) -> bytes:
    blob = bytearray(good)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]))):
        kind = data.draw(st.sampled_from(["number"] * 6 + ["value", "ascii", "flip", "cut",
                                                           "insert", "delete"]))
        if kind == "number":                  # the layout stays: a header that parses
            at, width = data.draw(st.sampled_from(fields))
            old = int.from_bytes(blob[at:at + width], "little")
            value = data.draw(NUMBERS | st.integers(-3, 3).map(lambda d: old + d))
            blob[at:at + width] = (value % (1 << 8 * width)).to_bytes(width, "little")
            continue
        begin, end = regions[data.draw(st.sampled_from(sorted(regions)))]
        at = data.draw(st.integers(begin, end - 1))
        if kind == "ascii":                   # a changed character keeps strings UTF-8
            blob[at] = data.draw(st.integers(0x20, 0x7E))
        elif kind == "value":
            width = data.draw(st.sampled_from([1, 2, 4, 8]))
            blob[at:at + width] = (data.draw(NUMBERS) % (1 << 8 * width)).to_bytes(width, "little")
        elif kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[at:]
            break
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del blob[at:at + data.draw(st.integers(1, 8))]
    return bytes(blob)


def test_gguf_headers(work, good_gguf):
    good, regions, fields = good_gguf
    path = str(work / "fuzz.gguf")

    @fuzz(800)
    @given(st.data())
    def case(data):
        blob = damaged_gguf(data, good, regions, fields)
        with open(path, "wb") as f:
            f.write(blob)
        if attempt("read_gguf", lambda: read_gguf(path), len(blob)) is not None:
            attempt("load_gguf", lambda: load_gguf(path), len(blob))

    case()
    report("read_gguf", "load_gguf")
