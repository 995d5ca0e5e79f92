"""IO: execute a plan's mount operations below a new root (the one executor of ``sandbox.plan``).

Destinations are resolved inside the new root with ``openat2(RESOLVE_IN_ROOT)`` and mounted
through the resulting ``O_PATH`` descriptor (``/proc/self/fd/N``), so a hostile rootfs with a
symlink such as ``/etc -> /`` cannot redirect a mount, or the creation of a mount point, onto
the host (runc CVE-2019-16884 class, runc ``securejoin``). Missing mount points are created in
the overlay's upper directory, never outside the root.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from pathlib import Path
from typing import Final

from runtimed.errors import KernelError
from sandbox import syscalls
from sandbox.plan import (
    BindMount,
    DevptsMount,
    FileMount,
    MaskPath,
    Op,
    OverlayMount,
    ProcMount,
    ReadonlyPath,
    Symlink,
    SysfsMount,
    TmpfsMount,
)
from sandbox.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)

log = logging.getLogger(__name__)

_RESOLVE: Final = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
_BENEATH: Final = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS
# statvfs f_flag bits kept on a read-only remount: a bind remount must repeat the locked flags
# of the original mount or the kernel refuses it with EPERM inside a user namespace
# (mount(2), "MS_REMOUNT"; bubblewrap bind_mount()).
_KEPT_FLAGS: Final = (
    (syscalls.ST_NOSUID, MS_NOSUID),
    (syscalls.ST_NODEV, MS_NODEV),
    (syscalls.ST_NOEXEC, MS_NOEXEC),
    (syscalls.ST_NOATIME, syscalls.MS_NOATIME),
    (syscalls.ST_NODIRATIME, syscalls.MS_NODIRATIME),
    (syscalls.ST_RELATIME, syscalls.MS_RELATIME),
)


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_in_root(root_fd: int, path: str, *, create: str | None = None) -> int:
    """An ``O_PATH`` fd of ``path`` resolved inside ``root_fd``.

    Args:
        create: None: ``path`` must exist (symlinks followed inside the root). "dir" or
            "file": ``path`` is a mount point: its parents are resolved inside the root
            (created as directories when missing), and the last component is made a real
            directory or file when missing or a symlink. Mounting "through" a symlink would
            follow it, and rootfs trees have them where mount points go (debootstrap's first
            stage has ``proc -> /proc``); the change lands in the run's upper directory.

    Raises:
        KernelError: resolution failed (ENOENT without ``create``, or an escape attempt).
    """
    relative = path.strip("/") or "."
    if create is None or relative == ".":
        return syscalls.openat2(root_fd, relative, os.O_PATH, _RESOLVE)
    parent, name = posixpath.split("/" + relative)
    parent_fd = open_directory(root_fd, parent)
    try:
        _make_mount_point(parent_fd, name, create)
        return syscalls.openat2(parent_fd, name, os.O_PATH, _BENEATH)
    finally:
        os.close(parent_fd)


def open_directory(root_fd: int, path: str) -> int:
    """The directory ``path`` inside the root, created (with its parents) when missing."""
    relative = path.strip("/") or "."
    try:
        return syscalls.openat2(root_fd, relative, os.O_PATH | os.O_DIRECTORY, _RESOLVE)
    except KernelError as exc:
        if exc.errno_name != "ENOENT":
            raise
    parent, name = posixpath.split("/" + relative)
    parent_fd = open_directory(root_fd, parent)
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    except FileExistsError:
        pass  # a dangling symlink: the openat2 below reports it
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="mkdirat") from exc
    finally:
        os.close(parent_fd)
    return syscalls.openat2(root_fd, relative, os.O_PATH | os.O_DIRECTORY, _RESOLVE)


def _make_mount_point(parent_fd: int, name: str, kind: str) -> None:
    try:
        try:
            current: os.stat_result | None = os.lstat(name, dir_fd=parent_fd)
        except FileNotFoundError:
            current = None
        if current is not None:
            if not stat.S_ISLNK(current.st_mode):
                return  # an existing file or directory: a type mismatch fails the mount
            os.unlink(name, dir_fd=parent_fd)
        if kind == "dir":
            os.mkdir(name, 0o755, dir_fd=parent_fd)
        else:
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, 0o644, dir_fd=parent_fd))
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="mknodat") from exc


def mount_overlay(root: OverlayMount, target: Path) -> None:
    """Mount the sandbox's root overlay on ``target``."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", root.describe())
    syscalls.mount("overlay", target, "overlay", 0, root.options())


