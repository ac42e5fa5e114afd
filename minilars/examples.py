"""Training examples: token ids plus a mask of which tokens carry a loss, and batches.

Three formats, detected per JSONL line (checked as each line is read: minilars.data.tasks
read_jsonl and check_row, which name the file and line of a row that fits none):
  {"text": ...}                          plain text: every token is predicted
  {"prompt": ..., "completion": ...}     loss on the completion only
  {"query", "choices", "gold"}           a multiple-choice row (minilars data files),
                                         trained as prompt=query, completion=" "+choices[gold]
                                         (WinoGrande rows: prompt=contexts[gold],
                                         completion=" "+continuation)
Long text is cut into windows of `seq` tokens; a too-long prompt is cut from the left so
the completion survives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from minilars.data.tasks import DataError, read_jsonl  # noqa: F401  (train reads --data here)
from minilars.model import next_token_targets


@dataclass
class Example:
    tokens: list        # token ids
    loss_mask: list     # loss_mask[t] true: token t is a target (predicted from t-1)


def prompt_completion(row: dict) -> tuple[str, str]:
    """(prompt, completion) of a prompt/completion or multiple-choice row (one that
    check_row accepts)."""
    if "prompt" in row and "completion" in row:
        return row["prompt"], row["completion"]
    if "contexts" in row and "continuation" in row:
        return row["contexts"][row["gold"]], " " + row["continuation"].lstrip()
    if "query" in row and "choices" in row and "gold" in row:
        return row["query"], " " + row["choices"][row["gold"]].lstrip()
    raise DataError(f"a row with keys {sorted(row)[:10]} has neither text, prompt/completion "
                    f"nor query/choices/gold")


def encode_prompt_completion(tok, prompt: str, completion: str, seq: int,
                             add_bos: bool = False, add_eos: bool = True) -> Example:
    p = tok.encode(prompt, add_bos=add_bos)
    c = tok.encode(completion)
    if add_eos and tok.eos_id is not None:
        c = c + [tok.eos_id]
    if len(c) >= seq:
        c = c[: seq - 1]
    p = p[-(seq - len(c)):]
    return Example(p + c, [False] * len(p) + [True] * len(c))


def text_windows(tok, text: str, seq: int, add_bos: bool = False) -> list[Example]:
    ids = tok.encode(text, add_bos=add_bos)
    return [Example(ids[i:i + seq], [True] * len(ids[i:i + seq]))
            for i in range(0, max(len(ids) - 1, 1), seq) if len(ids[i:i + seq]) > 1]


def encode_rows(tok, rows: list[dict], seq: int) -> list[Example]:
    out = []
    for row in rows:
        if "text" in row:
            out.extend(text_windows(tok, row["text"], seq))
        else:
            out.append(encode_prompt_completion(tok, *prompt_completion(row), seq))
    return out


def make_batch(examples: list[Example], pad_id: int):
    """(tokens (B, T), targets (B, T)) right-padded to the longest example; padding and
    prompt tokens get target IGNORE."""
    T = max(len(e.tokens) for e in examples)
    tokens = np.full((len(examples), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), T), dtype=bool)
    for b, e in enumerate(examples):
        tokens[b, :len(e.tokens)] = e.tokens
        mask[b, :len(e.tokens)] = e.loss_mask
    return tokens, next_token_targets(tokens, mask)


def batch_indices(n_examples: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Indices of the examples of step `step`: epochs are seeded permutations, so the
    batch of any step depends only on (seed, step), which makes --resume exact."""
    start = step * batch
    idx = []
    while len(idx) < batch:
        epoch, offset = divmod(start + len(idx), n_examples)
        perm = np.random.default_rng([seed, epoch]).permutation(n_examples)
        idx.extend(perm[offset: offset + batch - len(idx)].tolist())
    return np.array(idx)
