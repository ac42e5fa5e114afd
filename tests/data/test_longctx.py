"""Long-context probes: determinism per seed, lengths, depths, train/eval key alphabets."""

import string

import pytest
from hypothesis import given, settings, strategies as st

from minilars.data import longctx as L


class WordTokenizer:
    """A tokenizer-like stand-in: one id per whitespace-separated word."""

    def encode(self, text):
        return list(range(len(text.split())))


class EncodingTokenizer:
    """Like `tokenizers.Tokenizer`: encode returns an object with `.ids`."""

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self.Encoding(list(text.encode()))


PROBES = [L.passkey_retrieval, L.kv_lookup, L.multi_needle]


@pytest.mark.parametrize("probe", PROBES)
def test_same_seed_same_rows_other_seed_other_rows(probe):
    a = probe(3, target_chars=1500, depth=0.3, seed=7)
    b = probe(3, target_chars=1500, depth=0.3, seed=7)
    c = probe(3, target_chars=1500, depth=0.3, seed=8)
    assert a == b
    assert [r["answer"] for r in a] != [r["answer"] for r in c]
    assert len({r["answer"] for r in a}) == 3


@pytest.mark.parametrize("probe", PROBES)
def test_answer_is_in_the_prompt_and_length_within_target(probe):
    for row in probe(4, target_chars=2000, depth=0.5):
        assert row["length"] == len(row["query"]) <= 2000
        assert row["length"] > 1800  # filled up, not just short
        assert row["target"] == " " + row["answer"]
        for part in row["answer"].split(", "):
            assert part in row["query"]


@pytest.mark.parametrize("probe", PROBES)
def test_tokens_are_targeted_with_a_tokenizer(probe):
    for tokenizer in (WordTokenizer(), EncodingTokenizer()):
        for row in probe(2, target_tokens=600, depth=0.5, tokenizer=tokenizer):
            measured = tokenizer.encode(row["query"])
            count = len(getattr(measured, "ids", measured))
            assert row["length"] == count <= 600
            assert count >= 570
            assert row["length_unit"] == "tokens"


def test_too_small_a_target_gives_the_shortest_prompt():
    row = L.multi_needle(1, target_chars=50)[0]
    assert row["length"] > 50 and all(code in row["query"] for code in row["codes"])


def test_tokens_without_tokenizer_mean_four_chars_each():
    row = L.passkey_retrieval(1, target_tokens=500)[0]
    assert row["length_unit"] == "chars" and row["target_length"] == 2000
    assert 1900 < len(row["query"]) <= 2000


def test_train_and_eval_keys_never_meet():
    train_seed, train_alphabet = L.split_defaults("train")
    eval_seed, eval_alphabet = L.split_defaults("eval")
    assert train_seed != eval_seed and set(train_alphabet) != set(eval_alphabet)
    train = L.kv_lookup(20, target_chars=3000, seed=train_seed, alphabet=train_alphabet)
    evals = L.kv_lookup(20, target_chars=3000, seed=eval_seed, alphabet=eval_alphabet)
    train_keys = {r["key"] for r in train}
    eval_keys = {r["key"] for r in evals}
    assert all(set(k) <= set(string.ascii_lowercase + string.digits) for k in train_keys)
    assert all(set(k) <= set(string.ascii_uppercase + string.digits) for k in eval_keys)
    assert train_keys.isdisjoint(eval_keys)
    passkeys = L.passkey_retrieval(20, target_chars=800, seed=train_seed, alphabet=train_alphabet)
    assert all(any(c.islower() for c in r["answer"]) for r in passkeys)


@settings(max_examples=15)
@given(depth=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_passkey_sits_at_its_depth(depth, seed):
    row = L.passkey_retrieval(1, target_chars=4000, depth=depth, seed=seed)[0]
    query = row["query"]
    body_start = len(L.PASSKEY_INTRO) + 2
    body_end = len(query) - len(L.PASSKEY_QUESTION) - 2
    where = query.index("The pass key is") - body_start
    assert abs(where / (body_end - body_start) - depth) < 0.1


@settings(max_examples=15)
@given(depth=st.floats(0.0, 1.0), n=st.integers(100, 4000))
def test_kv_asks_the_key_at_its_depth(depth, n):
    row = L.kv_lookup(1, target_chars=n, depth=depth, seed=3)[0]
    lines = [line for line in row["query"].splitlines() if line.startswith("The value of key")]
    assert len(lines) == row["n_keys"] >= 1
    asked = round(depth * (len(lines) - 1))
    assert lines[asked] == f"The value of key {row['key']} is {row['answer']}."


def test_multi_needle_codes_in_order():
    row = L.multi_needle(1, target_chars=5000, depth=0.2, n_needles=4)[0]
    positions = [row["query"].index(code) for code in row["codes"]]
    assert positions == sorted(positions)
    assert row["answer"] == ", ".join(row["codes"])
    assert row["depth"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    explicit = L.multi_needle(1, target_chars=5000, depth=[0.9, 0.1, 0.5], n_needles=3)[0]
    assert explicit["depth"] == [0.1, 0.5, 0.9]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth must be within 0..1"):
        L.passkey_retrieval(1, target_chars=100, depth=1.5)
    with pytest.raises(ValueError, match="exactly one of target_tokens and target_chars"):
        L.passkey_retrieval(1, target_tokens=10, target_chars=100)
    with pytest.raises(ValueError, match="tokenizer: expected an object with an encode"):
        L.passkey_retrieval(1, target_tokens=10, tokenizer=object())
    with pytest.raises(ValueError, match="split_defaults"):
        L.split_defaults("dev")


def _paper(i, n_paragraphs):
    paragraphs = [{"section": "S", "text": f"Paper {i} paragraph {j} " + "words " * 30}
                  for j in range(n_paragraphs)]
    paragraphs.insert(n_paragraphs // 2, {"section": "S", "text": f"EVIDENCE of paper {i}."})
    return {"id": f"p{i}_0", "paper_id": f"p{i}", "title": f"Title {i}", "query": f"Q{i}?",
            "choices": ["Yes", "No"], "gold": i % 2, "paragraphs": paragraphs,
            "evidence": [f"EVIDENCE of paper {i}."]}


def test_qasper_windows_place_evidence_and_pad_short_papers():
    rows = [_paper(i, 4 if i == 0 else 40) for i in range(6)]
    windows = L.qasper_windows(rows, target_chars=3000, depth=0.75)
    assert [w["source_id"] for w in windows] == [r["id"] for r in rows]
    for window, row in zip(windows, rows):
        query = window["query"]
        assert len(query) <= 3000 and query.count(row["evidence"][0]) == 1
        assert query.startswith(row["title"]) and query.endswith(f"Question: {row['query']}\nAnswer:")
        assert window["answer"] == row["choices"][row["gold"]]
        body = query[len(row["title"]):-len(row["query"])]
        assert abs(body.index("EVIDENCE") / len(body) - 0.75) < 0.15
    assert windows[0]["padded"] and not windows[1]["padded"]
    assert windows == L.qasper_windows(rows, target_chars=3000, depth=0.75)


def test_qasper_split_is_by_paper():
    rows = [dict(_paper(i, 2), id=f"p{i // 2}_{i % 2}", paper_id=f"p{i // 2}") for i in range(40)]
    train, evals = L.qasper_split(rows, "train"), L.qasper_split(rows, "eval")
    assert len(train) + len(evals) == 40 and train and evals
    assert {r["paper_id"] for r in train}.isdisjoint({r["paper_id"] for r in evals})
