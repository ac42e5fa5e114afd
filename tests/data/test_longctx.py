"""The long-context probe (key-value lookup): determinism per seed, lengths, depths,
train/eval key alphabets."""

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


PROBES = [L.kv_lookup]


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
    assert all(any(c.islower() for c in k) for k in train_keys)     # every key holds a letter


@settings(max_examples=15)
@given(depth=st.floats(0.0, 1.0), n=st.integers(100, 4000))
def test_kv_asks_the_key_at_its_depth(depth, n):
    row = L.kv_lookup(1, target_chars=n, depth=depth, seed=3)[0]
    lines = [line for line in row["query"].splitlines() if line.startswith("The value of key")]
    assert len(lines) == row["n_keys"] >= 1
    asked = round(depth * (len(lines) - 1))
    assert lines[asked] == f"The value of key {row['key']} is {row['answer']}."


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth must be within 0..1"):
        L.kv_lookup(1, target_chars=100, depth=1.5)
    with pytest.raises(ValueError, match="exactly one of target_tokens and target_chars"):
        L.kv_lookup(1, target_tokens=10, target_chars=100)
    with pytest.raises(ValueError, match="tokenizer: expected an object with an encode"):
        L.kv_lookup(1, target_tokens=10, tokenizer=object())
    with pytest.raises(ValueError, match="split_defaults"):
        L.split_defaults("dev")


