"""Evaluation: multiple-choice accuracy by log-likelihood, and perplexity.

Multiple choice (as lm-evaluation-harness scores "rc" tasks): each choice i is a request
(context_i, continuation_i); its score is the summed log-probability of the continuation's
tokens given the context. acc picks the highest score; acc_norm divides each score by the
continuation's length in bytes first. WinoGrande rows are scored by partial evaluation:
the contexts differ (they end with each option), the continuation is shared.
Perplexity: exp of the mean next-token loss over non-overlapping windows of `seq` tokens.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from minilars.data.mmlu import load_mmlu
from minilars.data.tasks import eval_split, load_task
from minilars.generate import KVCache, forward_cached, repeat_cache
from minilars.model import Model, StepOptions, check_inputs, forward_hidden, forward_loss
from minilars.ops.linear import _matmul_xwT
from minilars.ops.loss import logsumexp
from minilars.params import lm_head_name


def mc_requests(row: dict) -> list[tuple[str, str]]:
    """(context, continuation) for each choice of a multiple-choice row."""
    if "contexts" in row and "continuation" in row:
        return [(ctx, " " + row["continuation"].lstrip()) for ctx in row["contexts"]]
    return [(row["query"], " " + str(c).lstrip()) for c in row["choices"]]


def continuation_logprobs(model: Model, tok, requests: list[tuple[str, str]], max_len: int,
                          batch: int = 8, opts: StepOptions = StepOptions(),
                          progress=None) -> list[float]:
    """Summed log p(continuation | context) for each request, batched by length."""
    encoded = []
    for ctx, cont in requests:
        c_ids, k_ids = tok.encode(ctx), tok.encode(cont)
        if not k_ids:
            raise ValueError(f"continuation {cont!r} encodes to no tokens")
        ids = (c_ids + k_ids)[-max_len:]
        n_cont = min(len(k_ids), len(ids) - 1)
        encoded.append((ids, n_cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    W = model.params[lm_head_name(model.cfg)]
    pad = tok.eos_id or 0
    for b0 in range(0, len(order), batch):
        chunk = order[b0:b0 + batch]
        T = max(len(encoded[i][0]) for i in chunk)
        tokens = np.full((len(chunk), T), pad, dtype=np.int64)
        for r, i in enumerate(chunk):
            tokens[r, :len(encoded[i][0])] = encoded[i][0]
        hidden = forward_hidden(model, tokens, opts)                     # (b, T, C)
        for r, i in enumerate(chunk):
            ids, n_cont = encoded[i]
            L = len(ids)
            rows = hidden[r, L - 1 - n_cont: L - 1]                     # predict the continuation
            logp = _log_softmax(_matmul_xwT(np.ascontiguousarray(rows), W))   # (n_cont, V)
            scores[i] = float(logp[np.arange(n_cont), ids[L - n_cont:]].sum())
        if progress:
            progress(min(b0 + batch, len(order)), len(order))
    return scores


def shared_context_logprobs(model: Model, tok, context: str, continuations: list[str],
                            max_len: int) -> list[float]:
    """Summed log p(continuation_i | context) for choices that share one context: the
    context runs once into a KV cache, then all continuations run as one batch against
    copies of it. Same numbers as continuation_logprobs, a fraction of the work when the
    context is long and the choices short (ARC, HellaSwag, BoolQ, PIQA, MMLU)."""
    conts = [tok.encode(c) for c in continuations]
    if any(not c for c in conts):
        raise ValueError(f"a continuation of {continuations!r} encodes to no tokens")
    K = max(len(c) for c in conts)
    ctx = tok.encode(context)[-(max_len - K):]
    if not ctx:
        return continuation_logprobs(model, tok, [(context, c) for c in continuations], max_len)
    W = model.params[lm_head_name(model.cfg)]
    cache = KVCache.empty(model, 1, len(ctx))
    last = forward_cached(model, np.array([ctx]), cache, return_hidden=True)[:, -1]   # (1, C)
    first = _log_softmax(_matmul_xwT(np.ascontiguousarray(last), W))[0]             # (V,)
    scores = [float(first[c[0]]) for c in conts]
    if K > 1:
        tokens = np.array([(c + [c[-1]] * K)[:K - 1] for c in conts])                 # (n, K-1)
        hidden = forward_cached(model, tokens, repeat_cache(cache, len(conts), K - 1),
                                return_hidden=True)                                   # (n, K-1, C)
        for i, c in enumerate(conts):
            if len(c) > 1:
                logp = _log_softmax(_matmul_xwT(np.ascontiguousarray(hidden[i, :len(c) - 1]), W))
                scores[i] += float(logp[np.arange(len(c) - 1), c[1:]].sum())
    return scores


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """(rows, V) logits -> log-probabilities, with the loss's row-wise logsumexp."""
    return logits - logsumexp(logits)[:, None]


