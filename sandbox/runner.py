"""IO: start the native runner for one sandbox and turn its reports into our errors.

The runner (``sandbox/native/runner.c``, built with the package as ``runtimed-runner``) does
steps 2 to 10 of a run: namespaces, the overlay root and the plan's mounts, ``pivot_root``,
capabilities, the command under a PID 1 of its own. It is started with ``posix_spawn``
(:func:`spawn`), or forked by a :class:`Spawner`, and gets the two halves of its plan on
fds 3 and 5 (pipes it reads to the end) and the status pipe on fd 4 (``sandbox.wire``).
Namespaces are never set up by the daemon itself: ``unshare`` of some of them fails with
EINVAL in a threaded process.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import trio

from runtimed.errors import ExecFailedError, KernelError, RuntimedError, SandboxError
from sandbox import cgroups, idmap, syscalls
from sandbox.plan import Plan
from sandbox.wire import EncodedPlan, ExecFailed, StepFailed, encode_plan

log = logging.getLogger(__name__)

RUNNER: Final = Path(__file__).parent / "native" / "runtimed-runner"
SHAPE_FD: Final = 3
STATUS_FD: Final = 4
COMMAND_FD: Final = 5
_RESTORED_SIGNALS: Final = (signal.SIGPIPE, signal.SIGXFSZ)
# Which flag names belong to which system call's flags argument, for error messages.
_FLAG_NAMES: Final[Mapping[str, Mapping[int, str]]] = {
    "mount": syscalls.MOUNT_FLAGS,
    "umount2": syscalls.UMOUNT_FLAGS,
    "openat2": syscalls.RESOLVE_FLAGS,
    "unshare": syscalls.NAMESPACE_FLAGS,
}


def runner_path() -> Path:
    """The built runner.

    Raises:
        SandboxError: it was not built (the package was installed without a C compiler).
    """
    if not os.access(RUNNER, os.X_OK):
        raise SandboxError(
            f"the sandbox runner {RUNNER} is missing",
            hint="reinstall runtimed with a C compiler present (scripts/setup installs gcc)",
        )
    return RUNNER


def encode(plan: Plan) -> EncodedPlan:
    """The runner's plan for ``plan``, in its two halves.

    Raises:
        SandboxError: the plan names an unknown capability, or cannot be encoded.
    """
    unknown = set(plan.capabilities) - set(syscalls.CAPABILITIES)
    if unknown:
        raise SandboxError(f"sandbox plan names unknown capabilities {sorted(unknown)}")
    mask = 0
    for name in plan.capabilities:
        mask |= 1 << syscalls.CAPABILITIES[name]
    return encode_plan(plan, capabilities=mask, **_id_maps(plan))


def _id_maps(plan: Plan) -> dict[str, str]:
    """For a plan with a user namespace, its identity maps: the runner's own maps are the
    daemon's (:mod:`sandbox.idmap`)."""
    if "user" not in plan.namespaces:
        return {}
    return {
        name: idmap.identity_map(Path(f"/proc/self/{name}").read_text())
        for name in ("uid_map", "gid_map")
    }


def spawn(fds: Sequence[int]) -> tuple[int, int]:
    """Start the runner with ``fds``: stdin, stdout, stderr, status, and the read ends of the
    pipes the two halves of its plan come through (it waits for them, so a runner can be
    started, and build its sandbox, ahead of the request); its PID and a pidfd.

    Call it from a thread that lives as long as the runs it starts: the runner asks the
    kernel to kill it when its parent thread exits (``PR_SET_PDEATHSIG``). The GIL is let go
    while the new process is scheduled and exec'd (:func:`sandbox.syscalls.posix_spawn`).
    The caller reaps it once the pidfd is readable.

    Raises:
        SandboxError: the runner is missing or could not be started.
    """
    targets = (0, 1, 2, STATUS_FD, SHAPE_FD, COMMAND_FD)
    return _start([], list(zip(fds, targets, strict=True)))


def _start(mode: list[str], dup2: list[tuple[int, int]]) -> tuple[int, int]:
    path = runner_path()
    try:
        pid = syscalls.posix_spawn(
            path,
            [path.name, *mode, str(os.getpid())],
            dup2=dup2,
            default=_RESTORED_SIGNALS,  # Python ignores them; the command must not
        )
    except KernelError as exc:
        raise SandboxError(f"cannot start the sandbox runner {path}: {exc.message}") from exc
    try:
        return pid, os.pidfd_open(pid)
    except OSError as exc:  # never: the child stays a zombie until reaped
        raise SandboxError(f"pidfd_open of the sandbox runner {pid}: {exc}") from exc


class _SpawnerGone(Exception):
    """The spawner did not answer (it was killed): start the runner without it."""