def remount_readonly(root_fd: int, destination: str) -> None:
    """Make the mount on ``destination`` read-only, keeping its other flags.

    The destination is opened again: an fd taken before the bind still points at the mount
    underneath, and remounting that one fails with EINVAL.
    """
    fd = open_in_root(root_fd, destination)
    try:
        path = fd_path(fd)
        current = os.statvfs(path).f_flag
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for st_bit, ms_bit in _KEPT_FLAGS:
            if current & st_bit:
                flags |= ms_bit
        syscalls.mount(None, path, None, flags)
    finally:
        os.close(fd)


def apply(op: Op, root_fd: int, workspace: Path) -> None:
    """Run one op below the root ``root_fd``; ``workspace`` is the helper's private tmpfs.

    Raises:
        KernelError: a system call failed (the error names the op's destination).
    """
    if log.isEnabledFor(logging.DEBUG):  # describe() is not free, and runs for every op
        log.debug("%s", op.describe())
    try:
        _apply(op, root_fd, workspace)
    except KernelError as exc:
        raise KernelError(
            f"{op.describe()}: {exc.message}",
            syscall=exc.syscall,
            errno_name=exc.errno_name,
            path=op.destination,
            flags=exc.flags,
            hint=exc.hint,
        ) from exc


def _apply(op: Op, root_fd: int, workspace: Path) -> None:
    if isinstance(op, MaskPath | ReadonlyPath):
        _apply_existing(op, root_fd)
        return
    if isinstance(op, Symlink):
        _symlink(op, root_fd)
        return
    if isinstance(op, BindMount):
        kind = "dir" if os.path.isdir(op.source) else "file"
        source = op.source
    elif isinstance(op, FileMount):
        kind, source = "file", _write_file(op, workspace)
    else:
        kind, source = "dir", ""
    fd = open_in_root(root_fd, op.destination, create=kind)
    try:
        target = fd_path(fd)
        if isinstance(op, BindMount | FileMount):
            syscalls.mount(source, target, None, MS_BIND | MS_REC)
            if isinstance(op, BindMount) and op.readonly:
                remount_readonly(root_fd, op.destination)
        elif isinstance(op, TmpfsMount):
            flags = MS_NOSUID | (MS_NODEV if op.nodev else 0) | (MS_NOEXEC if op.noexec else 0)
            size = f",size={op.size}" if op.size else ""
            syscalls.mount("tmpfs", target, "tmpfs", flags, f"mode={op.mode:o}{size}")
        elif isinstance(op, ProcMount):
            syscalls.mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif isinstance(op, DevptsMount):
            options = "newinstance,ptmxmode=0666,mode=0620"
            syscalls.mount("devpts", target, "devpts", MS_NOSUID | MS_NOEXEC, options)
        elif isinstance(op, SysfsMount):
            _mount_sysfs(target, root_fd, op.destination)
        else:
            raise TypeError(f"no executor for {op!r}")
    finally:
        os.close(fd)


def _apply_existing(op: MaskPath | ReadonlyPath, root_fd: int) -> None:
    try:
        fd = open_in_root(root_fd, op.destination)
    except KernelError as exc:
        if exc.errno_name == "ENOENT":
            return  # nothing to hide or protect
        raise
    try:
        target = fd_path(fd)
        if isinstance(op, ReadonlyPath):
            syscalls.mount(target, target, None, MS_BIND | MS_REC)
            remount_readonly(root_fd, op.destination)
        elif stat.S_ISDIR(os.stat(target).st_mode):
            syscalls.mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=0")
        else:
            syscalls.mount("/dev/null", target, None, MS_BIND)
    finally:
        os.close(fd)


def _symlink(op: Symlink, root_fd: int) -> None:
    parent, name = posixpath.split(op.destination)
    parent_fd = open_directory(root_fd, parent)
    try:
        os.symlink(op.target, name, dir_fd=parent_fd)
    except FileExistsError:
        pass
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="symlinkat") from exc
    finally:
        os.close(parent_fd)


def _write_file(op: FileMount, workspace: Path) -> str:
    path = workspace / "files" / op.destination.strip("/").replace("/", "_")
    path.parent.mkdir(exist_ok=True)
    path.write_text(op.content)
    return os.fspath(path)


def _mount_sysfs(target: str, root_fd: int, destination: str) -> None:
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        syscalls.mount("sysfs", target, "sysfs", flags)
    except KernelError as exc:
        # A fresh sysfs needs a network namespace owned by our user namespace; with the host's
        # network from a private user namespace, bind the host's read-only instead (bubblewrap).
        if exc.errno_name != "EPERM":
            raise
        syscalls.mount("/sys", target, None, MS_BIND | MS_REC)
        remount_readonly(root_fd, destination)
