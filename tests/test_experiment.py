"""The experiment pipeline end to end on a tiny model: an MC task from a data folder laid
out like `minilars data fetch` writes it, the long-context probe, MMLU, and the report."""
import gzip
import json
import os

import pytest

from minilars.cli import main
from tiny_folder import make_tiny_folder


def write_task(data_dir, task, split, n):
    rows = [{"task": task, "split": split, "id": f"{task}/{split}/{i}",
             "query": f"Question: is story {i} a reckless spirit?\nAnswer:",
             "choices": ["yes", "no"], "gold": i % 2} for i in range(n)]
    os.makedirs(os.path.join(data_dir, task), exist_ok=True)
    with gzip.open(os.path.join(data_dir, task, f"{split}.jsonl.gz"), "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("tasks", ["arc_easy", "kv_lookup"])
def test_experiment_runs_and_reports(tmp_path, tasks):
    model = make_tiny_folder(str(tmp_path / "model"))
    data = str(tmp_path / "data")
    write_task(data, "arc_easy", "train", 12)
    write_task(data, "arc_easy", "test", 6)
    out = str(tmp_path / "exp")
    args = ["experiment", "--model", model, "--out", out, "--tasks", tasks, "--methods", "lars,lora",
            "--seeds", "0", "--steps", "2", "--batch", "2", "--seq", "48", "--eval-limit", "4",
            "--mmlu", "economics", "--data-dir", data, "--longctx-seq", "96",
            "--longctx-train", "5", "--longctx-eval", "5"]
    assert main(args) == 0
    cells = sorted(os.listdir(os.path.join(out, "cells")))
    assert f"{tasks}__lars__0.json" in cells and f"{tasks}__zero-shot__0.json" in cells
    with open(os.path.join(out, "cells", f"{tasks}__lars__0.json")) as f:
        cell = json.load(f)
    assert cell["steps"] == 2 and cell["ledger_peak_mib"] > 0 and 0 <= cell["acc"] <= 1
    report = open(os.path.join(out, "results.md")).read()
    assert "| lars |" in report and "mmlu_economics_5shot" in report
    # a second run finds every cell done and only rewrites the report
    assert main(args) == 0
