"""The tutorials run as written (with MINILARS_FAST=1: the same code on smaller sizes)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(f for f in os.listdir(os.path.join(ROOT, "tutorials")) if f.endswith(".py"))


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs(name):
    env = dict(os.environ, MINILARS_FAST="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tutorials", name)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_runs_full_size(name):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tutorials", name)],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
