"""The synthetic long-context probe of the experiment: key-value lookup, generated from a seed.

Every generator returns rows with `task`, `id`, `query` (the whole prompt), `answer` (the
exact expected string), `target` (" " + answer: the continuation to score or train on),
`depth`, `length` (measured), `length_unit` and `target_length`.

Length. Pass `target_tokens` or `target_chars`. With a tokenizer (any object whose
`encode(text)` returns a list of ids or an object with `.ids`, e.g. a `tokenizers`
Tokenizer), `target_tokens` is met in tokens: the prompt is the longest one whose token
count is <= the target. Without a tokenizer, `target_tokens` means 4 * target_tokens
characters. A target too small for the fixed parts gives the shortest possible prompt.

Depth is a fraction 0..1 of the filler: 0 puts the needle first, 1 last.

Train and eval never share a key: eval keys are drawn from EVAL_ALPHABET (uppercase
letters and digits) with seed EVAL_SEED, train keys from TRAIN_ALPHABET (lowercase
letters and digits) with seed TRAIN_SEED, and every key holds at least one letter.
`split_defaults("train" | "eval")` gives (seed, alphabet).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

EVAL_ALPHABET = string.ascii_uppercase + string.digits
TRAIN_ALPHABET = string.ascii_lowercase + string.digits
EVAL_SEED = 1000
TRAIN_SEED = 2000
CHARS_PER_TOKEN = 4


def split_defaults(split: str) -> tuple[int, str]:
    """(seed, alphabet) used for a split: 'eval' (or 'test'/'validation') or 'train'."""
    if split == "train":
        return TRAIN_SEED, TRAIN_ALPHABET
    if split in ("eval", "test", "validation"):
        return EVAL_SEED, EVAL_ALPHABET
    raise ValueError(f"split_defaults: split {split!r}, expected 'train' or 'eval'")


# ---------------------------------------------------------------------------
# length

@dataclass(frozen=True)
class LengthTarget:
    """What to measure (tokens or characters) and the most allowed."""

    limit: int
    unit: str
    tokenizer: object | None = None

    def measure(self, text: str) -> int:
        if self.unit == "chars":
            return len(text)
        ids = self.tokenizer.encode(text)
        return len(getattr(ids, "ids", ids))

    def max_filler_chars(self) -> int:
        """An upper bound on the characters of filler worth trying."""
        return self.limit if self.unit == "chars" else self.limit * 12 + 64


def length_target(target_tokens: int | None, target_chars: int | None,
                  tokenizer: object | None) -> LengthTarget:
    """Resolve the (target_tokens, target_chars, tokenizer) arguments; see module doc."""
    if (target_tokens is None) == (target_chars is None):
        raise ValueError("give exactly one of target_tokens and target_chars, "
                         f"got target_tokens={target_tokens}, target_chars={target_chars}")
    value = target_tokens if target_tokens is not None else target_chars
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"target length must be a positive int, got {value!r}")
    if target_tokens is not None and tokenizer is not None:
        if not callable(getattr(tokenizer, "encode", None)):
            raise ValueError("tokenizer: expected an object with an encode(text) method")
        return LengthTarget(target_tokens, "tokens", tokenizer)
    if target_tokens is not None:
        return LengthTarget(target_tokens * CHARS_PER_TOKEN, "chars")
    return LengthTarget(target_chars, "chars")


def fit_to_length(build: Callable[[int], str], target: LengthTarget,
                  high: int) -> tuple[int, str]:
    """(n, build(n)) for the largest n in [0, high] whose text measures <= target.limit.

    build must grow with n. Binary search, so about log2(high) measurements.
    """
    low, best = 0, build(0)
    if target.measure(best) > target.limit:
        return 0, best
    while low < high:
        mid = (low + high + 1) // 2
        text = build(mid)
        if target.measure(text) <= target.limit:
            low, best = mid, text
        else:
            high = mid - 1
    return low, best


def _check_depth(depth: float, name: str = "depth") -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"{name} must be within 0..1, got {depth!r}")
    return float(depth)


def random_key(rng: random.Random, alphabet: str, length: int) -> str:
    """A key of `length` symbols from alphabet, with at least one letter if it has any."""
    if length <= 0 or not alphabet:
        raise ValueError(f"key length {length} and alphabet {alphabet!r} must be non-empty")
    letters = [c for c in alphabet if c.isalpha()]
    while True:
        key = "".join(rng.choice(alphabet) for _ in range(length))
        if not letters or any(c.isalpha() for c in key):
            return key


def _row(task: str, seed: int, index: int, query: str, answer: str, depth,
         target: LengthTarget, **extra) -> dict:
    row = {"task": task, "id": f"{task}/{seed}/{index}", "query": query, "answer": answer,
           "target": " " + answer, "depth": depth, "length": target.measure(query),
           "length_unit": target.unit, "target_length": target.limit, "seed": seed}
    row.update(extra)
    return row


# ---------------------------------------------------------------------------
# probes

KV_INTRO = ("Below is a list of keys and their values. Remember them: you will be asked "
            "for the value of one key.")


def kv_lookup(n_examples: int, target_tokens: int | None = None, depth: float = 0.5,
              seed: int = EVAL_SEED, alphabet: str = EVAL_ALPHABET, *,
              target_chars: int | None = None, tokenizer: object | None = None,
              key_length: int = 4) -> list[dict]:
    """Many lines 'The value of key XJ3K is 8821.'; ask for the key at `depth`.

    The number of keys is as many as fit the target length; `n_keys` in each row.
    """
    depth = _check_depth(depth)
    target = length_target(target_tokens, target_chars, tokenizer)
    most_keys = target.max_filler_chars() // 16 + 2
    rows = []
    for index in range(n_examples):
        rng = random.Random(f"kv:{seed}:{index}")
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < most_keys:
            key = random_key(rng, alphabet, key_length)
            if key not in seen:
                seen.add(key)
                keys.append(key)
        values = [str(rng.randrange(1000, 10000)) for _ in keys]

        def build(n: int) -> str:
            n = max(n, 1)
            asked = round(depth * (n - 1))
            lines = "\n".join(f"The value of key {k} is {v}." for k, v in zip(keys[:n], values))
            return (f"{KV_INTRO}\n\n{lines}\n\nWhat is the value of key {keys[asked]}? "
                    f"The value of key {keys[asked]} is")

        n_keys, query = fit_to_length(build, target, most_keys)
        n_keys = max(n_keys, 1)
        asked = round(depth * (n_keys - 1))
        rows.append(_row("kv_lookup", seed, index, query, values[asked], depth, target,
                         n_keys=n_keys, key=keys[asked]))
    return rows
