"""The commands that take frozen forms and checkpoint stores beside train and memory:
bench step times every combination in one process; eval and generate run on quantized
frozen weights."""
import math

import pytest

from minilars.cli import main
from tiny_folder import make_tiny_folder


def test_bench_step_times_each_frozen_form_and_checkpoint_store(capsys):
    assert main(["bench", "step", "--arch", "tiny", "--seq", "16", "--repeats", "1",
                 "--frozen-dtype", "float32,q8_0", "--checkpoints", "ram,disk",
                 "--c-core", "off"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("BLAS: ") for line in lines)          # the kernel is stated
    header = next(i for i, line in enumerate(lines) if line.startswith("weights "))
    rows = [line.split() for line in lines[header + 1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("float32", "ram", "no"), ("float32", "disk", "no"),
        ("q8_0", "ram", "no"), ("q8_0", "disk", "no")]
    assert rows[0][-1] == "1.00" and all(float(r[4]) > 0 for r in rows)
    assert float(rows[2][5]) < float(rows[0][5])          # q8_0 weights are smaller


@pytest.mark.parametrize("bad, named", [("--frozen-dtype=q5_k", "q5_k"),
                                        ("--checkpoints=tape", "tape"),
                                        ("--c-core=maybe", "maybe")])
def test_bench_step_names_a_bad_choice(bad, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "step", "--arch", "tiny", "--seq", "16", bad])
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_eval_ppl_on_quantized_frozen_weights_is_close_to_float(tmp_path, capsys):
    folder = make_tiny_folder(str(tmp_path / "m"))
    text = tmp_path / "t.txt"
    text.write_text("I inherited from my parents a reckless spirit that has caused me trouble. " * 6)
    ppl = {}
    for form in (None, "q8_0"):
        extra = ["--frozen-dtype", form] if form else []
        assert main(["eval", "ppl", "--model", folder, "--text", str(text), "--seq", "32"] + extra) == 0
        ppl[form] = float(capsys.readouterr().out.split()[1])
    assert math.isclose(ppl[None], ppl["q8_0"], rel_tol=0.05) and ppl[None] != ppl["q8_0"]


def test_generate_on_quantized_frozen_weights(tmp_path, capsys):
    folder = make_tiny_folder(str(tmp_path / "m"))
    assert main(["generate", "--model", folder, "--prompt", "I inherited", "--max-new-tokens", "4",
                 "--frozen-dtype", "q4_1"]) == 0
    assert "tokens in" in capsys.readouterr().err
