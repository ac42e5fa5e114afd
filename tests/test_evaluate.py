"""Evaluation: log-likelihood scoring equals a brute-force reference; accuracy logic;
perplexity; the experiment report."""
import math

import numpy as np
import pytest

from minilars import evaluate
from minilars.model import forward_logits
from minilars.train import load_base
from tiny_folder import make_tiny_folder


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    folder = make_tiny_folder(str(tmp_path_factory.mktemp("tiny") / "m"), seed=1)
    return load_base(folder, dtype=np.float64)


def brute_force_logprob(model, tok, context, continuation):
    c, k = tok.encode(context), tok.encode(continuation)
    logits = forward_logits(model, np.array([c + k]))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return sum(logp[len(c) - 1 + i, t] for i, t in enumerate(k))


def test_batched_scores_equal_one_by_one_reference(model_tok):
    model, tok = model_tok
    requests = [("I inherited from my parents", " a reckless spirit"),
                ("Question: yes or no?\nAnswer:", " yes"),
                ("Question: yes or no?\nAnswer:", " no maybe"),
                ("school", " building and lay helpless for a week")]
    got = evaluate.continuation_logprobs(model, tok, requests, max_len=64, batch=3)
    want = [brute_force_logprob(model, tok, c, k) for c, k in requests]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_shared_context_scores_equal_the_reference(model_tok):
    model, tok = model_tok
    context = "Question: yes or no?\nAnswer:"
    choices = [" yes", " no maybe", " a reckless spirit that has caused me trouble"]
    got = evaluate.shared_context_logprobs(model, tok, context, choices, max_len=64)
    want = [brute_force_logprob(model, tok, context, c) for c in choices]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_accuracy_and_length_normalisation(monkeypatch, model_tok):
    model, tok = model_tok
    rows = [{"query": "q1", "choices": ["a", "bbbb"], "gold": 1},
            {"query": "q2", "choices": ["a", "bbbb"], "gold": 0}]
    # scores: row 1 prefers "a" raw (-2 > -4) but "bbbb" per byte (-4/5 > -2/2)
    table = {("q1", " a"): -2.0, ("q1", " bbbb"): -4.0, ("q2", " a"): -1.0, ("q2", " bbbb"): -8.0}
    monkeypatch.setattr(evaluate, "shared_context_logprobs",
                        lambda m, t, ctx, conts, max_len: [table[ctx, c] for c in conts])
    res = evaluate.score_multiple_choice(model, tok, rows)
    assert res["acc"] == 0.5 and res["acc_norm"] == 1.0
    assert [p["pred"] for p in res["predictions"]] == [0, 0]


def test_winogrande_rows_use_partial_evaluation():
    row = {"contexts": ["Sarah helped Maria so Sarah", "Sarah helped Maria so Maria"],
           "continuation": " was thanked.", "gold": 1}
    assert evaluate.mc_requests(row) == [("Sarah helped Maria so Sarah", " was thanked."),
                                         ("Sarah helped Maria so Maria", " was thanked.")]


def test_perplexity_is_exp_of_mean_loss_and_counts_each_token_once(model_tok):
    model, tok = model_tok
    text = "I inherited from my parents a reckless spirit that has caused me trouble ever since."
    ids = tok.encode(text)
    res = evaluate.perplexity(model, tok, text, seq=7)
    assert res["tokens"] == len(ids) - 1
    whole = evaluate.perplexity(model, tok, text, seq=len(ids))
    assert whole["tokens"] == len(ids) - 1
    logits = forward_logits(model, np.array([ids]))[0]
    m = logits.max(-1)
    lse = m + np.log(np.exp(logits - m[:, None]).sum(-1))
    nll = np.mean(lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]])
    assert math.isclose(whole["ppl"], math.exp(nll), rel_tol=1e-9)
