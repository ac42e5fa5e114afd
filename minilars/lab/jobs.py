"""Processes for the experiment grid: a cell trains (or runs whole) in a fresh Python
process, so its peak RSS is its own, and up to N of them run at once, each with its share
of the cores and a log file of its own. A failure is a CellError carrying the process's
own last error line."""
from __future__ import annotations

import os
import subprocess
import sys
import time


class CellError(RuntimeError):
    """A cell of the experiment failed (its training process, or a parallel cell)."""


def run_child(argv: list[str], what: str) -> None:
    """Run argv; its stdout is ours, its stderr is shown only when it fails, and then it
    raises CellError with the process's last error line."""
    proc = subprocess.run(argv, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise CellError(f"{what} failed (exit {proc.returncode}): "
                        f"{lines[-1] if lines else 'no error message'}")


def thread_env(jobs: int) -> dict:
    """The environment of one of `jobs` processes sharing the cores: cores // jobs BLAS
    and OpenMP threads each, unless the environment already says how many."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    return env


def run_parallel(commands: list[tuple[str, list[str]]], jobs: int, log_dir: str,
                 log=print) -> list[str]:
    """Run (name, argv) commands, up to `jobs` at once, each writing LOG_DIR/NAME.log.
    A failed command does not stop the others. Returns the names of those that failed."""
    env = thread_env(jobs)
    os.makedirs(log_dir, exist_ok=True)
    queue, running, failed = list(commands), {}, []
    while queue or running:
        while queue and len(running) < jobs:
            name, argv = queue.pop(0)
            path = os.path.join(log_dir, name + ".log")
            with open(path, "w") as out:     # the child keeps its own copy of the descriptor
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            running[proc] = (name, path)
            log(f"started {name} ({env['OPENBLAS_NUM_THREADS']} BLAS threads; log {path})")
        time.sleep(0.2)
        for proc in [p for p in running if p.poll() is not None]:
            name, path = running.pop(proc)
            with open(path) as f:
                last = ([line.strip() for line in f if line.strip()] or [""])[-1]
            if proc.returncode:
                failed.append(name)
                log(f"{name} failed (exit {proc.returncode}): {last}")
            else:
                log(last)
    return failed
