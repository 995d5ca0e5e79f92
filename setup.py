"""Build the sandbox's native runner (sandbox/native/runner.c) with the package.

Everything else is declared in pyproject.toml. The runner is a standalone static executable,
not a Python extension: it is exec'd once per run, and a static binary starts in a fraction
of a millisecond (no dynamic loader). An editable install builds it in the source tree.
"""

import os
import shlex
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

SOURCE = Path("sandbox", "native", "runner.c")
TARGET = Path("sandbox", "native", "runtimed-runner")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-static")


class BuildPyWithRunner(build_py):
    """build_py, then compile the runner next to the package's modules."""

    def run(self) -> None:
        super().run()
        target = TARGET if self.editable_mode else Path(self.build_lib, TARGET)
        target.parent.mkdir(parents=True, exist_ok=True)
        compiler = shlex.split(os.environ.get("CC", "cc"))
        subprocess.run([*compiler, *CFLAGS, "-o", str(target), str(SOURCE)], check=True)


class BinaryDistribution(Distribution):
    """A wheel with the runner in it is for this platform only (not ``py3-none-any``)."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithRunner}, distclass=BinaryDistribution)
