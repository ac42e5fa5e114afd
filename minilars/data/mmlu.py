"""Five MMLU subject groups bundled with the package (MIT licence, Hendrycks et al., 2021).

Groups follow MMLU's own subcategory map (the `subcategories` dict of categories.py in
the original MMLU repository, hendrycks/test): a subject belongs to a group when its
subcategory is that group. Only the five groups the LARS paper names are bundled. The
files are made by scripts/convert_mmlu.py. (MMLU-Pro is not available offline.)
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

SPLITS = ("dev", "test")

GROUP_SUBJECTS: dict[str, tuple[str, ...]] = {
    "economics": ("econometrics", "high_school_macroeconomics",
                  "high_school_microeconomics"),
    "biology": ("college_biology", "high_school_biology"),
    "physics": ("astronomy", "college_physics", "conceptual_physics", "high_school_physics"),
    "health": ("anatomy", "clinical_knowledge", "college_medicine", "human_aging",
               "medical_genetics", "nutrition", "professional_medicine", "virology"),
    "math": ("abstract_algebra", "college_mathematics", "elementary_mathematics",
             "high_school_mathematics", "high_school_statistics"),
}

# rows per group and split in the bundled files (dev has 5 per subject)
EXPECTED_COUNTS: dict[tuple[str, str], int] = {
    ("economics", "dev"): 15, ("economics", "test"): 742,
    ("biology", "dev"): 10, ("biology", "test"): 454,
    ("physics", "dev"): 20, ("physics", "test"): 640,
    ("health", "dev"): 40, ("health", "test"): 1640,
    ("math", "dev"): 25, ("math", "test"): 1064,
}


def mmlu_path(group: str):
    """A Traversable for the bundled file of one group."""
    if group not in GROUP_SUBJECTS:
        raise ValueError(f"load_mmlu: unknown group {group!r}; expected one of "
                         f"{sorted(GROUP_SUBJECTS)}")
    return resources.files("minilars").joinpath("resources", "mmlu", f"{group}.jsonl.gz")


def load_mmlu(group: str, split: str = "test") -> list[dict]:
    """Rows (task, split, id, subject, query, choices, gold) of one group split."""
    if split not in SPLITS:
        raise ValueError(f"load_mmlu: unknown split {split!r}; expected one of {SPLITS}")
    path = mmlu_path(group)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: bundled MMLU file missing; the package data was "
                                f"not installed (regenerate with scripts/convert_mmlu.py)")
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [row for row in rows if row["split"] == split]
