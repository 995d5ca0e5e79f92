"""IO: thin ctypes wrappers for the Linux system calls the Python side of the sandbox needs.

Each wrapper is named after its system call, takes ``pathlib.Path``/``str`` arguments and turns
a failure into :class:`runtimed.errors.KernelError` through :func:`kernel_error`, the one place
where ``OSError``/errno becomes our error (with the syscall, the errno by name, the path, the
flags by name and a hint for the refusals we know). Python 3.11 has no ``os.unshare``, so it goes
through libc; ``openat2`` has no libc wrapper and goes through ``syscall(2)``.

Namespace calls must come from a single-threaded process (the exec'd helpers), never from the
trio daemon: ``unshare(CLONE_NEWUSER)`` fails with EINVAL in a multi-threaded process.

Like every ctypes call, :func:`posix_spawn` lets go of the GIL while it runs, which
``os.posix_spawn`` does not: it waits until the child has exec'd (glibc's vfork), and other
Python threads run meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from runtimed.errors import KernelError

_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# --- <linux/sched.h>: namespace flags for unshare(2)/setns(2) -------------------------------------
CLONE_NEWTIME: Final = 0x00000080
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

# --- <linux/mount.h>: mount(2) flags ------------------------------------------------------------
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_NOATIME: Final = 0x400
MS_BIND: Final = 0x1000
MS_MOVE: Final = 0x2000
MS_REC: Final = 0x4000
MS_SILENT: Final = 0x8000
MS_PRIVATE: Final = 0x40000
MS_SLAVE: Final = 0x80000
MS_NODIRATIME: Final = 0x800
MS_RELATIME: Final = 0x200000
MS_STRICTATIME: Final = 0x1000000

# --- <sys/mount.h>: umount2(2) flags ------------------------------------------------------------
MNT_FORCE: Final = 0x1
MNT_DETACH: Final = 0x2

# --- <linux/openat2.h>: struct open_how.resolve -------------------------------------------------
RESOLVE_NO_XDEV: Final = 0x01
RESOLVE_NO_MAGICLINKS: Final = 0x02
RESOLVE_NO_SYMLINKS: Final = 0x04
RESOLVE_BENEATH: Final = 0x08
RESOLVE_IN_ROOT: Final = 0x10

# --- <linux/prctl.h> ----------------------------------------------------------------------------
PR_SET_PDEATHSIG: Final = 1

# --- <linux/capability.h> -----------------------------------------------------------------------
CAPABILITIES: Final[Mapping[str, int]] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}

# --- <asm/unistd.h>: syscalls without a glibc wrapper (x86_64 and aarch64 share 437) -------------
_NR_OPENAT2: Final[Mapping[str, int]] = {"x86_64": 437, "aarch64": 437}

NAMESPACE_FLAGS: Final[Mapping[int, str]] = {
    CLONE_NEWTIME: "CLONE_NEWTIME",
    CLONE_NEWNS: "CLONE_NEWNS",
    CLONE_NEWCGROUP: "CLONE_NEWCGROUP",
    CLONE_NEWUTS: "CLONE_NEWUTS",
    CLONE_NEWIPC: "CLONE_NEWIPC",
    CLONE_NEWUSER: "CLONE_NEWUSER",
    CLONE_NEWPID: "CLONE_NEWPID",
    CLONE_NEWNET: "CLONE_NEWNET",
}
MOUNT_FLAGS: Final[Mapping[int, str]] = {
    MS_RDONLY: "MS_RDONLY",
    MS_NOSUID: "MS_NOSUID",
    MS_NODEV: "MS_NODEV",
    MS_NOEXEC: "MS_NOEXEC",
    MS_REMOUNT: "MS_REMOUNT",
    MS_NOATIME: "MS_NOATIME",
    MS_BIND: "MS_BIND",
    MS_MOVE: "MS_MOVE",
    MS_REC: "MS_REC",
    MS_SILENT: "MS_SILENT",
    MS_PRIVATE: "MS_PRIVATE",
    MS_SLAVE: "MS_SLAVE",
    MS_NODIRATIME: "MS_NODIRATIME",
    MS_RELATIME: "MS_RELATIME",
    MS_STRICTATIME: "MS_STRICTATIME",
}
UMOUNT_FLAGS: Final[Mapping[int, str]] = {MNT_FORCE: "MNT_FORCE", MNT_DETACH: "MNT_DETACH"}
RESOLVE_FLAGS: Final[Mapping[int, str]] = {
    RESOLVE_NO_XDEV: "RESOLVE_NO_XDEV",
    RESOLVE_NO_MAGICLINKS: "RESOLVE_NO_MAGICLINKS",
    RESOLVE_NO_SYMLINKS: "RESOLVE_NO_SYMLINKS",
    RESOLVE_BENEATH: "RESOLVE_BENEATH",
    RESOLVE_IN_ROOT: "RESOLVE_IN_ROOT",
}

# Refusals we can explain, keyed by (syscall, errno); bubblewrap and mkosi do the same.
_HINTS: Final[Mapping[tuple[str, int], str]] = {
    ("unshare", errno.EPERM): (
        "creating namespaces needs CAP_SYS_ADMIN, or unprivileged user namespaces enabled "
        "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor "
        "restrict_unprivileged_userns); inside a container, run it privileged"
    ),
    ("unshare", errno.EINVAL): (
        "unshare(CLONE_NEWUSER) fails in a multi-threaded process: namespaces are set up by "
        "the single-threaded sandbox runner and helpers, never by the daemon"
    ),
    ("unshare", errno.ENOSPC): "the namespace limit is reached (sysctl user.max_*_namespaces)",
    ("mount", errno.EPERM): (
        "mounting needs CAP_SYS_ADMIN in the user namespace owning the mount namespace"
    ),
    ("mount", errno.ENODEV): "the filesystem type is not available in this kernel",
    ("pivot_root", errno.EINVAL): (
        "the new root must be a mount point, not on a shared mount, and the caller's root "
        "must not be a chroot"
    ),
    ("openat2", errno.EXDEV): "the path escapes the root it was resolved in",
    ("openat2", errno.ELOOP): "the path contains a symlink where none is allowed",
}
_ENOSYS_HINT: Final = (
    "the kernel lacks this system call or a seccomp filter blocks it (running inside a "
    "container runtime's default profile?)"
)


def format_flags(value: int, names: Mapping[int, str]) -> str:
    """Render a flag word by name ("MS_BIND|MS_REC"); unknown bits stay as hex."""
    parts = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or "0"


def kernel_error(
    err: int,
    *,
    syscall: str,
    path: Path | str | None = None,
    flags: str | None = None,
) -> KernelError:
    """The one translation of a failed system call (errno ``err``) into a KernelError."""
    errno_name = errno.errorcode.get(err, str(err))
    where = f" {path}" if path is not None else ""
    how = f" ({flags})" if flags else ""
    hint = _ENOSYS_HINT if err == errno.ENOSYS else _HINTS.get((syscall, err))
    return KernelError(
        f"{syscall}{where}{how}: {errno_name} ({os.strerror(err)})",
        syscall=syscall,
        errno_name=errno_name,
        path=None if path is None else os.fspath(path),
        flags=flags,
        hint=hint,
    )


def oserror(exc: OSError, *, syscall: str, flags: str | None = None) -> KernelError:
    """Translate an ``OSError`` raised by ``os.*`` into the KernelError it stands for."""
    return kernel_error(exc.errno or 0, syscall=syscall, path=exc.filename, flags=flags)


def _check(
    result: int, syscall: str, path: Path | str | None = None, flags: str | None = None
) -> int:
    if result < 0:
        raise kernel_error(ctypes.get_errno(), syscall=syscall, path=path, flags=flags)
    return result


def _bytes(path: Path | str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    """unshare(2): move the calling (single-threaded) process into new namespaces."""
    _check(_libc.unshare(flags), "unshare", flags=format_flags(flags, NAMESPACE_FLAGS))


def syncfs(fd: int) -> None:
    """syncfs(2): write out the file system that ``fd`` lives on."""
    _check(_libc.syncfs(fd), "syncfs")


def mount(
    source: Path | str | None,
    target: Path | str,
    fstype: str | None = None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2). The error names the target, the type and the flags."""
    result = _libc.mount(
        _bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)
    )
    shown = format_flags(flags, MOUNT_FLAGS) + (f" type {fstype}" if fstype else "")
    _check(result, "mount", target, shown)


