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
    assert (cell["batch"], cell["seq"]) == ((1, 96) if tasks == "kv_lookup" else (2, 48))
    report = open(os.path.join(out, "results.md")).read()
    assert "| lars |" in report and "mmlu_economics_5shot" in report
    assert ("## Long context" in report) == (tasks == "kv_lookup")
    # a second run finds every cell done and only rewrites the report
    assert main(args) == 0


def test_report_means_seeds_and_keeps_long_context_apart(tmp_path):
    from minilars.experiment import ExperimentOptions, write_report
    out = tmp_path / "exp"
    (out / "cells").mkdir(parents=True)

    def cell(task, method, seed, acc, mib=None):
        c = {"task": task, "method": method, "seed": seed, "acc": acc, "acc_norm": acc, "n": 500}
        if mib is not None:
            c.update(ledger_peak_mib=mib, rss_peak_mib=mib + 100, tok_per_s=50.0)
        (out / "cells" / f"{task}__{method}__{seed}.json").write_text(json.dumps(c))

    cell("arc_easy", "zero-shot", 0, 0.50)
    cell("piqa", "zero-shot", 0, 0.60)
    cell("arc_easy", "lora", 0, 0.60, 500)
    cell("arc_easy", "lora", 1, 0.70, 520)
    cell("piqa", "lora", 0, 0.80, 510)
    cell("arc_easy", "lars", 0, 0.64, 480)            # lars has no piqa: no average
    cell("kv_lookup", "lora", 0, 0.30, 2000)          # must not enter the MC memory column
    write_report(ExperimentOptions(model="m", out=str(out), methods=["lora", "lars"]))
    lines = (out / "results.md").read_text().splitlines()
    row = lambda name, after=0: next(l for l in lines[after:] if l.startswith(f"| {name} |"))
    assert row("zero-shot") == "| zero-shot | 50.0 | 60.0 | 55.0 | - | - | - |"
    # arc_easy lora: mean 65.0, sample std 7.1; avg (65 + 80) / 2; memory of the 3 MC runs;
    # the table holds seeds 0 and 1, so a cell with one of them says so
    assert row("lora") == "| lora | 65.0 ± 7.1 | 80.0 (1/2 seeds) | 72.5 | 510 | 610 | 50 |"
    assert row("lars") == "| lars | 64.0 (1/2 seeds) | - | - | 480 | 580 | 50 |"
    kv = lines.index(next(l for l in lines if l.startswith("## Long context")))
    assert row("lora", kv) == "| lora | 30.0 (1/2 seeds) | 2000 | 2100 | 50 |"
    assert row("zero-shot", kv) == "| zero-shot | - | - | - | - |"
    assert "| method | arc_easy (n=500) | piqa (n=500) | avg |" in lines[4] and "(0, 1;" in lines[2]
    assert (out / "memory_vs_accuracy.svg").read_text().startswith("<svg")
