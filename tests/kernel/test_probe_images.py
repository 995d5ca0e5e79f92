"""Probe images on the real kernel: x86_64 and i386 run natively; aarch64, arm, s390x and
ppc64le run under F-flag QEMU handlers of a private binfmt_misc instance, and /proc/PID/exe
names who runs each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from binfmt.entry import BinfmtEntry, BinfmtFlag, format_register_line
from binfmt.platform import Platform
from binfmt.probe import probe_image
from binfmt.qemu import interpreter_candidates, target_for_platform
from tests.support import require, run_private_binfmt

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

NATIVE = (Platform("linux", "amd64"), Platform("linux", "386"))
EMULATED = (
    Platform("linux", "arm64"),
    Platform("linux", "arm", "v7"),
    Platform("linux", "s390x"),
    Platform("linux", "ppc64le"),
)

# Inside the namespace: register $ENTRY_LINES (one write each), start every probe, read
# /proc/PID/exe once exec has happened (Popen returns after it), check it is still looping a
# moment later (a bad encoding dies of SIGILL/SIGSEGV at once), kill it.
RUNNER = r"""
import json, os, signal, subprocess, sys
bm = sys.argv[1]
for line in filter(None, os.environ["ENTRY_LINES"].split("\n")):
    fd = os.open(os.path.join(bm, "register"), os.O_WRONLY)
    os.write(fd, os.fsencode(line))
    os.close(fd)
seen = {}
for probe in os.environ["PROBES"].split("\n"):
    child = subprocess.Popen([probe])
    try:
        exe = os.readlink(f"/proc/{child.pid}/exe")
        try:
            child.wait(timeout=0.2)
            running = False
        except subprocess.TimeoutExpired:
            running = True
        seen[probe] = {"exe": exe, "running": running}
    finally:
        child.send_signal(signal.SIGKILL)
        seen[probe]["status"] = child.wait()
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    workdir = tmp_path_factory.mktemp("probes")
    workdir.chmod(0o755)
    lines = []
    for platform in EMULATED:
        interpreter = interpreter_candidates(target_for_platform(platform))[0]
        require(Path(interpreter).exists(), f"{interpreter} missing (qemu-user-static)")
        target = target_for_platform(platform)
        entry = BinfmtEntry(
            name=f"runtimed-test-{target.name}",
            magic=target.magic,
            mask=target.mask,
            interpreter=interpreter,
            flags=frozenset({BinfmtFlag.FIX_BINARY}),
        )
        lines.append(format_register_line(entry).decode())
    probes = []
    for platform in NATIVE + EMULATED:
        path = workdir / f"probe-{platform.architecture}"
        path.write_bytes(probe_image(platform))
        path.chmod(0o755)
        probes.append(str(path))
    result = run_private_binfmt(
        '"$PY" -c "$RUNNER" "$BM"',
        env={"RUNNER": RUNNER, "ENTRY_LINES": "\n".join(lines), "PROBES": "\n".join(probes)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    runs: dict[str, dict[str, object]] = json.loads(result.stdout)
    return runs


def _run_of(
    runs: dict[str, dict[str, object]], platform: Platform
) -> tuple[str, dict[str, object]]:
    return next((p, r) for p, r in runs.items() if p.endswith(f"-{platform.architecture}"))


@pytest.mark.parametrize("platform", NATIVE, ids=str)
def test_probe_images_run_natively(
    probe_runs: dict[str, dict[str, object]], platform: Platform
) -> None:
    probe, run = _run_of(probe_runs, platform)
    assert run["exe"] == probe
    assert run["running"] is True
    assert run["status"] == -9


@pytest.mark.parametrize("platform", EMULATED, ids=str)
def test_probe_images_run_under_their_qemu_handler(
    probe_runs: dict[str, dict[str, object]], platform: Platform
) -> None:
    _, run = _run_of(probe_runs, platform)
    assert run["exe"] == interpreter_candidates(target_for_platform(platform))[0]
    assert run["running"] is True
    assert run["status"] == -9
