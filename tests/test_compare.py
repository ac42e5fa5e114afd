"""`minilars bench compare` without PyTorch: the FLOP count it divides by, the A B A B order
of its fresh processes, and the message when the reference extra is missing. The timed run
against PyTorch itself is in tests/reference/test_compare_reference.py."""
import pytest

from minilars.cli import main
from minilars.config import named_config
from minilars.lab import compare


def test_step_flops_counts_each_product_of_the_step():
    cfg = named_config("tiny")          # C 64, F 96, L 2, 4 heads of 16, 2 kv heads, vocab 96
    T = 8
    linear_macs = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96      # q, k+v, o, gate+up+down
    attn_macs = 2 * 4 * 16 * (T + 1) / 2                              # QK^T and PV, causal
    layers_fwd = 2 * T * 2 * (linear_macs + attn_macs)
    head = 2 * T * 96 * 64
    frozen = layers_fwd + head + 2 * T * 2 * (linear_macs + 2 * attn_macs) + head
    got = compare.step_flops(cfg, "lars", T)
    assert got == {"model": frozen, "executed": frozen}
    assert compare.step_flops(cfg, "lora", T, policy="layer") == {"model": frozen,
                                                                  "executed": frozen + layers_fwd}
    full = compare.step_flops(cfg, "full", T)["model"]
    assert full == frozen + 2 * T * (2 * linear_macs + 96 * 64)      # dW of every weight
    assert compare.step_flops(cfg, "lars", T, batch=3)["model"] == 3 * frozen


def test_compare_alternates_fresh_processes_and_takes_medians(monkeypatch):
    calls = []

    def fake_side(side, cell, n_threads, steps):
        calls.append(side)
        k = len(calls)
        return {"seconds": [float(k)] * steps, "rss_peak": 100 * k, "about": side}

    monkeypatch.setattr(compare, "run_side", fake_side)
    rates = iter([1e9, 0.8e9])                        # before the first cell, after the last
    monkeypatch.setattr(compare, "gemm_rate", lambda: next(rates))
    cells = compare.cells(["lars"], ["none"], [16], arch="tiny")
    rows, rate = compare.compare(cells, n_threads=1, rounds=3, steps=2)
    assert calls == ["minilars", "torch"] * 3
    assert rate == (1e9, 0.8e9)
    row = rows[0]
    assert row["minilars"]["seconds"] == 3.0 and row["torch"]["seconds"] == 4.0   # medians of 1,3,5 / 2,4,6
    assert row["minilars"]["spread"] == pytest.approx(4 / 3)                       # (5 - 1) / 3
    assert row["torch"]["spread"] == pytest.approx(4 / 4)
    assert row["minilars"]["rss_peak"] == 500 and row["torch"]["rss_peak"] == 600  # the worst process
    assert row["speedup"] == pytest.approx(4 / 3)
    assert row["minilars"]["tok_per_s"] == pytest.approx(16 / 3)
    assert row["minilars"]["mfu"] == pytest.approx(row["flops"] / 3.0 / 1e9)
    table = compare.format_compare(rows, rate, 1)
    assert "1.33x" in table and "1 GFLOP/s before the first row" in table
    assert "moved by -20% during the run" in table                  # the machine slowed down
    assert "  133%" in table and "  100%" in table                   # each side's spread
    assert "moved by" not in compare.format_compare(rows, (1e9, 0.95e9), 1)


def test_compare_without_the_reference_extra_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(compare, "reference_missing", lambda: ["torch", "peft"])
    assert main(["bench", "compare", "--arch", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "torch, peft" in err and "pip install -e '.[reference]'" in err
    assert "Traceback" not in err


def test_compare_names_a_bad_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "compare", "--method", "lars,dora"])
    assert exit_.value.code == 2 and "'dora'" in capsys.readouterr().err


def test_a_failing_side_is_reported_with_its_stderr():
    cell = compare.cells(["lars"], ["none"], [16], arch="no-such-arch")[0]
    with pytest.raises(compare.CompareError, match="(?s)minilars side failed.*no-such-arch"):
        compare.run_side("minilars", cell, 1, 1)
