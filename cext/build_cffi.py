"""cffi build script for minilars._cext (API mode).

Used by setup.py (`cffi_modules=["cext/build_cffi.py:ffibuilder"]`) and runnable by hand:

    python cext/build_cffi.py            # builds minilars/_cext*.so in place

Flags: -O3 always; -ffp-contract=off (no fused multiply-adds the source does not write:
dequantization must round d * q + m twice, as minilars.quant does; MINILARS_FP_CONTRACT=1
leaves it out, to measure or to see the bit-exactness tests fail);
-fopenmp when a tiny OpenMP program compiles and links with it;
-march=native when the compiler accepts it (the module is built on the machine that
runs it; set MINILARS_NATIVE=0 to leave it out). MINILARS_SANITIZE=address builds with
AddressSanitizer (see cext/README.md); MINILARS_PORTABLE=1 builds the plain-C loops
without GCC/Clang vector extensions (what other compilers get). Nothing here fails when no compiler exists:
the probes then report False and setup.py's build_ext turns the failed build into a
warning, leaving minilars on its NumPy path.
"""
from __future__ import annotations

import glob
import os
import re
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADER = os.path.join(HERE, "minilars_kernels.h")

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
#pragma omp parallel reduction(+:n)
    n += 1;
    return (n > 0 && omp_get_max_threads() > 0) ? 0 : 1;
}
"""
PLAIN_PROBE = "int main(void) { return 0; }\n"


def read_cdef(header_path: str = HEADER) -> str:
    """The declarations between CDEF BEGIN and CDEF END of the header, for ffi.cdef."""
    with open(header_path) as f:
        text = f.read()
    match = re.search(r"/\* CDEF BEGIN \*/(.*?)/\* CDEF END \*/", text, re.S)
    if not match:
        raise RuntimeError(f"{header_path}: no CDEF BEGIN/END markers")
    return match.group(1)


def compiler_accepts(source: str, flags: list[str], link: bool = True) -> bool:
    """True when the default C compiler (honouring CC/CFLAGS) compiles `source` with
    `flags` (and links it when `link`). Any failure, including no compiler, is False."""
    try:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
    except ImportError:  # pragma: no cover - very old setuptools
        try:
            from distutils.ccompiler import new_compiler
            from distutils.sysconfig import customize_compiler
        except ImportError:
            return False
    try:
        compiler = new_compiler()
        customize_compiler(compiler)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "probe.c")
            with open(path, "w") as f:
                f.write(source)
            devnull = os.open(os.devnull, os.O_WRONLY)
            saved = os.dup(2)
            os.dup2(devnull, 2)          # keep probe errors out of the build log
            try:
                objects = compiler.compile([path], output_dir=tmp, extra_postargs=flags)
                if link:
                    compiler.link_executable(objects, os.path.join(tmp, "probe"),
                                             extra_postargs=flags)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.close(devnull)
        return True
    except Exception:
        return False


def compile_flags() -> tuple[list[str], list[str], bool]:
    """(extra_compile_args, extra_link_args, openmp) for this machine."""
    cflags, ldflags = ["-O3"], []
    if os.environ.get("MINILARS_FP_CONTRACT") != "1" and compiler_accepts(PLAIN_PROBE, ["-ffp-contract=off"], link=False):
        cflags.append("-ffp-contract=off")           # Q4_1's d * q + m: two roundings
    if os.environ.get("MINILARS_NATIVE", "1") != "0" and compiler_accepts(PLAIN_PROBE, ["-march=native"], link=False):
        cflags.append("-march=native")
    openmp = os.environ.get("MINILARS_OPENMP", "1") != "0" and compiler_accepts(OPENMP_PROBE, ["-fopenmp"])
    if openmp:
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    if os.environ.get("MINILARS_PORTABLE") == "1":
        cflags.append("-DMINILARS_PORTABLE_C")       # plain C loops, no vector extensions
    if os.environ.get("MINILARS_SANITIZE") == "address":
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=address"]
    return cflags, ldflags, openmp


def make_ffibuilder(absolute_paths: bool = False) -> FFI:
    """The cffi builder. Paths are relative to the repository top (what setuptools
    wants, run from setup.py's folder) unless `absolute_paths` (for ffi.compile)."""
    cflags, ldflags, _ = compile_flags()
    builder = FFI()
    builder.cdef(read_cdef())
    where = HERE if absolute_paths else "cext"
    builder.set_source(
        "minilars._cext",
        '#include "minilars_kernels.h"\n',
        sources=[os.path.join(where, "minilars_kernels.c")],
        include_dirs=[where],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder = make_ffibuilder(absolute_paths=True)
    tmpdir = os.path.join(ROOT, "build", "cffi")
    os.makedirs(tmpdir, exist_ok=True)
    so_path = ffibuilder.compile(tmpdir=tmpdir, verbose="-v" in sys.argv)
    target = os.path.join(ROOT, "minilars", os.path.basename(so_path))
    for old in glob.glob(os.path.join(ROOT, "minilars", "_cext*.so")):
        os.remove(old)          # e.g. an _cext.abi3.so from pip install -e, which would win
    os.replace(so_path, target)
    print(target)
