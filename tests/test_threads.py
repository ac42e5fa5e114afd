"""Threads: one count for BLAS and the C core, `auto` that leaves busy cores alone, and
what `minilars info` reports about the build and the pools."""
import json
import platform
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info

from minilars import kernels, threads
from minilars.cli import main
from tiny_folder import make_tiny_folder


@pytest.fixture
def restore_threads():
    before = max(p["num_threads"] for p in threadpool_info())
    yield
    threads.set_threads(before)


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5", "", "2x"])
def test_parse_threads_refuses_anything_but_auto_or_a_count(text):
    with pytest.raises(ValueError, match="--threads"):
        threads.parse_threads(text)


def test_parse_threads_accepts_auto_and_counts():
    assert threads.parse_threads("auto") == "auto"
    assert threads.parse_threads("3") == 3


def test_set_threads_sets_blas_and_openmp_together(restore_threads):
    threads.set_threads(1)
    assert {p["num_threads"] for p in threadpool_info()} == {1}
    if kernels.c_available():
        assert kernels.kernel_status()["threads"] == 1
    assert not [w for w in threads.conflicts() if "different thread counts" in w]


def test_conflicts_name_unequal_pools_and_a_forced_kernel(restore_threads, monkeypatch):
    from threadpoolctl import threadpool_limits
    threads.set_threads(1)
    if len({p["user_api"] for p in threadpool_info()}) == 2:
        threadpool_limits(limits=2, user_api="blas")
        assert any("different thread counts" in w for w in threads.conflicts())
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert any("OPENBLAS_CORETYPE=Haswell" in w for w in threads.conflicts())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_busy_process_is_seen_and_auto_leaves_its_core():
    quiet = threads.cores_busy_elsewhere(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = threads.cores_busy_elsewhere(0.5)
        n, why = threads.choose_threads("auto")
    finally:
        spinner.kill()
        spinner.wait()
    assert quiet is not None and busy >= 0.6, (quiet, busy)
    cores = len(threads.usable_cores())
    assert 1 <= n <= max(1, cores - 1) and "busy" in why


def test_choose_threads_takes_a_number_as_given():
    assert threads.choose_threads(5) == (5, "as asked")


@pytest.mark.skipif(not kernels.c_available(), reason="minilars._cext not built")
def test_the_build_names_the_branches_this_machine_should_compile():
    """On aarch64 the __fp16 conversion and 128-bit NEON registers; on x86_64 with F16C
    (a -march=native build) the F16C instructions. What `minilars info` prints."""
    words = dict(w.split("=") for w in kernels.kernel_status()["build"].split())
    assert set(words) == {"arch", "vector", "loops", "f16", "gguf"}
    machine = platform.machine()
    if machine == "aarch64":
        assert words["arch"] == "aarch64" and words["vector"] == "128"
        assert words["f16"] == "arm-fp16" and words["gguf"] == "plain"
    elif machine == "x86_64":
        assert words["arch"] == "x86_64" and words["vector"] in ("128", "256", "512")
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if " f16c" in flags:
            assert words["f16"] == "f16c"
        if " avx512f" in flags:
            assert words["vector"] == "512" and words["gguf"] == "avx512"


def test_info_reports_cpu_build_and_pools(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"cpu: {platform.machine()}" in out and "BLAS: " in out and "cores: " in out
    if kernels.c_available():
        assert "build: arch=" in out and "OpenMP: " in out


def test_train_refuses_a_bad_thread_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", str(tmp_path), "--threads", "0"])
    assert e.value.code == 2 and "--threads '0'" in capsys.readouterr().err


def test_a_run_records_its_thread_count_and_a_resume_keeps_it(tmp_path, restore_threads):
    folder = make_tiny_folder(str(tmp_path / "tiny"))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the quick brown fox jumps over the lazy dog again"}\n' * 4)
    out = str(tmp_path / "run")
    assert main(["train", "--model", folder, "--data", str(data), "--seq", "16", "--steps", "2",
                 "--batch", "2", "--method", "lars", "--threads", "1", "--out", out]) == 0
    with open(f"{out}/run.json") as f:
        assert json.load(f)["threads"] == 1
    threads.set_threads(2)
    assert main(["train", "--resume", out, "--steps", "3"]) == 0
    assert {p["num_threads"] for p in threadpool_info()} == {1}
