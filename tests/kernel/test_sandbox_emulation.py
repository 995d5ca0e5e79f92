"""Emulated runs: foreign busybox roots in the sandbox, inside a private binfmt_misc instance.

The test process is not in a private binfmt_misc, so this module is also the driver: run as a
script under ``tests.support.run_private_binfmt`` after ``runtimectl binfmt install``
registered F-flag handlers there, it runs ``uname -m`` in a sandbox per root and prints the
results as JSON. The refusals need no emulator and run in-process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Final

import pytest
import trio

from binfmt.install import version_tuple
from binfmt.platform import Platform
from runtimed.errors import NoEmulatorError, NonLinuxExecError, PlatformMismatchError
from sandbox.launch import prepare_run
from sandbox.spec import ExecSpec
from tests.kernel.test_sandbox import (
    NATIVE_REPORT,
    DirectorySource,
    make_busybox_root,
    run_in_sandbox,
)
from tests.support import REPO, busybox, require_root, run_private_binfmt

pytestmark = pytest.mark.kernel

# Debian arch -> (platform, uname -m inside, QEMU interpreter the kernel runs)
FOREIGN: Final = {
    "arm64": ("linux/arm64", "aarch64", "/usr/bin/qemu-aarch64-static"),
    "armhf": ("linux/arm/v7", "armv7l", "/usr/bin/qemu-arm-static"),
    "s390x": ("linux/s390x", "s390x", "/usr/bin/qemu-s390x-static"),
    "ppc64el": ("linux/ppc64le", "ppc64le", "/usr/bin/qemu-ppc64le-static"),
}


async def _drive(binfmt_misc: Path, scratch: Path, hermetic: bool) -> dict[str, object]:
    from binfmt.detect import platform_report

    report = await trio.to_thread.run_sync(platform_report, binfmt_misc)
    results: dict[str, object] = {}
    for arch, (platform, _, _) in FOREIGN.items():
        if hermetic and arch != "arm64":
            continue
        root = make_busybox_root(scratch / arch / "root", arch)
        source = DirectorySource(root, scratch / arch, Platform(*platform.split("/")))
        script = "uname -m; true" + ("; mknod /dev/x c 1 3 2>&1 || true" if hermetic else "")
        out = await run_in_sandbox(source, ["sh", "-c", script], report, hermetic=hermetic)
        results[arch] = {"stdout": out.stdout, "stderr": out.stderr, **out.result.to_json()}
    results["binfmt_misc_after"] = sorted(os.listdir(binfmt_misc))
    return results


@pytest.fixture(scope="module")
def emulated_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    require_root()
    for arch in FOREIGN:
        busybox(arch)
    scratch = tmp_path_factory.mktemp("emulated")
    proc = run_private_binfmt(
        '"$RUNTIMECTL" binfmt install --binfmt-misc "$BM" linux/arm64 linux/arm/v7 '
        'linux/s390x linux/ppc64le >&2 && "$PY" "$1" "$BM" "$2" host-handlers',
        args=[__file__, str(scratch)],
        env={"PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, dict[str, object]] = json.loads(proc.stdout)
    return results


@pytest.mark.slow
def test_sandbox_hermetic_emulation_leaves_binfmt_misc_untouched(
    tmp_path: Path,
) -> None:
    require_root()
    busybox("arm64")
    proc = run_private_binfmt(
        '"$PY" "$1" "$BM" "$2" hermetic',
        args=[__file__, str(tmp_path)],
        env={"PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    run = results["arm64"]
    assert run["stdout"] == "aarch64\nmknod: /dev/x: Operation not permitted\n", run
    assert run["report"]["mode"] == "emulated"
    assert run["report"]["interpreter"] == "/usr/bin/qemu-aarch64-static"
    assert run["report"]["confirmed"]
    # The handler lived only in the sandbox's user namespace: the instance around it (and
    # the host's) never saw a registration.
    assert results["binfmt_misc_after"] == ["register", "status"]


@pytest.mark.parametrize(
    ("release", "version"),
    [
        ("6.18.44-fc-v669", (6, 18)),
        ("6.7.0", (6, 7)),
        ("5.15.0-91-generic", (5, 15)),
        ("x", None),
    ],
)
def test_sandbox_kernel_version_for_hermetic_emulation(
    release: str, version: tuple[int, int] | None
) -> None:
    assert version_tuple(release) == version


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FOREIGN))
def test_sandbox_foreign_busybox_reported_emulated_by_its_interpreter(
    emulated_runs: dict[str, dict[str, object]], arch: str
) -> None:
    platform, machine, interpreter = FOREIGN[arch]
    run = emulated_runs[arch]
    assert run["stdout"] == f"{machine}\n", run
    assert run["exit_code"] == 0
    report = run["report"]
    assert isinstance(report, dict)
    assert report["mode"] == "emulated"
    assert report["platform"] == platform
    assert report["interpreter"] == interpreter
    assert report["confirmed"], report  # /proc/PID/exe of the command was the interpreter
    emulated = report["emulated"]
    assert isinstance(emulated, dict)
    assert emulated[interpreter]["processes"] >= 1  # sh (and uname) under QEMU
    assert set(emulated) == {interpreter}


def _source(tmp_path: Path, arch: str, platform: str) -> DirectorySource:
    require_root()
    root = make_busybox_root(tmp_path / "root", arch)
    return DirectorySource(root, tmp_path, Platform(*platform.split("/")))


@pytest.mark.parametrize("platform", ["windows/amd64", "darwin/arm64"])
def test_sandbox_non_linux_refused_before_anything_is_created(
    tmp_path: Path, platform: str
) -> None:
    source = _source(tmp_path, "amd64", "linux/amd64")
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["true"], "platform": platform})
    with pytest.raises(NonLinuxExecError, match="only Linux"):
        prepare_run(spec, source, NATIVE_REPORT)
    assert not any((tmp_path / "runs").iterdir())  # no run directory was made


def test_sandbox_platform_without_handler_refused_with_the_fix(tmp_path: Path) -> None:
    source = _source(tmp_path, "s390x", "linux/s390x")
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["true"]})
    with pytest.raises(NoEmulatorError) as info:
        prepare_run(spec, source, NATIVE_REPORT)
    assert info.value.hint is not None
    assert "runtimectl binfmt install linux/s390x" in info.value.hint
    assert "qemu-user-static" in info.value.hint
    assert not any((tmp_path / "runs").iterdir())  # no run directory was made


def test_sandbox_mismatched_binary_reported(tmp_path: Path) -> None:
    source = _source(tmp_path, "arm64", "linux/amd64")  # mislabelled snapshot
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["uname", "-m"]})
    with pytest.raises(PlatformMismatchError, match="/bin/uname is a linux/arm64 binary"):
        prepare_run(spec, source, NATIVE_REPORT)


if __name__ == "__main__":
    hermetic = sys.argv[3] == "hermetic"
    print(json.dumps(trio.run(_drive, Path(sys.argv[1]), Path(sys.argv[2]), hermetic)))
    sys.stdout.flush()
    os._exit(0)
