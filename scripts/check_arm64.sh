#!/usr/bin/env bash
# The arm64 check: install minilars in a Debian arm64 root (Raspberry Pi OS 64-bit is
# Debian bookworm for aarch64) run through qemu-user-static, exactly as the README says,
# run the default test suite there, then a tiny end-to-end pass (memory, train, eval ppl,
# generate). Prints pytest's summary line and the wall times.
#
#   sudo scripts/check_arm64.sh [--quick] [--full-size] [--jobs N] [ROOT_DIR] [-- PYTEST_ARGS...]
#                                              (default ROOT_DIR /var/tmp/minilars-arm64)
#
# --quick skips the test suite (install and the end-to-end pass only: minutes, not hours).
# The suite is the default one (`pytest`), less the full-size tutorial renders (marker
# full_size, tests/test_tutorials.py): each re-renders a page with SmolLM2-135M steps, and
# emulated float math runs at about 0.14 GFLOP/s against this host's 200, so each takes
# hours. Their code runs here at small size (test_tutorial_runs). --full-size includes them.
# The emulated CPU is a Raspberry Pi 5's Cortex-A76 (QEMU_CPU=cortex-a72 for a Pi 4's):
# qemu's default `max` CPU advertises SME, which no Pi has, and OpenBLAS then picks its
# SME kernels, which run about 18x slower under emulation than its NEON ones (three
# (512, 576) x (576, 1536) products: 367 s against 20 s), so the suite took hours.
# --jobs N (default: the host's cores) runs the suite as N pytest processes side by side
# (scripts/pytest_shards.py): qemu-user runs a process on one host core, so one pytest
# leaves the other cores idle. The shards are dealt by each test's duration in the last
# run (ROOT/arm64-timings.txt; before the first, the repository's
# scripts/arm64-timings.txt), so the few long tests do not queue on one shard.
# Shard K's whole output is ROOT/minilars/arm64-pytest-K.log.
# The tests' own timeouts (a tutorial render's hour) are scaled by
# MINILARS_TEST_TIMEOUT_SCALE, 6 by default here.
# Arguments after -- go to pytest after the check's own `-m`, so a `-m` there replaces it.
#
# Needs root, network access to a Debian mirror and PyPI, and on the host:
#   apt-get install qemu-user-static debootstrap binfmt-support
# The root is built once (debootstrap, about 5 minutes) and reused; the repository's
# committed HEAD is copied in fresh each time (git archive: what a clone holds).
# Everything runs under emulation, so times are many times a real Pi's. Not part of
# .ci/run: the suite takes about 50 minutes here on 2 cores (2026-12-07: 2,941 s).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
quick=0
full_size=0
jobs=$(nproc)
root=/var/tmp/minilars-arm64
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case $1 in
    --quick) quick=1; shift;;
    --full-size) full_size=1; shift;;
    --jobs) jobs=${2:-}; shift $(( $# > 1 ? 2 : 1 ));;
    -*) echo "$0: unknown option '$1' (see the usage at the top of this file)" >&2; exit 1;;
    *) root=$1; shift;;
  esac
