"""The C dequantization on arm64, under emulation: cross-compiles minilars_kernels.c with a
small harness, runs it under qemu-user and compares its float32 bits with the NumPy
specification (minilars.quant.dequantize, frozen.bf16_values, NumPy's float16 cast).

Needs a cross compiler and qemu (Debian: apt-get install gcc-aarch64-linux-gnu
libc6-dev-arm64-cross qemu-user-static). Run from the repository top:

    python cext/check_arm64.py          # exit status 0 when every build and format agrees

Builds: -march=armv8.2-a+fp16 and plain armv8-a (both have __fp16 for the scales; the
block loops are the plain C ones), each with -ffp-contract=off as build_cffi.py uses and
with GCC's default (fast), to show the bits do not depend on contraction.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from minilars import frozen, quant  # noqa: E402  (the repository's package, not an install)

CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64-static"
CODES = {"f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "q4_1": 5}     # MINILARS_WEIGHT_*
BUILDS = [["-march=armv8.2-a+fp16", "-ffp-contract=off"], ["-ffp-contract=off"],
          ["-march=armv8.2-a+fp16", "-ffp-contract=fast"]]

HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "minilars_kernels.h"
/* in: int64 format, rows, cols, then W's bytes. out: W dequantized whole, then the rows
 * gathered in reverse order (rows * cols float32 each). */
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb");
    int64_t h[3];
    if (!f || fread(h, 8, 3, f) != 3) return 2;
    fseek(f, 0, SEEK_END);
    long n = ftell(f) - 24;
    fseek(f, 24, SEEK_SET);
    unsigned char *W = malloc(n);
    if (fread(W, 1, n, f) != (size_t)n) return 2;
    fclose(f);
    float *out = malloc(8 * h[1] * h[2]);
    int64_t *index = malloc(8 * h[1]);
    for (int64_t i = 0; i < h[1]; i++) index[i] = h[1] - 1 - i;
    if (minilars_dequantize(W, (int)h[0], h[1], h[2], 0, h[1], 0, h[2], out)
        || minilars_gather_rows(W, (int)h[0], h[1], h[2], index, h[1], out + h[1] * h[2]))
        return 3;
    f = fopen(argv[2], "wb");
    fwrite(out, 4, 2 * h[1] * h[2], f);
    fclose(f);
    return 0;
}
"""


def case(fmt: str, rng, rows: int = 1024, cols: int = 128):
    """(bytes of W, the float32 it must dequantize to): random bytes, every scale and nibble."""
    if fmt in quant.FORMATS:
        data = rng.integers(0, 256, size=(rows, quant.row_bytes(fmt, cols)), dtype=np.uint8)
        with np.errstate(all="ignore"):
            return data, quant.dequantize(data, fmt, cols)
    bits = rng.integers(0, 65536, size=(rows, cols)).astype(np.uint16)
    return bits, (bits.view(np.float16).astype(np.float32) if fmt == "f16"
                  else frozen.bf16_values(bits))


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    nan = np.isnan(want)
    return bool((np.isnan(got) == nan).all()
                and (got.view(np.uint32)[~nan] == want.view(np.uint32)[~nan]).all())


def main() -> int:
    rng, failures = np.random.default_rng(0), 0
    with tempfile.TemporaryDirectory() as tmp:
        harness = os.path.join(tmp, "harness.c")
        with open(harness, "w") as f:
            f.write(HARNESS)
        for flags in BUILDS:
            exe = os.path.join(tmp, "harness")
            subprocess.run([CC, "-O3", *flags, "-static", "-I", HERE, "-o", exe, harness,
                            os.path.join(HERE, "minilars_kernels.c"), "-lm"], check=True)
            for fmt, code in CODES.items():
                data, want = case(fmt, rng)
                src, dst = os.path.join(tmp, "in.bin"), os.path.join(tmp, "out.bin")
                with open(src, "wb") as f:
                    f.write(np.array([code, *want.shape], np.int64).tobytes() + data.tobytes())
                subprocess.run([QEMU, exe, src, dst], check=True)
                got = np.fromfile(dst, np.float32).reshape(2, *want.shape)
                ok = same_bits(got[0], want) and same_bits(got[1], want[::-1])
                failures += not ok
                print(f"{' '.join(flags):40s} {fmt:5s} {'bit-exact' if ok else 'DIFFERENT'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
