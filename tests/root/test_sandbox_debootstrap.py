"""A real build tool in the sandbox: the second stage of an amd64 Debian minbase debootstrap.

The first stage (``debootstrap --foreign``) is fetched once from deb.debian.org and cached
under the test cache; the second stage needs no network and creates device nodes, so it runs
in the default profile (initial user namespace, CAP_MKNOD) over that tree as the snapshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.kernel.test_sandbox import NATIVE_REPORT, DirectorySource, run_in_sandbox
from tests.support import CACHE, require, require_root, unavailable

pytestmark = [pytest.mark.root, pytest.mark.slow]

FIRST_STAGE = CACHE / "debootstrap-foreign-amd64"
MIRROR = "http://deb.debian.org/debian"


@pytest.fixture(scope="module")
def first_stage() -> Path:
    require_root()
    require(os.uname().machine == "x86_64", "the amd64 second stage runs natively here")
    require(shutil.which("debootstrap") is not None, "debootstrap is not installed")
    if not FIRST_STAGE.is_dir():
        tmp = FIRST_STAGE.with_name(FIRST_STAGE.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fetch = subprocess.run(
            [
                "debootstrap",
                "--foreign",
                "--variant=minbase",
                "--arch=amd64",
                "bookworm",
                str(tmp),
                MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if fetch.returncode != 0:
            unavailable(f"debootstrap --foreign failed (network?): {fetch.stderr[-500:]}")
        tmp.rename(FIRST_STAGE)
    return FIRST_STAGE


def _tree(root: Path) -> set[tuple[str, int]]:
    out = set()
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            out.add((str(path.relative_to(root)), path.lstat().st_size))
    return out


async def test_sandbox_debootstrap_second_stage_completes(
    first_stage: Path, tmp_path: Path
) -> None:
    before = _tree(first_stage)
    source = DirectorySource(first_stage, tmp_path)
    script = (
        "/debootstrap/debootstrap --second-stage && "
        "dpkg-query -W -f '${Status}\\n' | sort | uniq -c"
    )
    out = await run_in_sandbox(source, ["/bin/sh", "-c", script], NATIVE_REPORT, timeout=1500)
    log = out.stdout + out.stderr
    assert out.result.exit_code == 0, log[-3000:]
    assert "Base system installed successfully" in log
    installed = [line for line in out.stdout.splitlines() if "install ok installed" in line]
    assert installed
    assert int(installed[0].split()[0]) > 50  # minbase installs ~90 packages
    assert out.result.report.mode == "native"
    assert out.result.report.native.processes > 10  # dpkg, maintainer scripts, ...
    assert _tree(first_stage) == before  # the snapshot is untouched (no --commit)