class Spawner:
    """A ``runtimed-runner spawner`` process, which forks runners on request.

    ``posix_spawn`` from the daemon blocks its thread until the new runner has been exec'd,
    and a mkdir in cgroupfs until the cgroup lock is free: half a millisecond and more when
    other runners hold the cgroup locks. The spawner does both (the run's cgroups, then a
    fork of its small self) while the daemon's trio thread serves others, with no thread
    of the daemon's waiting and no Python run for it. It clones each runner with
    CLONE_PARENT: it is the caller's child, as a posix_spawn'd one is (reaped by it, killed
    with the thread that started the spawner). A runner it forks is the same program in the
    same state as one started by :func:`spawn`, on the same fds. Should the spawner be gone,
    runners are started with :func:`spawn` instead.

    Start it from a thread that outlives every runner it forks (see :func:`spawn`);
    :meth:`close` it once they have been reaped.

    Raises:
        SandboxError: the spawner could not be started.
    """

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.pid, self._pidfd = _start(
                ["spawner"], [(null, 0), (null, 1), (null, 2), (theirs.fileno(), SHAPE_FD)]
            )
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(null)
            theirs.close()
        # Non-blocking: requests faster than the spawner serves them fill the socket's buffer
        # (some 280 of them here), and a blocking send would stall the trio thread then.
        ours.setblocking(False)
        self._socket = ours
        self._room = trio.Lock()
        self.gone = False  # it was found gone (killed): runners are posix_spawn'd instead

    async def spawn(self, fds: Sequence[int], make: Sequence[Path] = ()) -> tuple[int, int]:
        """:func:`spawn`, forked by the spawner once it created the cgroup directories
        ``make`` (named by ``RunCgroup.setup(defer=True)``); the trio thread serves others
        meanwhile. The answer is awaited even when cancelled: it names a child to reap.

        Raises:
            SandboxError: a cgroup could not be created (none is left then), or the runner
                could not be started.
        """
        if self.gone:
            return _spawn_after(fds, make)
        data = b"r" + b"".join(os.fsencode(path) + b"\0" for path in make)
        reply, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with theirs:
                await self._send(data, [*fds, theirs.fileno()])
            with trio.CancelScope(shield=True):  # sent: it forks, and its answer must be read
                await trio.lowlevel.wait_readable(reply)
            return _answer(reply, make)
        except _SpawnerGone as exc:
            # Said once: the runners of this pool are posix_spawn'd from now on.
            log.warning("the runner spawner is gone (%s): starting runners without it", exc)
            self.gone = True
            return _spawn_after(fds, make)
        finally:
            reply.close()

    async def _send(self, data: bytes, fds: Sequence[int]) -> None:
        while True:
            try:
                socket.send_fds(self._socket, [data], fds)
                return
            except BlockingIOError:  # its queue is full
                async with self._room:  # trio lets one task at a time wait on an fd
                    await trio.lowlevel.wait_writable(self._socket)
            except OSError as exc:
                raise _SpawnerGone(exc.strerror) from exc

    def close(self) -> None:
        """Stop the spawner and reap it."""
        self._socket.close()
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED)
        os.close(self._pidfd)


_ANSWER: Final = struct.Struct("=ii")  # the PID or -errno, and the cgroup that failed or -1


def _answer(reply: socket.socket, make: Sequence[Path]) -> tuple[int, int]:
    """The spawner's answer on ``reply``: the runner's PID and pidfd."""
    data, fds, _, _ = socket.recv_fds(reply, _ANSWER.size, 1, socket.MSG_CMSG_CLOEXEC)
    if len(data) != _ANSWER.size:  # it closed the answer socket unanswered: gone, or never got it
        for fd in fds:
            os.close(fd)
        raise _SpawnerGone("no answer")
    value, failed = _ANSWER.unpack(data)
    if value > 0 and len(fds) == 1:
        return value, fds[0]
    for fd in fds:
        os.close(fd)
    if value < 0 and 0 <= failed < len(make):
        raise cgroups.creation_error(make[failed], -value)
    if value < 0:
        raise SandboxError(f"cannot start the sandbox runner: {os.strerror(-value)}")
    raise SandboxError(f"the runner spawner answered {value} without a pidfd")


def _spawn_after(fds: Sequence[int], make: Sequence[Path]) -> tuple[int, int]:
    """Without the spawner: the cgroups, then :func:`spawn`."""
    cgroups.make(make)
    return spawn(fds)


def step_error(failure: StepFailed, plan: Plan) -> RuntimedError:
    """The error a failed set-up step stands for, naming the plan op it was applying."""
    if failure.syscall == "plan":
        return SandboxError("the sandbox runner refused its plan as malformed")
    names = _FLAG_NAMES.get(failure.syscall)
    if failure.flags is None:
        flags = None
    elif names is not None:
        flags = syscalls.format_flags(failure.flags, names)
    else:
        flags = str(failure.flags)
    error = syscalls.kernel_error(
        failure.errno, syscall=failure.syscall, path=failure.path, flags=flags
    )
    if failure.op is None or not 0 <= failure.op < len(plan.ops):
        return error
    op = plan.ops[failure.op]
    return KernelError(
        f"{op.describe()}: {error.message}",
        syscall=error.syscall,
        errno_name=error.errno_name,
        path=op.destination,
        flags=error.flags,
        hint=error.hint,
    )


def exec_error(failure: ExecFailed, plan: Plan) -> ExecFailedError:
    """The error of an ``execve`` that failed (not found in ``PATH``, not executable...)."""
    name = errno.errorcode.get(failure.errno, str(failure.errno))
    return ExecFailedError(
        f"exec {plan.argv[0]}: {name} ({os.strerror(failure.errno)})",
        details={"argv0": plan.argv[0], "errno": name, "path": dict(plan.env).get("PATH")},
    )
