"""scripts/pytest_shards.py, which splits the emulated arm64 suite over the host's cores."""
import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "scripts" / "pytest_shards.py"
_spec = importlib.util.spec_from_file_location("pytest_shards", _path)
shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shards)


def test_long_tests_are_dealt_to_different_shards_and_each_share_keeps_collection_order():
    ids = [f"t.py::t{i}" for i in range(8)]
    timings = {"t.py::t1": 100.0, "t.py::t5": 90.0, "t.py::t6": 1.0, "t.py::t7": 1.0}
    a, b = shards.deal(ids, 2, timings)
    assert ("t.py::t1" in a) != ("t.py::t1" in b) and ("t.py::t5" in a) != ("t.py::t5" in b)
    assert sorted(a + b) == sorted(ids)
    assert a == [i for i in ids if i in a] and b == [i for i in ids if i in b]
    # unknown tests weigh the shortest known (1.0 s here)
    loads = [sum(timings.get(i, 1.0) for i in s) for s in (a, b)]
    assert abs(loads[0] - loads[1]) <= 10.0


def test_without_timings_the_shares_are_round_robin():
    ids = [f"t.py::t{i}" for i in range(5)]
    assert shards.deal(ids, 2, {}) == [ids[0::2], ids[1::2]]


def test_durations_sum_setup_call_and_teardown_per_test():
    log = ("==== slowest durations ====\n"
           "12.50s call     tests/test_a.py::test_x[1-b]\n"
           "0.25s setup    tests/test_a.py::test_x[1-b]\n"
           "3.00s call     tests/test_b.py::test_y\n"
           "==== 2 passed in 16.0s ====\n")
    assert shards.durations_in_log(log) == {"tests/test_a.py::test_x[1-b]": 12.75,
                                            "tests/test_b.py::test_y": 3.0}


def test_a_timings_file_with_a_bad_line_is_refused_by_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# seconds on x86\n12.00 tests/test_a.py::test_x[a b]\n0.50 tests/test_b.py::test_y\n")
    assert shards.read_timings(str(good)) == {"tests/test_a.py::test_x[a b]": 12.0,
                                              "tests/test_b.py::test_y": 0.5}
    bad = tmp_path / "bad.txt"
    bad.write_text("12.00 tests/test_a.py::test_x\nfast tests/test_b.py::test_y\n")
    with pytest.raises(SystemExit, match="line 2"):
        shards.read_timings(str(bad))
