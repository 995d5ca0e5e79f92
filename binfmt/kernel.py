"""IO: reads and writes a binfmt_misc filesystem (by default /proc/sys/fs/binfmt_misc).

Thin by design: :mod:`binfmt.entry` formats register lines and parses status text; this module
only moves them across the kernel boundary, one ``write(2)`` per rule as the kernel requires
(Documentation/admin-guide/binfmt-misc.rst: the register file takes one rule per write).
Every ``OSError`` becomes a :class:`~runtimed.errors.KernelError` (or a more specific binfmt
error) naming the operation, the path, the errno and, for known refusals, a hint.

Mounting is delegated to :mod:`binfmt.helper`, an exec'd single-threaded process calling
``mount(2)`` through ctypes: the errno comes back exactly (``mount(8)`` folds every failure into
exit status 32 and a localised message), and the calling process, which may be the daemon with
trio's worker threads, never calls ``mount`` itself (STYLE.md §6).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from binfmt.entry import RESERVED_NAMES, BinfmtEntry, format_register_line, parse_status
from binfmt.mountinfo import mount_at, parse_mountinfo
from runtimed.errors import (
    BinfmtEntryError,
    BinfmtError,
    BinfmtNotMountedError,
    HandlerConflictError,
    InterpreterNotFoundError,
    Json,
    KernelError,
)

log = logging.getLogger(__name__)

DEFAULT_BINFMT_MISC: Final = Path("/proc/sys/fs/binfmt_misc")
FS_TYPE: Final = "binfmt_misc"
PROC_FILESYSTEMS: Final = Path("/proc/filesystems")
MOUNTINFO: Final = Path("/proc/self/mountinfo")
# The helper starts a Python interpreter and, for probes, waits SETTLE_SECONDS: seconds at most.
HELPER_TIMEOUT: Final = 30.0
# Values written to an entry file or to "status" (binfmt-misc.rst).
_ENABLE: Final = b"1"
_DISABLE: Final = b"0"
_REMOVE: Final = b"-1"

_PERMISSION_HINT: Final = (
    "run as root: binfmt_misc needs CAP_SYS_ADMIN in the user namespace that owns the instance"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class BinfmtMiscState:
    """What a binfmt_misc instance holds: its global switch and every entry."""

    path: Path
    enabled: bool
    entries: tuple[BinfmtEntry, ...]


def kernel_error(exc: OSError, *, syscall: str, path: Path, action: str) -> KernelError:
    """Translate an OSError into a KernelError with the errno by name and a hint if known."""
    name = errno.errorcode.get(exc.errno or 0, f"errno {exc.errno}")
    hint: str | None = None
    if exc.errno in (errno.EPERM, errno.EACCES):
        hint = _PERMISSION_HINT
    elif exc.errno == errno.EROFS:
        hint = "the filesystem is mounted read-only (inside a container?)"
    return KernelError(
        f"{action} {path}: {name}", syscall=syscall, errno_name=name, path=str(path), hint=hint
    )


def filesystem_supported(proc_filesystems: Path = PROC_FILESYSTEMS) -> bool:
    """Whether the kernel knows binfmt_misc (built in, or its module loaded).

    Raises:
        KernelError: /proc/filesystems cannot be read.
    """
    try:
        text = proc_filesystems.read_text()
    except OSError as exc:
        raise kernel_error(exc, syscall="open", path=proc_filesystems, action="read") from exc
    return any(line.split()[-1:] == [FS_TYPE] for line in text.splitlines())


def mounted_fs_type(path: Path) -> str | None:
    """The type of the filesystem mounted exactly at ``path`` (resolved), or None.

    Raises:
        KernelError: mountinfo cannot be read.
    """
    try:
        text = MOUNTINFO.read_text()
    except OSError as exc:
        raise kernel_error(exc, syscall="open", path=MOUNTINFO, action="read") from exc
    found = mount_at(parse_mountinfo(text), os.path.realpath(path))
    return None if found is None else found.fs_type


def is_mounted(path: Path) -> bool:
    """Whether a binfmt_misc filesystem (not just a directory) is mounted at ``path``.

    A systemd automount point (autofs) mounts binfmt_misc on first access, so it is touched
    once and looked at again.

    Raises:
        KernelError: mountinfo cannot be read.
    """
    fs_type = mounted_fs_type(path)
    if fs_type == "autofs":
        try:
            (path / "status").stat()
        except OSError as exc:
            log.debug("triggering the automount at %s: %s", path, exc)
        fs_type = mounted_fs_type(path)
    return fs_type == FS_TYPE


def ensure_mounted(path: Path) -> bool:
    """Mount binfmt_misc at ``path`` unless it is there already; True if this call mounted it.

    Raises:
        BinfmtNotMountedError: the kernel has no binfmt_misc.
        KernelError: the mount failed (errno and hint from the helper).
    """
    if is_mounted(path):
        return False
    if not filesystem_supported():
        raise BinfmtNotMountedError(
            f"mount binfmt_misc on {path}: the kernel has no binfmt_misc filesystem",
            details={"path": str(path)},
            hint="load the module (modprobe binfmt_misc) or use a kernel with CONFIG_BINFMT_MISC",
        )
    run_helper(["mount", os.fspath(path)])
    log.info("mounted binfmt_misc on %s", path)
    return True


def run_helper(
    argv: list[str], *, request: bytes = b"", timeout: float = HELPER_TIMEOUT
) -> dict[str, Json]:
    """Run ``binfmt.helper`` with ``argv`` (``request`` on its stdin); return its JSON reply.

    Raises:
        KernelError: the helper reported a failed system call.
        BinfmtError: the helper could not be started or replied with something unexpected.
    """
    command = [sys.executable, "-I", "-m", "binfmt.helper", *argv]
    log.debug("running %s", command)
    try:
        done = subprocess.run(
            command, input=request, capture_output=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinfmtError(f"run binfmt helper {argv[0]}: {exc}") from exc
    try:
        reply = json.loads(done.stdout)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise BinfmtError(
            f"binfmt helper {argv[0]} exited {done.returncode} without a reply",
            details={"stderr": done.stderr.decode(errors="replace")[-2000:]},
        )
    error = reply.get("error")
    if isinstance(error, dict):
        name = str(error.get("errno", "EIO"))
        raise KernelError(
            str(error.get("message", f"binfmt helper {argv[0]} failed")),
            syscall=str(error.get("syscall", "?")),
            errno_name=name,
            path=str(error.get("path", "")) or None,
            hint=_PERMISSION_HINT if name in ("EPERM", "EACCES") else None,
        )
    return reply


def require_mounted(path: Path) -> None:
    """Raises BinfmtNotMountedError with the fixing command unless binfmt_misc is at ``path``.

    Raises:
        BinfmtNotMountedError: nothing or another filesystem is mounted there.
        KernelError: mountinfo cannot be read.
    """
    if not is_mounted(path):
        raise BinfmtNotMountedError(
            f"binfmt_misc is not mounted on {path}",
            details={"path": str(path)},
            hint=f"mount -t binfmt_misc binfmt_misc {path}",
        )


def read_state(path: Path) -> BinfmtMiscState:
    """Read the global switch and every entry of the instance at ``path``.

    An entry removed while we read is skipped.

    Raises:
        BinfmtNotMountedError: binfmt_misc is not mounted there.
        BinfmtEntryError: an entry's status text is not understood.
        KernelError: a file cannot be read.
    """
    require_mounted(path)
    status = path / "status"
    try:
        enabled = status.read_text().strip() == "enabled"
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise kernel_error(exc, syscall="open", path=path, action="read") from exc
    entries: list[BinfmtEntry] = []
    for name in names:
        if name in RESERVED_NAMES:
            continue
        try:
            text = (path / name).read_text()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise kernel_error(exc, syscall="open", path=path / name, action="read") from exc
        entries.append(parse_status(name, text))
    return BinfmtMiscState(path=path, enabled=enabled, entries=tuple(entries))


def _write_once(target: Path, data: bytes, *, action: str) -> None:
    """One ``write(2)`` of ``data`` to ``target``; a short write is an error."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel_error(exc, syscall="open", path=target, action=action) from exc
    try:
        written = os.write(fd, data)
    except OSError as exc:
        raise kernel_error(exc, syscall="write", path=target, action=action) from exc
    finally:
        os.close(fd)
    if written != len(data):
        raise KernelError(
            f"{action} {target}: short write ({written} of {len(data)} bytes)",
            syscall="write",
            errno_name="EIO",
            path=str(target),
        )


