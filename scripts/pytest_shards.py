"""Run the test suite as N pytest processes side by side, each on a round-robin share of
the collected tests, and print each shard's summary line and their sum.

    python scripts/pytest_shards.py N [PYTEST_ARGS...]

For the emulated arm64 check (scripts/check_arm64.sh): qemu-user runs a process on one host
core, so a single pytest leaves the others idle. Shard K's whole output goes to
arm64-pytest-K.log in the current folder as it runs. Exits 1 if any shard failed.
PYTEST_ARGS choose what is collected (-k, -m, paths); each shard then gets the options
without the paths, which its node ids already select.
"""
import os
import re
import subprocess
import sys
import time


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


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit() or int(argv[0]) < 1:
        sys.exit("usage: pytest_shards.py N [PYTEST_ARGS...]  (N: a positive count)")
    n, pytest_args = int(argv[0]), argv[1:]
    ids = collect(pytest_args)
    options = [a for a in pytest_args if not (os.path.exists(a.split("::")[0]) or "::" in a)]
    print(f"{len(ids)} tests collected, {n} shards", flush=True)
    t0, procs = time.time(), []
    for k in range(n):
        with open(f"arm64-shard-{k}.txt", "w") as f:
            f.write("\n".join(ids[k::n]) + "\n")
        with open(f"arm64-pytest-{k}.log", "w") as log:      # the child keeps its own copy
            procs.append(subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p",
                                           "no:cacheprovider", *options, f"@arm64-shard-{k}.txt"],
                                          stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    total = {}
    for k in range(n):
        with open(f"arm64-pytest-{k}.log") as f:
            lines = f.read().strip().splitlines()
        last = lines[-1] if lines else "(no output)"
        print(f"shard {k} (exit {codes[k]}): {last}")
        for word, count in summary_counts(last).items():
            total[word] = total.get(word, 0) + count
    print("all shards: " + ", ".join(f"{v} {w}" for w, v in total.items())
          + f" in {time.time() - t0:.0f} s")
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
