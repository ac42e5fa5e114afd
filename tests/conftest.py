"""Test-wide settings. Hypothesis: no per-example deadline (BLAS timing on a shared 2-core
machine is noisy) and a modest default number of examples; each test that draws shapes
sets its own max_examples so the whole engine suite stays well under ~90 s.
Set MINILARS_EXAMPLES_SCALE=10 for a longer, more thorough run (see tests/gradcheck.py)."""
import os
import sys

from hypothesis import HealthCheck, settings

# make `tests.gradcheck` importable however pytest was started
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

settings.register_profile("default", deadline=None, max_examples=20,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("default")
