"""Exec mode decisions: platform, host report and the entrypoint found in the root."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from binfmt.platform import Platform
from binfmt.report import Emulator, PlatformReport
from runtimed.errors import (
    ExecFailedError,
    NoEmulatorError,
    NonLinuxExecError,
    PlatformMismatchError,
)
from sandbox.mode import Mode, decide, find_command
from tests.unit.binfmt.elfbuild import elf_header

EM_X86_64 = 62
EM_AARCH64 = 183
AMD64 = Platform(os="linux", architecture="amd64")
ARM64 = Platform(os="linux", architecture="arm64")
S390X = Platform(os="linux", architecture="s390x")
QEMU_ARM64 = Emulator(entry="qemu-aarch64", interpreter="/usr/bin/qemu-aarch64-static", flags="FP")
REPORT = PlatformReport(
    host=AMD64,
    native=frozenset({AMD64}),
    native_source="test",
    emulated={ARM64: QEMU_ARM64},
    unavailable={S390X: "qemu-s390x-static is not installed"},
)


class FakeRoot:
    """A root as a mapping of absolute paths to file contents (all executable)."""

    def __init__(self, files: Mapping[str, bytes]) -> None:
        self.files = files

    def is_executable(self, path: str) -> bool:
        return path in self.files

    def read_head(self, path: str, size: int) -> bytes:
        return self.files.get(path, b"")[:size]


ROOT = FakeRoot(
    {
        "/bin/busybox": elf_header(machine=EM_AARCH64),
        "/usr/bin/tool": elf_header(machine=EM_X86_64),
        "/usr/bin/script": b"#!/bin/busybox sh\necho\n",
        "/usr/bin/chain": b"#!/usr/bin/script\n",
        "/usr/bin/loop": b"#!/usr/bin/loop\n",
        "/usr/bin/orphan": b"#!/missing/sh\n",
        "/usr/bin/data": b"plain text",
    }
)


@pytest.mark.parametrize(
    ("argv0", "path", "cwd", "found"),
    [
        ("busybox", "/usr/bin:/bin", "/", "/bin/busybox"),
        ("tool", "/bin:/usr/bin", "/", "/usr/bin/tool"),
        ("/bin/busybox", "", "/", "/bin/busybox"),
        ("./tool", "", "/usr/bin", "/usr/bin/tool"),
        ("tool", ":bin", "/usr", "/usr/bin/tool"),
        ("nothere", "/bin", "/", None),
    ],
)
def test_mode_find_command(argv0: str, path: str, cwd: str, found: str | None) -> None:
    assert find_command(ROOT, argv0, path=path, cwd=cwd) == found


@pytest.mark.parametrize(
    ("requested", "argv0", "mode", "entry"),
    [
        (ARM64, "busybox", Mode.EMULATED, "/bin/busybox"),
        (ARM64, "script", Mode.EMULATED, "/bin/busybox"),
        (ARM64, "chain", Mode.EMULATED, "/bin/busybox"),
        (AMD64, "tool", Mode.NATIVE, "/usr/bin/tool"),
        (AMD64, "data", Mode.NATIVE, "/usr/bin/data"),
    ],
)
def test_mode_decide(requested: Platform, argv0: str, mode: Mode, entry: str) -> None:
    decision = decide(requested, REPORT, ROOT, argv0=argv0, path="/usr/bin:/bin", cwd="/")
    assert decision.mode is mode
    assert decision.entry == entry
    assert decision.emulator == (QEMU_ARM64 if mode is Mode.EMULATED else None)


@pytest.mark.parametrize(
    ("requested", "argv0", "error", "text"),
    [
        (Platform(os="windows", architecture="amd64"), "tool", NonLinuxExecError, "only Linux"),
        (Platform(os="darwin", architecture="arm64"), "tool", NonLinuxExecError, "only Linux"),
        (S390X, "tool", NoEmulatorError, "runtimectl binfmt install linux/s390x"),
        (Platform(os="linux", architecture="riscv64"), "tool", NoEmulatorError, "qemu-user"),
        (AMD64, "busybox", PlatformMismatchError, "linux/arm64 binary"),
        (ARM64, "tool", PlatformMismatchError, "--platform linux/amd64"),
        (AMD64, "nothere", ExecFailedError, "not found"),
        (ARM64, "orphan", ExecFailedError, "interpreter /missing/sh"),
        (ARM64, "loop", ExecFailedError, "too many levels"),
    ],
)
def test_mode_decide_refuses(
    requested: Platform, argv0: str, error: type[Exception], text: str
) -> None:
    with pytest.raises(error) as info:
        decide(requested, REPORT, ROOT, argv0=argv0, path="/usr/bin:/bin", cwd="/")
    assert text in str(info.value)


def test_mode_no_emulator_reports_why_unavailable() -> None:
    with pytest.raises(NoEmulatorError, match="qemu-s390x-static is not installed"):
        decide(S390X, REPORT, ROOT, argv0="tool", path="/usr/bin", cwd="/")
