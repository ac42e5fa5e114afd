"""Test-wide settings. Hypothesis: no per-example deadline (BLAS timing on a shared 2-core
machine is noisy) and a modest default number of examples; each test that draws shapes
sets its own max_examples so the whole engine suite stays well under ~90 s.
Set MINILARS_EXAMPLES_SCALE=10 for a longer, more thorough run (see tests/gradcheck.py)."""
import json
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# make `tests.gradcheck` importable however pytest was started
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tiny_folder import make_tiny_folder  # noqa: E402 (pytest puts tests/ on the path for its conftest)

settings.register_profile("default", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random model folder (tests/tiny_folder.py), one per test module."""
    return make_tiny_folder(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small JSONL training file: prompt/completion rows and one text row."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    rows = [{"prompt": f"Question: is {w} a word?\nAnswer:", "completion": " yes"}
            for w in ("reckless", "spirit", "school", "week", "child", "story")]
    rows += [{"text": "I inherited from my parents a reckless spirit."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
