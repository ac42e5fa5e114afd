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


@pytest.fixture
def tiny(tmp_path):
    """(model folder, data folder) of a tiny model and an arc_easy laid out as `data fetch` does."""
    model = make_tiny_folder(str(tmp_path / "model"))
    data = str(tmp_path / "data")
    write_task(data, "arc_easy", "train", 12)
    write_task(data, "arc_easy", "test", 6)
    return model, data


def small_run(model, data, out, *extra):
    """`minilars experiment` arguments for a two-step run on the tiny model."""
    return ["experiment", "--model", model, "--out", out, "--steps", "2", "--batch", "2",
            "--seq", "48", "--eval-limit", "4", "--data-dir", data, *extra]


@pytest.mark.parametrize("tasks", ["arc_easy", "kv_lookup"])
def test_experiment_runs_and_reports(tmp_path, tiny, tasks):
    model, data = tiny
    out = str(tmp_path / "exp")
    args = small_run(model, data, out, "--tasks", tasks, "--methods", "lars,lora", "--seeds", "0",
                     "--mmlu", "economics", "--longctx-seq", "96", "--longctx-train", "5",
                     "--longctx-eval", "5")
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


def test_parallel_cells_equal_serial_cells(tmp_path, tiny):
    """--jobs 2 runs each cell in a process of its own; the cells it writes are the ones a
    serial run writes, with the same training losses and scores (seeded data and init)."""
    model, data = tiny
    results = {}
    for jobs in (1, 2):
        out = str(tmp_path / f"exp{jobs}")
        assert main(small_run(model, data, out, "--tasks", "arc_easy", "--methods", "lars,ia3",
                              "--seeds", "0,1", "--mmlu", "", "--jobs", str(jobs))) == 0
        cells = {}
        for name in os.listdir(os.path.join(out, "cells")):
            with open(os.path.join(out, "cells", name)) as f:
                cells[name] = json.load(f)
        results[jobs] = cells
    assert sorted(results[1]) == sorted(results[2]) == sorted(
        f"arc_easy__{m}__{s}.json" for m, s in
        [("zero-shot", 0), ("lars", 0), ("lars", 1), ("ia3", 0), ("ia3", 1)])
    for name, serial in results[1].items():
        parallel = results[2][name]
        assert parallel["acc"] == serial["acc"]
        if "final_loss" in serial:
            assert parallel["final_loss"] == pytest.approx(serial["final_loss"], rel=1e-5)
    assert os.path.exists(tmp_path / "exp2" / "logs" / "arc_easy__lars__1.log")


def test_a_failed_parallel_cell_is_named_and_the_others_are_kept(tmp_path, tiny, capsys):
    model, data = tiny
    out = str(tmp_path / "exp")
    # no training split for piqa: its cells fail, arc_easy's finish
    write_task(data, "piqa", "validation", 6)
    code = main(small_run(model, data, out, "--tasks", "arc_easy,piqa", "--methods", "lars",
                          "--seeds", "0", "--mmlu", "", "--jobs", "2"))
    assert code == 1
    assert "1 cell(s) failed: piqa__lars__0" in capsys.readouterr().err
    # the cell's log ends with the training process's own error, not a bare exit status
    with open(os.path.join(out, "logs", "piqa__lars__0.log")) as f:
        last = f.read().splitlines()[-1]
    assert "runs/piqa__lars__0 failed (exit 1)" in last and "piqa/train.jsonl.gz not found" in last
    cells = sorted(os.listdir(os.path.join(out, "cells")))
    assert cells == ["arc_easy__lars__0.json", "arc_easy__zero-shot__0.json",
                     "piqa__zero-shot__0.json"]


@pytest.mark.parametrize("flag, value, message", [
    ("--tasks", "arc_easy,arc_eazy", "unknown task 'arc_eazy' in --tasks"),
    ("--mmlu", "economy", "unknown MMLU group 'economy' in --mmlu"),
    ("--methods", "lars,lorra", "unknown method 'lorra' in --methods"),
    ("--jobs", "0", "--jobs: must be >= 1, got 0"),
])
def test_experiment_arguments_are_checked_before_any_cell_runs(tmp_path, capsys, flag, value,
                                                               message):
    out = tmp_path / "exp"
    args = ["experiment", "--model", str(tmp_path / "no-model"), "--out", str(out), flag, value]
    try:
        code = main(args)
    except SystemExit as e:                       # refused by argparse itself
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_report_means_seeds_and_keeps_long_context_apart(tmp_path):
    from minilars.lab.experiment import ExperimentOptions, write_report
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


def test_average_spread_is_over_complete_seeds_and_the_plot_shows_it(tmp_path):
    from minilars.lab.experiment import ExperimentOptions, write_report
    out = tmp_path / "exp"
    (out / "cells").mkdir(parents=True)
    accs = {("arc_easy", 0): 0.60, ("piqa", 0): 0.70, ("arc_easy", 1): 0.64,
            ("piqa", 1): 0.74, ("arc_easy", 2): 0.90}          # seed 2 lacks piqa
    for (task, seed), acc in accs.items():
        (out / "cells" / f"{task}__lars__{seed}.json").write_text(json.dumps(
            {"task": task, "method": "lars", "seed": seed, "acc": acc, "acc_norm": acc,
             "n": 500, "ledger_peak_mib": 500.0, "rss_peak_mib": 600.0, "tok_per_s": 50.0}))
    for task in ("arc_easy", "piqa"):
        (out / "cells" / f"{task}__zero-shot__0.json").write_text(json.dumps(
            {"task": task, "method": "zero-shot", "seed": 0, "acc": 0.5, "acc_norm": 0.5, "n": 500}))
    write_report(ExperimentOptions(model="m", out=str(out), tasks=["arc_easy", "piqa"],
                                   methods=["lars"]))
    lars = next(l for l in (out / "results.md").read_text().splitlines() if l.startswith("| lars |"))
    # avg = mean of the task means (arc 71.3 over 3 seeds, piqa 72.0 over 2); its spread is the
    # std of the per-seed averages of seeds 0 and 1 (65 and 69), the only complete ones
    assert lars == "| lars | 71.3 ± 16.3 | 72.0 ± 2.8 (2/3 seeds) | 71.7 ± 2.8 | 500 | 600 | 50 |"
    svg = (out / "memory_vs_accuracy.svg").read_text()
    assert "zero-shot 50.0" in svg                      # the dashed baseline
    assert svg.count('stroke="#3366cc"') == 1           # one error bar, for the one method


def test_ticks_are_round_and_inside_the_range():
    from minilars.lab.svg import ticks as _ticks
    assert _ticks(52.0, 58.8) == [52.0, 54.0, 56.0, 58.0]
    assert _ticks(485, 634) == [500, 550, 600]
    assert all(0.1 <= t <= 0.9 for t in _ticks(0.1, 0.9))
