"""Build the sandbox's native parts with the package: the runner (sandbox/native/runner.c), the
layer decoder (sandbox/native/layerdecode.c) and the layer writer (sandbox/native/layerwrite.c).

Everything else is declared in pyproject.toml. The runner is a standalone static executable,
not a Python extension: it is exec'd once per run, and a static binary starts in a fraction
of a millisecond (no dynamic loader). The layer decoder and writer are plain shared libraries
that ``sandbox.layerdecode`` and ``sandbox.layerwrite`` load with ctypes (no Python C API, so
no rebuild per Python version); the decoder links against libzstd and OpenSSL's libcrypto. An
editable install builds them all in the source tree.
"""

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

NATIVE = Path("sandbox", "native")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
# (source, target, compiler options, libraries: these go after the source that needs them)
BUILDS = (
    ("runner.c", "runtimed-runner", ("-static",), ()),
    ("layerdecode.c", "layerdecode.so", ("-shared", "-fPIC"), ("-lzstd", "-lcrypto")),
    ("layerwrite.c", "layerwrite.so", ("-shared", "-fPIC"), ()),
)


class BuildPyWithRunner(build_py):
    """build_py, then compile the native parts next to the package's modules."""

    def run(self) -> None:
        super().run()
        compiler = shlex.split(os.environ.get("CC", "cc"))
        for source, target, options, libraries in BUILDS:
            out = NATIVE / target if self.editable_mode else Path(self.build_lib, NATIVE, target)
            out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [*compiler, *CFLAGS, *options, "-o", str(out), str(NATIVE / source), *libraries],
                check=True,
            )


class BinaryDistribution(Distribution):
    """A wheel with the native parts in it is for this platform only (not ``py3-none-any``)."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithRunner}, distclass=BinaryDistribution)