def register(path: Path, entry: BinfmtEntry) -> None:
    """Register ``entry`` with exactly one write of its register line.

    Raises:
        HandlerConflictError: an entry of that name exists (EEXIST).
        BinfmtEntryError: the kernel rejected the rule (EINVAL).
        InterpreterNotFoundError: the F flag makes the kernel open the interpreter, which is
            missing (ENOENT).
        KernelError: any other failure.
    """
    target = path / "register"
    line = format_register_line(entry)
    log.debug("register %s in %s: %r", entry.name, path, line)
    try:
        _write_once(target, line, action=f"register {entry.name} via")
    except KernelError as exc:
        details: dict[str, Json] = {**exc.details, "entry": entry.name}
        if exc.errno_name == "EEXIST":
            raise HandlerConflictError(
                f"register {entry.name} in {path}: an entry of that name exists (EEXIST)",
                details=details,
                hint=f"look at it with: runtimectl binfmt status --binfmt-misc {path}",
            ) from exc
        if exc.errno_name == "EINVAL":
            raise BinfmtEntryError(
                f"register {entry.name} in {path}: the kernel rejected the rule (EINVAL)",
                details=details,
                hint="a malformed rule, or the instance is disabled",
            ) from exc
        if exc.errno_name == "ENOENT" and exc.syscall == "write":
            raise InterpreterNotFoundError(
                f"register {entry.name} in {path}: interpreter {entry.interpreter} not found",
                details={**details, "interpreter": entry.interpreter},
                hint="the F flag opens the interpreter at registration: install qemu-user-static",
            ) from exc
        raise
    log.info("registered binfmt_misc handler %s (%s) in %s", entry.name, entry.interpreter, path)


