"""The syscall wrappers against the real kernel, and their one errno translation."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from runtimed.errors import KernelError
from sandbox import syscalls

pytestmark = pytest.mark.kernel


def test_syscalls_kernel_error_names_errno_flags_and_hint() -> None:
    err = syscalls.kernel_error(
        errno.EPERM,
        syscall="unshare",
        flags=syscalls.format_flags(syscalls.CLONE_NEWNS | 0x1, {syscalls.CLONE_NEWNS: "X"}),
    )
    assert err.errno_name == "EPERM"
    assert err.flags == "X|0x1"
    assert err.hint is not None
    assert "user namespaces" in err.hint
    assert err.message.startswith("unshare (X|0x1): EPERM")


def test_syscalls_kernel_error_enosys_points_at_seccomp() -> None:
    err = syscalls.kernel_error(errno.ENOSYS, syscall="openat2", path="/x")
    assert err.path == "/x"
    assert err.hint is not None
    assert "seccomp" in err.hint


def test_syscalls_openat2_beneath_refuses_escape(tmp_path: Path) -> None:
    (tmp_path / "inside").write_text("ok")
    dirfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = syscalls.openat2(dirfd, "inside", os.O_RDONLY, syscalls.RESOLVE_BENEATH)
        assert os.read(fd, 2) == b"ok"
        os.close(fd)
        with pytest.raises(KernelError) as info:
            syscalls.openat2(dirfd, "../etc/passwd", os.O_RDONLY, syscalls.RESOLVE_BENEATH)
    finally:
        os.close(dirfd)
    assert info.value.errno_name == "EXDEV"
    assert info.value.flags == "RESOLVE_BENEATH"


def test_syscalls_mount_failure_names_target_and_flags(tmp_path: Path) -> None:
    with pytest.raises(KernelError) as info:
        syscalls.mount(tmp_path / "missing", tmp_path / "nowhere", None, syscalls.MS_BIND)
    assert info.value.syscall == "mount"
    assert info.value.errno_name == "ENOENT"
    assert info.value.path == str(tmp_path / "nowhere")
    assert info.value.flags == "MS_BIND"


def test_syscalls_posix_spawn_dups_fds_and_restores_signals(tmp_path: Path) -> None:
    # SIGPIPE is ignored in Python; the child gets it back at its default (its disposition
    # shows in /proc/self/status SigIgn), and our pipe's write end as its stdout.
    read_end, write_end = os.pipe()
    script = 'grep SigIgn /proc/self/status; echo "home=${HOME-unset}"'
    try:
        pid = syscalls.posix_spawn(
            "/bin/sh", ["sh", "-c", script], dup2=[(write_end, 1)], default=[signal.SIGPIPE]
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as out:
        text = out.read()
    assert os.waitpid(pid, 0)[1] == 0
    ignored = int(text.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert "home=unset" in text  # an empty environment


def test_syscalls_posix_spawn_missing_program_is_a_kernel_error(tmp_path: Path) -> None:
    with pytest.raises(KernelError) as caught:
        syscalls.posix_spawn(tmp_path / "missing", ["missing"], dup2=[], default=[])
    assert caught.value.errno_name == "ENOENT"
    assert caught.value.syscall == "posix_spawn"
