"""The bundled MMLU groups and Botchan text load with the right counts and content."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from minilars.data import mmlu

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("group,split", sorted(mmlu.EXPECTED_COUNTS))
def test_mmlu_group_counts_and_fields(group, split):
    rows = mmlu.load_mmlu(group, split)
    assert len(rows) == mmlu.EXPECTED_COUNTS[(group, split)]
    assert {r["subject"] for r in rows} == set(mmlu.GROUP_SUBJECTS[group])
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["task"] == f"mmlu_{group}" and row["split"] == split
        assert len(row["choices"]) == 4 and 0 <= row["gold"] < 4
        assert row["query"].startswith("Question: ") and row["query"].endswith("\nAnswer:")


def test_mmlu_dev_has_five_per_subject():
    for group, subjects in mmlu.GROUP_SUBJECTS.items():
        assert mmlu.EXPECTED_COUNTS[(group, "dev")] == 5 * len(subjects)


def test_mmlu_groups_follow_the_subcategory_map():
    assert mmlu.GROUP_SUBJECTS["economics"] == (
        "econometrics", "high_school_macroeconomics", "high_school_microeconomics")
    everything = [s for subjects in mmlu.GROUP_SUBJECTS.values() for s in subjects]
    assert len(everything) == len(set(everything)) == 22


def test_mmlu_bad_arguments():
    with pytest.raises(ValueError, match="unknown group 'law'"):
        mmlu.load_mmlu("law")
    with pytest.raises(ValueError, match="unknown split 'train'"):
        mmlu.load_mmlu("math", "train")


def test_mmlu_licence_and_readme_are_shipped():
    folder = REPO / "minilars" / "resources" / "mmlu"
    assert "MIT License" in (folder / "LICENSE").read_text()
    assert "Hendrycks" in (folder / "README.md").read_text()


def test_botchan_is_the_book_without_gutenberg_boilerplate():
    path = REPO / "minilars" / "resources" / "botchan.txt"
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == (
        "777cdd61e668a6617f481873ca8af4b332cef43bef005f9e9ee69c089b40890d")
    text = raw.decode()
    assert text.startswith("BOTCHAN (MASTER DARLING)")
    assert "Gutenberg" not in text and "\ufeff" not in text
    assert len(" ".join(text.split())) > 250_000


def test_strip_gutenberg_on_a_small_text():
    spec = importlib.util.spec_from_file_location("extract_botchan",
                                                  REPO / "scripts" / "extract_botchan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ("\ufeffProject Gutenberg's Botchan\nlicence words\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK BOTCHAN ***\nProduced by someone\n"
            "BOTCHAN\nChapter I\n\nEnd of Project Gutenberg's Botchan (Master Darling)\n"
            "*** END ***\nfull licence\n")
    assert module.strip_gutenberg(text) == "BOTCHAN\nChapter I\n"
    with pytest.raises(ValueError, match="markers not found"):
        module.strip_gutenberg("no markers here")