def _entry_write(path: Path, name: str, data: bytes, *, action: str) -> None:
    if name in RESERVED_NAMES or "/" in name or not name:
        raise BinfmtEntryError(f"{action} {name!r} in {path}: not an entry name")
    try:
        _write_once(path / name, data, action=action)
    except KernelError as exc:
        if exc.errno_name == "ENOENT":
            raise KernelError(
                f"{action} {name} in {path}: no such entry",
                syscall=exc.syscall,
                errno_name="ENOENT",
                path=exc.path,
                hint=f"list the entries with: runtimectl binfmt status --binfmt-misc {path}",
            ) from exc
        raise


def set_enabled(path: Path, name: str, enabled: bool) -> None:
    """Enable (write 1) or disable (write 0) the entry ``name``.

    Raises:
        BinfmtEntryError: ``name`` is not an entry name.
        KernelError: no such entry (ENOENT) or the write failed.
    """
    action = "enable" if enabled else "disable"
    _entry_write(path, name, _ENABLE if enabled else _DISABLE, action=action)
    log.info("%sd binfmt_misc handler %s in %s", action, name, path)


def remove(path: Path, name: str) -> None:
    """Remove the entry ``name`` (write -1).

    Raises:
        BinfmtEntryError: ``name`` is not an entry name.
        KernelError: no such entry (ENOENT) or the write failed.
    """
    _entry_write(path, name, _REMOVE, action="remove")
    log.info("removed binfmt_misc handler %s from %s", name, path)
