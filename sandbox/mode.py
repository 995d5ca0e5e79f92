"""Pure. Decide how a command runs: natively, emulated (by which interpreter), or not at all.

Inputs: the requested platform, the host's :class:`binfmt.report.PlatformReport` (native set,
emulated platforms with their binfmt_misc entry and interpreter) and the entrypoint as the
kernel will find it: ``PATH`` lookup inside the snapshot's root, then ``#!`` lines followed to
the ELF that actually runs (``fs/binfmt_script.c``, at most :data:`MAX_SCRIPT_DEPTH` levels).

Refusals, all before anything is created:

- a non-Linux platform (``windows/amd64``, ``darwin/arm64``): :class:`NonLinuxExecError`;
- a Linux platform the host neither runs natively nor emulates: :class:`NoEmulatorError`, with
  the fix (``runtimectl binfmt install <platform>``, qemu-user-static) as the hint;
- an entrypoint ELF built for another architecture than requested: :class:`PlatformMismatchError`
  (it would run under a different emulator, or natively, than the user asked for);
- an entrypoint that does not exist in the root: :class:`ExecFailedError`.
"""

from __future__ import annotations

import enum
import posixpath
from dataclasses import dataclass
from typing import Final, Protocol

from binfmt.elf import elf_platform, parse_elf, parse_shebang
from binfmt.platform import Platform, compatible, is_linux
from binfmt.report import Emulator, PlatformReport
from runtimed.errors import (
    ElfError,
    ExecFailedError,
    NoEmulatorError,
    NonLinuxExecError,
    PlatformMismatchError,
)

# fs/exec.c: a script may name a script as its interpreter, up to this many levels.
MAX_SCRIPT_DEPTH: Final = 4
HEAD_SIZE: Final = 4096


class Mode(enum.StrEnum):
    NATIVE = "native"
    EMULATED = "emulated"


class RootView(Protocol):
    """Read-only access to a root file system without mounting it (``sandbox.rootfs``)."""

    def is_executable(self, path: str) -> bool:
        """Whether ``path`` (absolute, inside the root) is an executable regular file."""
        ...

    def read_head(self, path: str, size: int) -> bytes:
        """The first ``size`` bytes of the file at ``path`` (symlinks followed in the root)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecMode:
    """The decision: mode, interpreter when emulated, and the binary that was checked."""

    mode: Mode
    platform: Platform
    emulator: Emulator | None = None
    entry: str | None = None
    binary_platform: Platform | None = None


def check_platform(requested: Platform, report: PlatformReport) -> ExecMode:
    """Native or emulated for ``requested``, before looking at any binary.

    Raises:
        NonLinuxExecError: the platform's OS is not Linux.
        NoEmulatorError: neither native nor emulated here; the hint names the fix.
    """
    if not is_linux(requested):
        raise NonLinuxExecError(
            f"cannot execute for {requested}: only Linux binaries run in the sandbox "
            "(file operations on the snapshot still work)",
            details={"platform": str(requested)},
        )
    if report.runs_natively(requested):
        return ExecMode(mode=Mode.NATIVE, platform=requested)
    emulator = report.emulated.get(requested) or next(
        (e for p, e in sorted(report.emulated.items()) if compatible(p, requested)), None
    )
    if emulator is not None:
        return ExecMode(mode=Mode.EMULATED, platform=requested, emulator=emulator)
    why = report.unavailable.get(requested, "no binfmt_misc handler is registered for it")
    raise NoEmulatorError(
        f"cannot execute for {requested} on this {report.host} host: {why}",
        details={"platform": str(requested), "host": str(report.host)},
        hint=(
            f"register an emulator with `runtimectl binfmt install {requested}` "
            "(needs QEMU user-mode emulators: apt-get install qemu-user-static), or run on a "
            f"native {requested} host"
        ),
    )


def find_command(root: RootView, argv0: str, *, path: str, cwd: str) -> str | None:
    """Where ``execvpe`` will find ``argv0`` inside the root (POSIX ``PATH`` search)."""
    if "/" in argv0:
        candidate = posixpath.normpath(posixpath.join(cwd, argv0))
        return candidate if root.is_executable(candidate) else None
    for directory in path.split(":"):
        candidate = posixpath.normpath(posixpath.join(cwd, directory or ".", argv0))
        if root.is_executable(candidate):
            return candidate
    return None


def decide(
    requested: Platform,
    report: PlatformReport,
    root: RootView,
    *,
    argv0: str,
    path: str,
    cwd: str,
) -> ExecMode:
    """The full decision: :func:`check_platform`, then the entrypoint's ELF against it.

    Raises:
        NonLinuxExecError, NoEmulatorError: see :func:`check_platform`.
        ExecFailedError: the command is not in the root (or not executable).
        PlatformMismatchError: the ELF that would run is for another architecture.
    """
    decision = check_platform(requested, report)
    entry = find_command(root, argv0, path=path, cwd=cwd)
    if entry is None:
        raise ExecFailedError(
            f"{argv0}: command not found in the snapshot (PATH={path})",
            details={"argv0": argv0, "path": path},
        )
    for _ in range(MAX_SCRIPT_DEPTH + 1):
        head = root.read_head(entry, HEAD_SIZE)
        script = parse_shebang(head)
        if script is None:
            break
        interpreter = script[0]
        if not root.is_executable(interpreter):
            raise ExecFailedError(
                f"{entry}: interpreter {interpreter} not found in the snapshot",
                details={"entry": entry, "interpreter": interpreter},
            )
        entry = interpreter
    else:
        raise ExecFailedError(f"{argv0}: too many levels of #! interpreters")
    try:
        binary = elf_platform(parse_elf(head))
    except ElfError:
        # Neither ELF nor script: the kernel decides (ENOEXEC, or another binfmt handler).
        return ExecMode(
            mode=decision.mode, platform=requested, emulator=decision.emulator, entry=entry
        )
    if binary.architecture != requested.architecture:
        raise PlatformMismatchError(
            f"{entry} is a {binary} binary but {requested} was requested",
            details={"entry": entry, "binary": str(binary), "requested": str(requested)},
            hint=f"request --platform {binary}, or run a binary built for {requested}",
        )
    return ExecMode(
        mode=decision.mode,
        platform=requested,
        emulator=decision.emulator,
        entry=entry,
        binary_platform=binary,
    )
