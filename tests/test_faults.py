"""Fault injection for `train`: a kill between any two filesystem operations, a full disk
at every write, two writers at once, a NaN early and late. Each case ends with the run
resumed to the end and compared, bit for bit, with a run that met no fault.

A kill is injected, not timed: the run goes on in a forked child whose filesystem calls
are counted, and the child dies by os._exit (no cleanup, no finally) at the k-th call.
Every case is one of: survived (resumed, bit-identical to the straight run) or lost.
"""
import builtins
import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from minilars import kernels, threads
from minilars.cli import main
from minilars.runs import RunError, latest_checkpoint, run_lock
from minilars.train import NonFiniteLoss, TrainOptions, resume_options, train

STEPS, SAVE_EVERY = 4, 2
KILLED = 0x4B


@pytest.fixture(scope="module", autouse=True)
def numpy_path_one_thread():
    """Every run here on the NumPy path with one BLAS thread: the forked children must not
    touch OpenMP (not fork-safe), and runs compared bit for bit must share a path."""
    from threadpoolctl import threadpool_info
    before = max(p["num_threads"] for p in threadpool_info())
    threads.set_threads(1)
    with kernels.use_c(False):
        yield
    threads.set_threads(before)


def options(folder, data_file, out, **kw):
    base = dict(model=folder, method="lars", data=data_file, seq=16, steps=STEPS, batch=2,
                lr=1e-2, warmup=1, save_every=SAVE_EVERY, out=str(out))
    return TrainOptions(**{**base, **kw})


def quiet(_line):
    pass


