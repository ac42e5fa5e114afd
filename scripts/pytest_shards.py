"""Run the test suite as N pytest processes side by side, each on a share of the collected
tests, and print each shard's summary line and their sum.

    python scripts/pytest_shards.py N [--timings FILE] [PYTEST_ARGS...]

For the emulated arm64 check (scripts/check_arm64.sh): qemu-user runs a process on one host
core, so a single pytest leaves the others idle. Shard K's whole output goes to
arm64-pytest-K.log in the current folder as it runs. Exits 1 if any shard failed.
PYTEST_ARGS choose what is collected (-k, -m, paths); each shard then gets the options
without the paths, which its node ids already select.

Shares: with --timings FILE (a previous run's arm64-timings.txt: "seconds node-id" lines,
# comments) the tests are dealt longest first, each to the shard with the least time so far, so the
few tests that take most of an emulated run (a full-size tracemalloc step, the tutorial
renders) land on different shards; tests the file does not know count as its shortest.
Without it, round robin. Each run writes arm64-timings.txt from its shards' durations.
"""
import os
import re
import subprocess
import sys
import time

TIMINGS_OUT = "arm64-timings.txt"


def collect(pytest_args: list[str]) -> list[str]:
    """The node ids pytest would run with these arguments."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--collect-only", *pytest_args], capture_output=True, text=True)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    if not ids:
        sys.exit(f"pytest collected nothing:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return ids


def summary_counts(line: str) -> dict:
    """{'passed': 12, 'skipped': 3, ...} of pytest's last line."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|"
                                                    r"xfailed|xpassed|errors?|warnings?)", line)}


def read_timings(path: str) -> dict[str, float]:
    """node id -> seconds, from a file of "seconds node-id" lines."""
    timings = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split(maxsplit=1)
            try:
                timings[parts[1].strip()] = float(parts[0])
            except (IndexError, ValueError):
                sys.exit(f"{path}, line {number}: expected 'seconds node-id', "
                         f"got {line.strip()!r}")
    return timings


def durations_in_log(text: str) -> dict[str, float]:
    """node id -> seconds (setup + call + teardown) from pytest's --durations=0 report."""
    timings = {}
    for seconds, node in re.findall(r"^([\d.]+)s (?:setup|call|teardown)\s+(\S.*)$", text, re.M):
        timings[node] = timings.get(node, 0.0) + float(seconds)
    return timings


def deal(ids: list[str], n: int, timings: dict[str, float]) -> list[list[str]]:
    """N shares of ids: longest first to the least-loaded shard when timings are known
    (a test they do not name weighs the shortest they do: the repository's file lists only
    the slow ones), else round robin. Each share keeps collection order."""
    if not timings:
        return [ids[k::n] for k in range(n)]
    default = min(timings.values())
    load, owner = [0.0] * n, {}
    for node in sorted(ids, key=lambda i: -timings.get(i, default)):
        k = load.index(min(load))
        owner[node] = k
        load[k] += timings.get(node, default)
    return [[i for i in ids if owner[i] == k] for k in range(n)]


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        sys.exit("usage: pytest_shards.py N [--timings FILE] [PYTEST_ARGS...]  "
                 "(N: a positive count)")
    n, pytest_args = int(argv[0]), argv[1:]
    timings = {}
    if pytest_args[:1] == ["--timings"]:
        path = pytest_args[1] if len(pytest_args) > 1 else "(none given)"
        if not os.path.isfile(path):
            sys.exit(f"--timings: no such file: {path}")
        timings, pytest_args = read_timings(pytest_args[1]), pytest_args[2:]
    ids = collect(pytest_args)
    options = [a for a in pytest_args if not (os.path.exists(a.split("::")[0]) or "::" in a)]
    shares = deal(ids, n, timings)
    print(f"{len(ids)} tests collected, {n} shards"
          + (f", dealt by the {len(timings)} timings given" if timings else ", round robin"),
          flush=True)
    t0, procs = time.time(), []
    for k in range(n):
        with open(f"arm64-shard-{k}.txt", "w") as f:
            f.write("\n".join(shares[k]) + "\n")
        with open(f"arm64-pytest-{k}.log", "w") as log:      # the child keeps its own copy
            procs.append(subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p",
                                           "no:cacheprovider", "--durations=0", *options,
                                           f"@arm64-shard-{k}.txt"],
                                          stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    total, measured = {}, {}
    for k in range(n):
        with open(f"arm64-pytest-{k}.log") as f:
            text = f.read()
        lines = text.strip().splitlines()
        last = lines[-1] if lines else "(no output)"
        print(f"shard {k} (exit {codes[k]}): {last}")
        for word, count in summary_counts(last).items():
            total[word] = total.get(word, 0) + count
        measured.update(durations_in_log(text))
    with open(TIMINGS_OUT, "w") as f:
        f.writelines(f"{s:.2f} {node}\n"
                     for node, s in sorted(measured.items(), key=lambda kv: -kv[1]))
    print("all shards: " + ", ".join(f"{v} {w}" for w, v in total.items())
          + f" in {time.time() - t0:.0f} s")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
