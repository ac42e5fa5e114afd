"""Build hook for minilars's optional C core (everything else is in pyproject.toml).

`pip install .` / `pip install -e .` build the cffi module minilars._cext from
cext/build_cffi.py. When that cannot work (no C compiler, a compiler that fails), the
install still succeeds: OptionalBuildExt turns the failure into a warning and minilars
runs on its NumPy path (`minilars info` says which path is active and why).
Set MINILARS_NO_BUILD=1 to skip the C build on purpose.
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError
    BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError, OSError)
except ImportError:  # older setuptools
    from distutils.errors import CCompilerError, DistutilsError
    BUILD_ERRORS = (CCompilerError, DistutilsError, OSError)
try:
    from distutils.errors import DistutilsError
    BUILD_ERRORS += (DistutilsError,)
except ImportError:
    pass


def _warn(message: str) -> None:
    line = "=" * 78
    sys.stderr.write(f"\n{line}\nWARNING (minilars): {message}\n"
                     "minilars is installed without its C core and will run on the NumPy "
                     "path.\n`minilars info` reports the kernel path.\n"
                     f"{line}\n\n")


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a failed C build only warns."""

    def run(self):
        if os.environ.get("MINILARS_NO_BUILD") == "1":
            _warn("MINILARS_NO_BUILD=1: the C extension was not built.")
            return
        try:
            super().run()
        except BUILD_ERRORS as e:
            _warn(f"building the C extension failed ({type(e).__name__}: {e}).")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as e:
            _warn(f"building {ext.name} failed ({type(e).__name__}: {e}).")

    def get_outputs(self):
        # only report extensions that were really built, so wheel packing does not
        # look for a missing .so
        return [path for path in super().get_outputs() if os.path.exists(path)]


setup(
    cmdclass={"build_ext": OptionalBuildExt},
    cffi_modules=["cext/build_cffi.py:ffibuilder"],
)
