"""Synthetic long-context probes, generated from a seed, and QASPER long-document windows.

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

Filler is the Botchan text bundled in minilars/resources (public domain), read from a
seeded start position and repeated as needed.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable, Sequence

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


# ---------------------------------------------------------------------------
# filler

@lru_cache(maxsize=1)
def botchan_text() -> str:
    """The bundled Botchan text with all whitespace runs collapsed to single spaces."""
    path = resources.files("minilars").joinpath("resources", "botchan.txt")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundled filler text missing from the package")
    return re.sub(r"\s+", " ", path.read_text(encoding="utf-8")).strip()


@lru_cache(maxsize=1)
def _sentence_starts() -> tuple[int, ...]:
    text = botchan_text()
    return tuple([0] + [m.end() for m in re.finditer(r"[.!?] ", text)])


def filler_source(rng: random.Random) -> str:
    """Botchan rotated to start at a random sentence, long enough for any slicing."""
    text = botchan_text()
    start = rng.choice(_sentence_starts())
    return text[start:] + " " + text[:start]


def take_chars(source: str, n: int) -> str:
    """The first n characters of source repeated cyclically, cut back to a word end."""
    if n <= 0:
        return ""
    text = source
    while len(text) < n + 1:
        text = text + " " + source
    if text[n] == " ":
        return text[:n]
    cut = text.rfind(" ", 0, n)
    return text[:cut] if cut > 0 else text[:n]


def insert_at_depths(text: str, needles: Sequence[str], depths: Sequence[float],
                     boundary: str = ". ", joiner: str = " ") -> str:
    """Insert each needle at the boundary nearest its depth (fraction of len(text))."""
    points = [0] + [m.end() for m in re.finditer(re.escape(boundary), text)] + [len(text)]
    placed = []
    for needle, depth in zip(needles, depths):
        goal = depth * len(text)
        placed.append((min(points, key=lambda p: (abs(p - goal), p)), needle))
    pieces, last = [], 0
    for point, needle in sorted(placed, key=lambda item: item[0]):  # stable: keeps order
        pieces.append(text[last:point])
        pieces.append(needle)
        last = point
    pieces.append(text[last:])
    return joiner.join(p.strip() for p in pieces if p.strip())


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

PASSKEY_INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and "
                 "memorize it. I will quiz you about the pass key.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_retrieval(n_examples: int, target_tokens: int | None = None, depth: float = 0.5,
                      seed: int = EVAL_SEED, alphabet: str = EVAL_ALPHABET, *,
                      target_chars: int | None = None, tokenizer: object | None = None,
                      key_length: int = 6) -> list[dict]:
    """Find one pass key hidden at `depth` in filler text."""
    depth = _check_depth(depth)
    target = length_target(target_tokens, target_chars, tokenizer)
    rows = []
    for index in range(n_examples):
        rng = random.Random(f"passkey:{seed}:{index}")
        key = random_key(rng, alphabet, key_length)
        source = filler_source(rng)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def build(n: int) -> str:
            haystack = insert_at_depths(take_chars(source, n), [needle], [depth])
            return f"{PASSKEY_INTRO}\n\n{haystack}\n\n{PASSKEY_QUESTION}"

        _, query = fit_to_length(build, target, target.max_filler_chars())
        rows.append(_row("passkey", seed, index, query, key, depth, target))
    return rows


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


MULTI_INTRO = ("Several special magic codes are hidden inside a lot of irrelevant text. "
               "Find all of them and memorize them in order.")
MULTI_QUESTION = ("What are all the special magic codes mentioned in the text, in order of "
                  "appearance? The codes are")


def multi_needle(n_examples: int, target_tokens: int | None = None,
                 depth: float | Sequence[float] = 0.0, seed: int = EVAL_SEED,
                 alphabet: str = EVAL_ALPHABET, *, target_chars: int | None = None,
                 tokenizer: object | None = None, n_needles: int = 3,
                 key_length: int = 6) -> list[dict]:
    """Several codes hidden in filler; the answer lists them comma-separated, in order.

    depth: one float d puts needle i at d + (1 - d) * i / n_needles; or give one depth
    per needle.
    """
    if isinstance(depth, (int, float)):
        first = _check_depth(depth)
        depths = [first + (1.0 - first) * i / n_needles for i in range(n_needles)]
    else:
        depths = sorted(_check_depth(d, "each depth") for d in depth)
        if len(depths) != n_needles:
            raise ValueError(f"multi_needle: {len(depths)} depths for {n_needles} needles")
    target = length_target(target_tokens, target_chars, tokenizer)
    rows = []
    for index in range(n_examples):
        rng = random.Random(f"multi:{seed}:{index}")
        codes: list[str] = []
        while len(codes) < n_needles:
            code = random_key(rng, alphabet, key_length)
            if code not in codes:
                codes.append(code)
        needles = [f"One of the special magic codes is {code}." for code in codes]
        source = filler_source(rng)

        def build(n: int) -> str:
            haystack = insert_at_depths(take_chars(source, n), needles, depths)
            return f"{MULTI_INTRO}\n\n{haystack}\n\n{MULTI_QUESTION}"

        _, query = fit_to_length(build, target, target.max_filler_chars())
        rows.append(_row("multi_needle", seed, index, query, ", ".join(codes), list(depths),
                         target, codes=codes))
    return rows


# ---------------------------------------------------------------------------
# QASPER windows

def qasper_split(rows: Sequence[dict], split: str, eval_fraction: float = 0.5) -> list[dict]:
    """Rows of 'train' or 'eval', split by paper (sha256 of paper_id), so no paper is in both."""
    if split not in ("train", "eval"):
        raise ValueError(f"qasper_split: split {split!r}, expected 'train' or 'eval'")

    def is_eval(row: dict) -> bool:
        digest = hashlib.sha256(row["paper_id"].encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction

    return [row for row in rows if is_eval(row) == (split == "eval")]


def _evidence_text(evidence: str) -> str:
    return evidence.removeprefix("FLOAT SELECTED:").strip()


def qasper_windows(rows: Sequence[dict], target_tokens: int | None = None,
                   depth: float = 0.5, seed: int = EVAL_SEED, *,
                   target_chars: int | None = None, tokenizer: object | None = None,
                   n_examples: int | None = None) -> list[dict]:
    """A window of the paper around its evidence, evidence paragraph(s) at `depth`.

    rows: load_task("qasper_yesno", "all") rows (optionally qasper_split). The filler is
    the paper's other paragraphs in order, then, if the paper is too short, paragraphs of
    other papers in a seeded order (`padded` says so). Answers are "Yes" or "No".
    """
    depth = _check_depth(depth)
    target = length_target(target_tokens, target_chars, tokenizer)
    rows = list(rows)
    chosen = rows if n_examples is None else random.Random(f"qasper:{seed}").sample(
        rows, min(n_examples, len(rows)))
    out = []
    for index, row in enumerate(chosen):
        rng = random.Random(f"qasper:{seed}:{row['id']}")
        evidence = {e.strip() for e in row["evidence"]}
        needle = "\n\n".join(_evidence_text(e) for e in row["evidence"] if e.strip())
        own = [p["text"].strip() for p in row["paragraphs"]
               if p["text"].strip() and p["text"].strip() not in evidence]
        own_text = "\n\n".join(own)
        others = [r for r in rows if r["paper_id"] != row["paper_id"]]
        rng.shuffle(others)
        padding, used_papers = [], set()
        for other in others:
            if other["paper_id"] not in used_papers:
                used_papers.add(other["paper_id"])
                padding.extend(p["text"].strip() for p in other["paragraphs"] if p["text"].strip())
            if len(own_text) + sum(map(len, padding)) > target.max_filler_chars():
                break
        source = "\n\n".join([own_text] + padding) if padding else own_text
        question = f"Question: {row['query'].strip()}\nAnswer:"

        def build(n: int) -> str:
            window = source[:n]
            cut = window.rfind(" ")
            if n < len(source) and cut > 0 and not source[n].isspace():
                window = window[:cut]
            haystack = insert_at_depths(window, [needle], [depth], boundary="\n\n",
                                        joiner="\n\n")
            return f"{row['title'].strip()}\n\n{haystack}\n\n{question}"

        used, query = fit_to_length(build, target, min(len(source), target.max_filler_chars()))
        answer = row["choices"][row["gold"]]
        out.append(_row("qasper_window", seed, index, query, answer, depth, target,
                        source_id=row["id"], choices=list(row["choices"]), gold=row["gold"],
                        padded=used > len(own_text)))
    return out