def final_state(out) -> tuple[list, dict]:
    """(logged losses, the newest checkpoint's tensors) of a finished run."""
    with open(os.path.join(out, "log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    ckpt = latest_checkpoint(str(out))
    tensors = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    tensors.update(load_file(os.path.join(ckpt, "optimizer.safetensors")))
    return losses, tensors


def same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        np.array_equal(a[1][k], b[1][k]) for k in a[1])


def leftovers(out) -> list[str]:
    """Anything in the run folder a finished run should not hold."""
    found = [n for n in os.listdir(out) if n.startswith(".") and n != ".lock"]
    root = os.path.join(out, "checkpoints")
    steps = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return found + steps[:-1] + [n for n in steps if not n.startswith("step-")]


@pytest.fixture(scope="module")
def straight(folder, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(options(folder, data_file, out), log=quiet)
    return final_state(out)


# ------------------------------------------------------------------ counting file operations

FS_CALLS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"),
            (os, "fsync"), (os, "chmod"), (os, "ftruncate"), (shutil, "rmtree"),
            (builtins, "open")]


@contextlib.contextmanager
def on_each_fs_call(hook):
    """Call hook(name) before every filesystem operation in FS_CALLS (opens for reading
    excluded): the points between which a kill or a full disk is injected."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in FS_CALLS]

    def wrap(mod, name, real):
        def call(*args, **kwargs):
            target = args[0] if args else None
            if name == "fsync":                  # name what is synced: a file or a folder
                target = "folder" if stat.S_ISDIR(os.fstat(target).st_mode) else "file"
            if not ((name == "open" and not _writes(args, kwargs))
                    or (name == "mkdir" and os.path.isdir(target))):   # EEXIST, not a write
                hook(name, target)
            return real(*args, **kwargs)
        return call

    for mod, name, real in saved:
        setattr(mod, name, wrap(mod, name, real))
    try:
        yield
    finally:
        for mod, name, real in saved:
            setattr(mod, name, real)


def _writes(args, kwargs) -> bool:
    mode = args[1] if len(args) > 1 else kwargs.get("mode", "r")
    return any(c in mode for c in "wax+")


def fs_calls_of_a_run(folder, data_file, out) -> list[str]:
    calls = []
    with on_each_fs_call(lambda name, target: calls.append(f"{name} {target}")):
        train(options(folder, data_file, out), log=quiet)
    return calls


def run_killed_at(folder, data_file, out, k: int) -> int:
    """Train in a forked child that dies (os._exit) at its k-th filesystem call; returns
    the child's exit status. The child runs the NumPy path: OpenMP is not fork-safe."""
    pid = os.fork()
    if pid == 0:                                       # the child
        code = 0
        try:
            count = [0]

            def die_at_k(_name, _target):
                count[0] += 1
                if count[0] == k:
                    os._exit(KILLED)

            with on_each_fs_call(die_at_k):
                resume = os.path.exists(os.path.join(out, "run.json"))
                train(options(folder, data_file, out), resume=resume, log=quiet)
        except BaseException:
            code = 1
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def recover(folder, data_file, out) -> None:
    """What a user does after a crash: --resume, or a fresh start if the run never began."""
    if os.path.exists(os.path.join(out, "run.json")):
        train(options(folder, data_file, out), resume=True, log=quiet)
    else:
        train(options(folder, data_file, out), log=quiet)


def kill_points(folder, data_file, tmp_path, every: bool) -> list[int]:
    calls = fs_calls_of_a_run(folder, data_file, tmp_path / "count")
    second_save = [i + 1 for i, c in enumerate(calls) if "step-000004" in c or
                   ("checkpoints" in c and i > len(calls) // 2)]
    if every:
        return list(range(1, len(calls) + 1))
    # every call of the last checkpoint save, and a spread of the others
    return sorted(set(second_save) | set(range(1, len(calls) + 1, 7)))


def _kill_sweep(folder, data_file, straight, tmp_path, every):
    points = kill_points(folder, data_file, tmp_path, every)
    tried = survived = 0
    lost = []
    for k in points:
        out = tmp_path / f"k{k}"
        status = run_killed_at(folder, data_file, out, k)
        assert status == KILLED, f"kill point {k}: the child exited {status}, not killed"
        tried += 1
        try:
            recover(folder, data_file, out)
            ok = same(final_state(out), straight) and not leftovers(out)
        except Exception as e:                          # noqa: BLE001 - a lost case, reported
            ok = False
            lost.append((k, repr(e)))
        survived += ok
        if not ok and (not lost or lost[-1][0] != k):
            lost.append((k, f"differs or leftovers {leftovers(out)}"))
        shutil.rmtree(out, ignore_errors=True)
    print(f"\nkill injection: tried {tried}, survived {survived}, lost {len(lost)}")
    assert not lost, lost


def test_a_kill_between_any_two_file_operations_of_a_save_loses_nothing(
        folder, data_file, straight, tmp_path):
    _kill_sweep(folder, data_file, straight, tmp_path, every=False)


@pytest.mark.slow
def test_a_kill_at_every_file_operation_of_a_run_loses_nothing(folder, data_file, straight,
                                                               tmp_path):
    _kill_sweep(folder, data_file, straight, tmp_path, every=True)


# ------------------------------------------------------------------ a full disk

def test_a_full_disk_at_every_write_names_the_file_and_keeps_the_checkpoint(
        folder, data_file, straight, tmp_path):
    calls = fs_calls_of_a_run(folder, data_file, tmp_path / "count")
    writes = [i + 1 for i, c in enumerate(calls) if c.startswith(("open", "fsync", "replace",
                                                                   "rename", "mkdir"))]
    tried = survived = 0
    ignored = []
    for k in writes:
        out = tmp_path / f"full{k}"
        count = [0]

        def disk_full_at_k(name, target):
            count[0] += 1
            if count[0] == k:         # as the OS reports it: with the path when it has one
                path = target if name not in ("fsync", "ftruncate") else None
                raise OSError(errno.ENOSPC, "No space left on device", path)

        try:
            with on_each_fs_call(disk_full_at_k):
                train(options(folder, data_file, out), log=quiet)
            ignored.append(calls[k - 1])        # a failure the run may pass over (see below)
        except OSError as failure:
            message = str(failure)
            assert "No space left on device" in message and str(out) in message, (k, message)
        tried += 1
        recover(folder, data_file, out)                 # space freed: resume
        assert same(final_state(out), straight) and not leftovers(out), k
        survived += 1
        shutil.rmtree(out, ignore_errors=True)
    # only a folder's fsync may fail unreported (some filesystems refuse it; the files in
    # it were synced one by one)
    assert all(c == "fsync folder" for c in ignored), "\n".join(ignored)
    print(f"\nfull disk injection: tried {tried}, survived {survived}, lost {tried - survived} "
          f"({len(ignored)} folder fsyncs passed over)")


def test_a_full_disk_while_logging_leaves_whole_lines(folder, data_file, straight, tmp_path):
    out = tmp_path / "run"

    class HalfWrite:
        """A log file whose write stores half the line, then fails as a full disk does."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    real_open = builtins.open
    lines = [0]

    def open_log(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("log.jsonl") and "a" in mode:
            lines[0] += 1
            if lines[0] == 3:
                return HalfWrite(f)
        return f

    builtins.open = open_log
    try:
        with pytest.raises(OSError, match="log.jsonl"):
            train(options(folder, data_file, out), log=quiet)
    finally:
        builtins.open = real_open
    with open(out / "log.jsonl") as f:
        assert all(json.loads(line) for line in f)      # every line whole
    recover(folder, data_file, out)
    assert same(final_state(out), straight)


def test_a_torn_last_log_line_does_not_break_resume(folder, data_file, straight, tmp_path):
    out = tmp_path / "run"
    train(options(folder, data_file, out, steps=2), log=quiet)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.1, "lr": 0.0')         # cut mid-line
    opts = resume_options(str(out), {"steps": STEPS})
    train(opts, resume=True, log=quiet)
    assert same(final_state(out), straight)


# ------------------------------------------------------------------ two writers

def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(folder, data_file, tmp_path):
    out = tmp_path / "run"
    with run_lock(str(out)):
        with pytest.raises(RunError, match=rf"{out} is in use by pid {os.getpid()}"):
            train(options(folder, data_file, out), log=quiet)
    train(options(folder, data_file, out), log=quiet)     # released: the run goes ahead


def test_two_train_processes_on_one_folder_one_runs_one_is_refused(folder, data_file, tmp_path):
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "minilars.cli", "train", "--model", folder, "--data",
               data_file, "--seq", "16", "--steps", "30", "--batch", "2", "--method", "lars",
               "--threads", "1", "--out", out]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    refused = next(err for code, err in results if code != 0)
    assert ("in use by pid" in refused or "already holds a run" in refused) and out in refused
    with open(os.path.join(out, "log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 31))
    # two resumes at once (they crashed with ENOTEMPTY before the lock)
    resume = [sys.executable, "-m", "minilars.cli", "train", "--resume", out, "--steps", "60"]
    procs = [subprocess.Popen(resume, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results)[0] == 0, results
    assert all(code == 0 or "in use by pid" in err for code, err in results), results
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 61))


def test_a_lock_held_by_a_dead_process_is_free(folder, data_file, tmp_path):
    out = tmp_path / "run"
    pid = os.fork()
    if pid == 0:
        with run_lock(str(out)):
            os._exit(9)                                   # dies holding it
    os.waitpid(pid, 0)
    train(options(folder, data_file, out), log=quiet)


# ------------------------------------------------------------------ NaN, then a lower --lr

def test_a_nan_at_step_1_names_no_checkpoint_and_a_lower_lr_resumes(folder, data_file,
                                                                    straight, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as stop:
        train(options(folder, data_file, out, lr=1e39), log=quiet)
    message = str(stop.value)
    assert "step 1:" in message and "No checkpoint was written yet" in message
    assert "step 0 in" not in message and latest_checkpoint(str(out)) is None
    train(resume_options(str(out), {"lr": 1e-2}), resume=True, log=quiet)
    assert same(final_state(out), straight)
    with open(out / "run.json") as f:
        assert json.load(f)["resumes"][0]["changed"] == {"lr": [1e39, 1e-2]}


def test_a_later_nan_keeps_a_finite_checkpoint_and_a_lower_lr_resumes(folder, data_file,
                                                                     tmp_path):
    out = tmp_path / "run"
    # lr 1e-2 for two steps (saved at step 2), then an lr that overflows the update
    opts = options(folder, data_file, out, steps=6, save_every=2)
    train(replace_steps(opts, 2), log=quiet)
    opts = resume_options(str(out), {"lr": 1e39, "steps": 6})
    with pytest.raises(NonFiniteLoss) as stop:
        train(opts, resume=True, log=quiet)
    assert "step 3:" in str(stop.value) and "step-000002" in str(stop.value)
    ckpt = latest_checkpoint(str(out))
    assert ckpt.endswith("step-000002")
    tensors = {**load_file(os.path.join(ckpt, "adapter_model.safetensors")),
               **load_file(os.path.join(ckpt, "optimizer.safetensors"))}
    assert all(np.isfinite(t).all() for t in tensors.values())
    opts = resume_options(str(out), {"lr": 1e-3})
    summary = train(opts, resume=True, log=quiet)
    assert summary["steps"] == 6 and all(np.isfinite(summary["losses"]))


def replace_steps(opts, steps):
    from dataclasses import replace
    return replace(opts, steps=steps)


def test_the_cli_nan_stop_then_resume_with_a_lower_lr(folder, data_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--model", folder, "--data", data_file, "--seq", "16", "--steps", "3",
            "--batch", "2", "--method", "lars", "--save-every", "1", "--threads", "1",
            "--out", out]
    assert main(args + ["--lr", "1e39"]) == 1
    err = capsys.readouterr().err
    assert "step 1:" in err and "--resume" in err
    assert main(["train", "--resume", out, "--lr", "1e-3"]) == 0
    assert "lr 1e+39 -> 0.001" in capsys.readouterr().out


# ------------------------------------------------------------------ resume options

def test_resume_applies_allowed_changes_and_refuses_the_rest(folder, data_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--model", folder, "--data", data_file, "--seq", "16", "--steps", "2",
                 "--batch", "2", "--method", "lars", "--threads", "1", "--out", out]) == 0
    capsys.readouterr()
    code = main(["train", "--resume", out, "--lr", "100", "--batch", "16", "--method", "full",
                 "--model", "/nonexistent"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot change on resume" in err
    assert "--batch 16" in err and "--method 'full'" in err and "/nonexistent" in err
    assert main(["train", "--resume", out, "--rank", "4"]) == 1
    assert "adapter" in capsys.readouterr().err
    assert main(["train", "--resume", out, "--steps", "4", "--lr", "5e-3", "--warmup", "0",
                 "--clip", "0.5", "--save-every", "3", "--eval-every", "2"]) == 0
    with open(os.path.join(out, "run.json")) as f:
        saved = json.load(f)
    assert (saved["lr"], saved["steps"], saved["warmup"], saved["clip"], saved["save_every"],
            saved["eval_every"]) == (5e-3, 4, 0, 0.5, 3, 2)
    assert saved["resumes"][-1]["changed"]["lr"] == [1e-4, 5e-3]
    assert saved["resumes"][-1]["step"] == 2
    with open(os.path.join(out, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and logged[2]["lr"] <= 5e-3


def test_a_fresh_start_never_discards_a_run(folder, data_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--model", folder, "--data", data_file, "--seq", "16", "--steps", "2",
            "--batch", "2", "--method", "lars", "--threads", "1", "--out", out]
    assert main(args) == 0
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert main(args) == 1 and "already holds a run" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before


def test_leftovers_of_older_versions_are_cleaned_and_their_checkpoint_resumes(
        folder, data_file, straight, tmp_path):
    """A run folder of minilars before versioned checkpoints: checkpoint/ plus stray
    .checkpoint.*.tmp and .old folders. Resume continues from checkpoint/ and removes them."""
    out = tmp_path / "run"
    train(options(folder, data_file, out, steps=2), log=quiet)
    os.rename(latest_checkpoint(str(out)), out / "checkpoint")
    os.rmdir(out / "checkpoints")
    for stray in (".checkpoint.abc.tmp", ".checkpoint.def.old"):
        os.makedirs(out / stray)
        (out / stray / "junk.bin").write_bytes(b"x" * 1000)
    opts = resume_options(str(out), {"steps": STEPS})
    train(opts, resume=True, log=quiet)
    assert same(final_state(out), straight) and not leftovers(out)
    assert not os.path.exists(out / "checkpoint")


def test_a_non_finite_checkpoint_from_an_older_version_is_refused_by_name(folder, data_file,
                                                                         tmp_path):
    from minilars.io.safetensors_io import CheckpointError, save_safetensors_atomic
    out = tmp_path / "run"
    train(options(folder, data_file, out, steps=2), log=quiet)
    path = os.path.join(latest_checkpoint(str(out)), "adapter_model.safetensors")
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = np.full_like(tensors[name], np.inf)
    save_safetensors_atomic(path, tensors)
    opts = resume_options(str(out), {"steps": STEPS})
    with pytest.raises(CheckpointError, match=rf"not finite \({name}"):
        train(opts, resume=True, log=quiet)


@pytest.mark.parametrize("bad, named", [
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--warmup", "-5"], "--warmup: must be >= 0"),
    (["--clip", "nan"], "--clip: must be a finite number"),
    (["--max-examples", "-1"], "--max-examples: must be >= 1"),
    (["--lr", "0"], "--lr: must be a finite number > 0"),
])
def test_train_refuses_bad_numbers_by_name(folder, data_file, tmp_path, capsys, bad, named):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", folder, "--data", data_file, "--out", str(tmp_path / "r")] + bad)
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.parametrize("bad, named", [
    (["--limit", "0"], "--limit: must be >= 1"),
    (["--limit", "-3"], "--limit: must be >= 1"),
    (["--seq", "0"], "--seq: must be >= 1"),
    (["--max-tokens", "-1"], "--max-tokens: must be >= 1"),
])
def test_eval_refuses_bad_numbers_by_name(folder, capsys, bad, named):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", folder, "--task", "arc_easy"] + bad)
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_eval_refuses_a_seq_longer_than_the_model(folder, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox " * 50)
    assert main(["eval", "ppl", "--model", folder, "--text", str(text), "--seq", "100000"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_eval_names_a_text_file_that_is_not_utf8(folder, tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["eval", "ppl", "--model", folder, "--text", str(text), "--seq", "64"]) == 2
    assert "latin1.txt: not UTF-8" in capsys.readouterr().err


def test_files_are_written_with_the_umask(folder, data_file, tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        train(options(folder, data_file, out, steps=2), log=quiet)
    finally:
        os.umask(old)
    ckpt = latest_checkpoint(str(out))
    modes = {name: os.stat(os.path.join(ckpt, name)).st_mode & 0o777 for name in os.listdir(ckpt)}
    assert set(modes.values()) == {0o640}, modes
    assert os.stat(out / "run.json").st_mode & 0o777 == 0o640
