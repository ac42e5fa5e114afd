"""Threads: one count for both pools a step uses, chosen to share a busy machine fairly.

A step runs on two thread pools: NumPy's BLAS (OpenBLAS's pthreads in NumPy's wheels)
for the matrix products, and the C core's OpenMP team for its kernels. They take turns,
never overlap, so they get one count, `threads`, set for both at once through
threadpoolctl (openblas_set_num_threads and omp_set_num_threads).

Why not every core, always: BLAS splits a product into equal parts, one per thread, and
waits for the last. When another process holds one of the cores, the thread that shares
it runs at half speed and the whole product with it. Measured here (2 cores, LARS step,
T=512, policy none): quiet, 2 threads 2.13 s; against one busy process, 2 threads 5.75 s
but 1 thread 2.70 s; against two, 2 threads 15.9 s, 1 thread 4.02 s.

So `auto` (the default of train, eval and bench) counts how many cores other processes
keep busy over a short sample when the command starts, and takes the rest (at least one).
It decides once and the run records the count: BLAS's sums (and the C core's per-thread
reductions) depend on the thread count, so a run that changed it would not resume
bit-identically. `--threads N` fixes the count.
"""
from __future__ import annotations

import os
import time

from threadpoolctl import threadpool_info, threadpool_limits

from minilars import kernels   # loads the C core, and with it the OpenMP runtime
from minilars.memory import freed_memory_kept

SAMPLE_SECONDS = 0.2            # how long `auto` watches the other processes


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _busy_ticks(cpus: list[int]) -> int | None:
    """Clock ticks the CPUs in `cpus` spent busy since boot (/proc/stat), None off Linux."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted, busy = {f"cpu{i}" for i in cpus}, 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(v) for v in fields[1:]]
            busy += sum(ticks[:8]) - ticks[3] - ticks[4]   # all but idle and iowait; guest is inside user
    return busy


def cores_busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many of our usable cores other processes kept busy over the next `seconds`
    (this process's own CPU time is taken out). None where /proc/stat is missing."""
    cpus, tick = usable_cores(), os.sysconf("SC_CLK_TCK")
    before, own_before, t0 = _busy_ticks(cpus), os.times(), time.monotonic()
    if before is None:
        return None
    time.sleep(seconds)
    after, own_after, wall = _busy_ticks(cpus), os.times(), time.monotonic() - t0
    own = (own_after.user + own_after.system) - (own_before.user + own_before.system)
    return max(0.0, ((after - before) / tick - own) / wall)


def parse_threads(text: str) -> str | int:
    """--threads: `auto` or a whole number of threads >= 1 (ValueError names the text)."""
    if text == "auto":
        return text
    n = int(text) if text.strip().isdigit() else 0
    if n < 1:
        raise ValueError(f"--threads {text!r}: expected auto or a whole number >= 1")
    return n


def choose_threads(setting: str | int) -> tuple[int, str]:
    """(threads, why) for --threads `setting`: a number as given; `auto` the usable cores
    no other process is keeping busy, at least 1."""
    if setting != "auto":
        return int(setting), "as asked"
    cores = len(usable_cores())
    busy = cores_busy_elsewhere()
    if busy is None:
        return cores, f"auto: {cores} cores (no /proc/stat to see other processes)"
    n = max(1, cores - int(busy + 0.5))
    return n, f"auto: other processes keep {busy:.1f} of {cores} cores busy"


def set_threads(n: int) -> None:
    """Use n threads in BLAS and in the C core's OpenMP team, from now on."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    threadpool_limits(limits=n)      # every BLAS and OpenMP runtime loaded in this process


def current_threads() -> int:
    """The thread count set for the C core's OpenMP team (and, by set_threads, BLAS);
    1 without the C core."""
    return int(kernels.kernel_status()["threads"])


def one_blas_thread():
    """A context in which BLAS runs each product on the calling thread alone: for work
    split over threads of our own (the tiled attention's query tiles), whose small
    products gain nothing from a second BLAS thread."""
    return threadpool_limits(limits=1, user_api="blas")


def pools() -> list[dict]:
    """The thread pools loaded in this process, as threadpoolctl reports them: user_api
    (blas | openmp), internal_api, version, num_threads, and for OpenBLAS its kernel
    (`architecture`) and threading layer."""
    return threadpool_info()


def describe() -> list[str]:
    """Lines for `minilars info` and the benchmarks: cores, each BLAS and OpenMP runtime."""
    lines = [f"cores: {len(usable_cores())} usable (of {os.cpu_count()})"]
    for pool in sorted(pools(), key=lambda p: p["user_api"]):      # blas before openmp
        name = f"{pool['prefix']} {pool.get('version') or ''}".strip()
        if pool["user_api"] == "blas":
            kernel = pool.get("architecture") or "?"
            lines.append(f"BLAS: {name} ({pool.get('threading_layer', '?')}), kernel {kernel}, "
                         f"{pool['num_threads']} threads")
        else:
            owner = " (the C core)" if kernels.kernel_status().get("openmp") else ""
            lines.append(f"OpenMP: {name}{owner}, {pool['num_threads']} threads")
    if freed_memory_kept():                     # once a training step has run here
        lines.append("malloc: freed memory kept for reuse (glibc; MINILARS_KEEP_FREED=0 to not)")
    return lines


def conflicts() -> list[str]:
    """Warnings about the thread setup: pools of different sizes, more threads than
    cores, spinning OpenMP waits, an environment that forces a slower BLAS kernel."""
    out, cores = [], len(usable_cores())
    found = pools()
    counts = {p["num_threads"] for p in found}
    if len(counts) > 1:
        sizes = ", ".join(f"{p['internal_api']} {p['num_threads']}" for p in found)
        out.append(f"BLAS and OpenMP use different thread counts ({sizes}); "
                   "--threads N sets them all")
    if max(counts, default=1) > cores:
        out.append(f"{max(counts)} threads on {cores} usable cores: they will time-share")
    runtimes = [p["internal_api"] for p in found if p["user_api"] == "openmp"]
    if len(runtimes) > 1:
        out.append(f"{len(runtimes)} OpenMP runtimes loaded ({', '.join(runtimes)}): their "
                   "thread teams do not know of each other")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
        out.append("OMP_WAIT_POLICY=ACTIVE: idle OpenMP threads spin and take cores from BLAS")
    if os.environ.get("OPENBLAS_CORETYPE"):
        out.append(f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} forces OpenBLAS's "
                   "kernel for that CPU, not the one it would pick for this one (often a "
                   "slower one); unset it, and OPENBLAS_L2_SIZE, for your CPU's own kernel")
    elif os.environ.get("OPENBLAS_L2_SIZE"):
        out.append(f"OPENBLAS_L2_SIZE={os.environ['OPENBLAS_L2_SIZE']} overrides the cache "
                   "size OpenBLAS blocks its products for")
    return out