done
case $jobs in ''|*[!0-9]*|0) echo "$0: --jobs '$jobs': expected a positive count" >&2; exit 1;; esac
[ "${1:-}" = "--" ] && shift
marks="not slow and not full_size"                 # the default suite less the full-size renders
[ $full_size = 1 ] && marks="not slow"             # the default suite (pyproject's addopts)
pytest_args=$(printf ' %q' -m "$marks")             # quoted again for the shell inside the root
if [ $# -gt 0 ]; then pytest_args="$pytest_args$(printf ' %q' "$@")"; fi
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
start=$(date +%s)

[ "$(id -u)" = 0 ] || { echo "$0: run as root (debootstrap and chroot need it)" >&2; exit 1; }
for tool in debootstrap qemu-aarch64-static chroot; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing: apt-get install qemu-user-static debootstrap binfmt-support" >&2; exit 1; }
done

# binfmt_misc: let the kernel run aarch64 binaries through qemu
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || update-binfmts --import qemu-aarch64
fi

if [ ! -x "$root/usr/bin/python3" ]; then
  echo "== debootstrap bookworm arm64 into $root from $mirror"
  debootstrap --arch=arm64 --include=python3,python3-venv,python3-dev,gcc,libc6-dev,libgomp1,git,ca-certificates \
    bookworm "$root" "$mirror"
fi
echo "== root ready after $(( $(date +%s) - start )) s"

cleanup() { for m in proc sys dev; do umount -l "$root/$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc sys dev; do mountpoint -q "$root/$m" || mount --bind "/$m" "$root/$m"; done
cp /etc/resolv.conf "$root/etc/resolv.conf"
# the host's CA bundle, so pip inside trusts what the host trusts (a TLS-inspecting proxy's CA)
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$ca" ] && cp "$ca" "$root/etc/ssl/certs/host-ca-bundle.crt"

# the last run's test durations deal the next run's shards (scripts/pytest_shards.py); the
# repository's scripts/arm64-timings.txt until this root has run the suite once
[ -f "$root/minilars/arm64-timings.txt" ] && cp "$root/minilars/arm64-timings.txt" "$root/arm64-timings.txt"
rm -rf "$root/minilars" && mkdir -p "$root/minilars"
(cd "$repo" && git archive HEAD) | tar -x -C "$root/minilars"
if [ ! -f "$root/arm64-timings.txt" ] && [ -f "$root/minilars/scripts/arm64-timings.txt" ]; then
  cp "$root/minilars/scripts/arm64-timings.txt" "$root/arm64-timings.txt"
fi
timings=""
[ -f "$root/arm64-timings.txt" ] && timings=" --timings /arm64-timings.txt"

cpu=${QEMU_CPU:-cortex-a76}
inside() { chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
           QEMU_CPU="$cpu" MINILARS_TEST_TIMEOUT_SCALE=${MINILARS_TEST_TIMEOUT_SCALE:-6} \
           PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt \
           PIP_DEFAULT_TIMEOUT=180 PIP_DISABLE_PIP_VERSION_CHECK=1 \
           bash -c "cd /minilars && $1"; }

t0=$(date +%s)
echo "== install, as the README says (emulated CPU: $cpu)"
inside "uname -m && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[dev]' && minilars info"
echo "== installed in $(( $(date +%s) - t0 )) s"

suite=0
if [ $quick = 0 ]; then
  t0=$(date +%s)
  echo "== the default test suite (-m '$marks'), $jobs pytest processes side by side"
  echo "   (each one's whole output, as it runs: $root/minilars/arm64-pytest-K.log)"
  set +e
  inside ".venv/bin/python scripts/pytest_shards.py $jobs$timings$pytest_args"
  suite=$?
  set -e
  echo "== suite ran in $(( $(date +%s) - t0 )) s"
fi

t0=$(date +%s)
echo "== end to end on a tiny model"
inside "set -e; . .venv/bin/activate
  python3 -c 'import sys; sys.path.insert(0, \"tests\"); from tiny_folder import make_tiny_folder; make_tiny_folder(\"/tmp/tiny\")'
  printf '{\"text\": \"I inherited from my parents a reckless spirit that has caused me trouble.\"}\n%.0s' 1 2 3 4 > /tmp/d.jsonl
  minilars memory --arch tiny --seq 32,64
  rm -rf /tmp/run && minilars train --model /tmp/tiny --method lars --data /tmp/d.jsonl --seq 32 --steps 4 --policy layer --checkpoints disk --frozen-dtype q8_0 --out /tmp/run
  minilars eval ppl --model /tmp/tiny --adapter /tmp/run --text minilars/resources/botchan.txt --seq 64 --max-tokens 512
  minilars generate --model /tmp/tiny --prompt 'I inherited' --max-new-tokens 8"
echo "== end to end in $(( $(date +%s) - t0 )) s; total $(( $(date +%s) - start )) s"
exit $suite
