#!/usr/bin/env bash
# Run a command inside a Linux memory cgroup with a hard limit and no swap, then report
# the peak the kernel recorded. Needs root (or a delegated cgroup).
#
#   scripts/memlimit.sh 256M minilars train --model weights/smollm2-135m.Q4_1.gguf ...
#
# LIMIT takes the suffixes K, M, G (powers of 1024). The command's exit status is kept;
# when the kernel killed it for exceeding the limit, the script says so and exits 137.
# cgroup v1 (memory controller at /sys/fs/cgroup/memory: memory.limit_in_bytes,
# memory.memsw.limit_in_bytes where swap accounting exists, memory.max_usage_in_bytes and
# memory.oom_control) and v2 (memory.max, memory.swap.max, memory.peak, memory.events) are
# both supported. Page cache counts against the limit, as it does on a small board.
set -u

usage() { echo "usage: $0 LIMIT COMMAND [ARGS...]   (LIMIT like 256M, 1G)" >&2; exit 2; }
[ $# -ge 2 ] || usage
limit_text=$1; shift

to_bytes() {
  local n=${1%[KkMmGg]} unit=${1#"${1%[KkMmGg]}"}
  [[ $n =~ ^[0-9]+$ ]] || return 1
  case $unit in
    "") echo "$n" ;;
    K|k) echo $((n * 1024)) ;;
    M|m) echo $((n * 1024 * 1024)) ;;
    G|g) echo $((n * 1024 * 1024 * 1024)) ;;
  esac
}
limit=$(to_bytes "$limit_text") || { echo "$0: bad LIMIT '$limit_text' (e.g. 256M)" >&2; exit 2; }

name="minilars-memlimit-$$"
if [ -d /sys/fs/cgroup/memory ] && [ -w /sys/fs/cgroup/memory ]; then
  version=1; cg=/sys/fs/cgroup/memory/$name
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
  version=2; cg=/sys/fs/cgroup/$name
elif [ -f /sys/fs/cgroup/unified/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/unified/cgroup.controllers; then
  version=2; cg=/sys/fs/cgroup/unified/$name
else
  echo "$0: no writable cgroup memory controller (v1 /sys/fs/cgroup/memory or v2 memory.max); run as root" >&2
  exit 1
fi

mkdir "$cg" || { echo "$0: cannot create $cg" >&2; exit 1; }
cleanup() { [ -d "$cg" ] && rmdir "$cg" 2>/dev/null; }
trap cleanup EXIT

if [ $version = 1 ]; then
  echo "$limit" > "$cg/memory.limit_in_bytes"
  # no swap: the machine may have none, but where swap accounting exists, forbid it too
  [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo "$limit" > "$cg/memory.memsw.limit_in_bytes"
  echo 0 > "$cg/memory.swappiness" 2>/dev/null
else
  echo "$limit" > "$cg/memory.max"
  [ -f "$cg/memory.swap.max" ] && echo 0 > "$cg/memory.swap.max"
fi

# the child joins the cgroup before it execs the command, so everything it starts is inside
bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' memlimit "$cg" "$@"
status=$?

if [ $version = 1 ]; then
  peak=$(cat "$cg/memory.max_usage_in_bytes")
  killed=$(grep -E '^oom_kill ' "$cg/memory.oom_control" 2>/dev/null | awk '{print $2}')
else
  peak=$(cat "$cg/memory.peak" 2>/dev/null || echo unknown)
  killed=$(awk '$1 == "oom_kill" {print $2}' "$cg/memory.events")
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
echo "memlimit: limit $(mib "$limit") MiB; peak usage $(mib "$peak") MiB (cgroup v$version); exit $status" >&2
if [ "${killed:-0}" -gt 0 ] || [ $status -eq 137 ]; then
  echo "memlimit: the command was killed for exceeding $(mib "$limit") MiB (oom kills: ${killed:-?})" >&2
  exit 137
fi
exit $status