def score_multiple_choice(model: Model, tok, rows: list[dict], max_len: int = 1024,
                          batch: int = 8, progress=None) -> dict:
    """Rows whose choices share a context go through shared_context_logprobs; the rest
    (WinoGrande's partial evaluation) through batched continuation_logprobs."""
    scores_by_row: dict[int, list[float]] = {}
    separate = []
    for r, row in enumerate(rows):
        reqs = mc_requests(row)
        if len({ctx for ctx, _ in reqs}) == 1:
            scores_by_row[r] = shared_context_logprobs(model, tok, reqs[0][0],
                                                       [c for _, c in reqs], max_len)
            if progress:
                progress(len(scores_by_row), len(rows))
        else:
            separate.append(r)
    if separate:
        requests = [req for r in separate for req in mc_requests(rows[r])]
        flat = continuation_logprobs(model, tok, requests, max_len, batch)
        k = 0
        for r in separate:
            n = len(mc_requests(rows[r]))
            scores_by_row[r], k = flat[k:k + n], k + n
        if progress:
            progress(len(rows), len(rows))
    scores = [s for r in range(len(rows)) for s in scores_by_row[r]]
    correct = correct_norm = 0
    per_row = []
    k = 0
    for row in rows:
        reqs = mc_requests(row)
        s = np.array(scores[k:k + len(reqs)])
        lengths = np.array([max(1, len(cont.encode("utf-8"))) for _, cont in reqs])
        k += len(reqs)
        pred, pred_norm = int(np.argmax(s)), int(np.argmax(s / lengths))
        correct += pred == row["gold"]
        correct_norm += pred_norm == row["gold"]
        per_row.append({"id": row.get("id"), "gold": row["gold"], "pred": pred,
                        "pred_norm": pred_norm})
    n = len(rows)
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "acc_stderr": math.sqrt(max(correct / n * (1 - correct / n), 0) / max(n - 1, 1)),
            "predictions": per_row}


def perplexity(model: Model, tok, text: str, seq: int = 512, opts: StepOptions = StepOptions(),
               progress=None, max_tokens: int | None = None) -> dict:
    ids = tok.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("text is too short to measure perplexity (fewer than 2 tokens)")
    check_inputs(model.cfg, np.zeros((1, min(seq, len(ids))), dtype=np.int64))
    total, count = 0.0, 0
    windows = list(range(0, len(ids) - 1, seq))
    for n, w0 in enumerate(windows):
        window = np.array(ids[w0:w0 + seq + 1])
        if len(window) < 2:
            break
        tokens = window[None, :-1]
        targets = window[None, 1:]
        loss, k = forward_loss(model, tokens, targets, opts)
        total += loss * k
        count += k
        if progress:
            progress(n + 1, len(windows))
    nll = total / count
    return {"tokens": count, "nll": nll, "ppl": math.exp(nll), "seq": seq}


def print_progress(done: int, total: int, label: str = "") -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    end = "\n" if done >= total else ""
    print(f"\r{label}[{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end,
          file=sys.stderr, flush=True)


def load_eval_rows(task: str, data_dir: str = "data", limit: int | None = None, seed: int = 0,
                   split: str | None = None) -> list[dict]:
    """A task's scored split (or an MMLU group, "mmlu_<group>"), optionally a seeded subset."""
    if task.startswith("mmlu_"):
        rows = load_mmlu(task[len("mmlu_"):], split or "test")
    else:
        rows = load_task(task, split or eval_split(task, data_dir), data_dir)
    if limit is not None and limit < len(rows):
        keep = np.random.default_rng([seed, 11]).permutation(len(rows))[:limit]
        rows = [rows[i] for i in sorted(keep)]
    return rows