def umount2(target: Path | str, flags: int = 0) -> None:
    """umount2(2)."""
    result = _libc.umount2(_bytes(target), flags)
    _check(result, "umount2", target, format_flags(flags, UMOUNT_FLAGS))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2) with integer arguments."""
    args = (ctypes.c_ulong(a) for a in (arg2, arg3, arg4, arg5))
    return _check(_libc.prctl(option, *args), "prctl", flags=str(option))


# glibc's posix_spawn_file_actions_t is 80 bytes and posix_spawnattr_t 336 on 64-bit
# platforms, sigset_t 128: these buffers hold them with room to spare, and only libc touches
# them.
_SPAWN_BUFFER: Final = 1024
POSIX_SPAWN_SETSIGDEF: Final = 0x04


def posix_spawn(
    path: Path | str, argv: Sequence[str], dup2: Sequence[tuple[int, int]], default: Sequence[int]
) -> int:
    """posix_spawn(3) of ``path`` with ``argv``, an empty environment, each (fd, target) of
    ``dup2`` made the child's ``target``, and the signals ``default`` back to their default
    disposition; the child's PID.

    Raises:
        KernelError: the child could not be started or ``path`` not exec'd (posix_spawn's
            error number).
    """
    actions = ctypes.create_string_buffer(_SPAWN_BUFFER)
    attributes = ctypes.create_string_buffer(_SPAWN_BUFFER)
    signals = ctypes.create_string_buffer(_SPAWN_BUFFER)
    if _libc.posix_spawn_file_actions_init(actions) or _libc.posix_spawnattr_init(attributes):
        raise kernel_error(errno.ENOMEM, syscall="posix_spawn", path=path)
    try:
        for fd, target in dup2:
            _spawn_check(_libc.posix_spawn_file_actions_adddup2(actions, fd, target), path)
        _libc.sigemptyset(signals)
        for signum in default:
            _libc.sigaddset(signals, signum)
        _spawn_check(_libc.posix_spawnattr_setsigdefault(attributes, signals), path)
        _spawn_check(_libc.posix_spawnattr_setflags(attributes, POSIX_SPAWN_SETSIGDEF), path)
        args = (ctypes.c_char_p * (len(argv) + 1))(*(os.fsencode(a) for a in argv), None)
        environment = (ctypes.c_char_p * 1)(None)
        pid = ctypes.c_int()
        _spawn_check(
            _libc.posix_spawn(
                ctypes.byref(pid), os.fsencode(path), actions, attributes, args, environment
            ),
            path,
        )
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attributes)


def _spawn_check(result: int, path: Path | str) -> None:
    # The posix_spawn family returns an error number instead of setting errno.
    if result:
        raise kernel_error(result, syscall="posix_spawn", path=path)


class _OpenHow(ctypes.Structure):
    # struct open_how, <linux/openat2.h>
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


def openat2(dirfd: int, path: Path | str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` with RESOLVE_* restrictions; an fd."""
    number = _NR_OPENAT2.get(platform.machine())
    if number is None:
        raise kernel_error(errno.ENOSYS, syscall="openat2", path=path)
    how = _OpenHow(flags=flags | os.O_CLOEXEC, mode=mode, resolve=resolve)
    result = _libc.syscall(
        ctypes.c_long(number),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return _check(result, "openat2", path, format_flags(resolve, RESOLVE_FLAGS))
