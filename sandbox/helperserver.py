"""IO: a fork server for layer helpers. One ``python -I -m sandbox.helperserver`` process per
daemon (or any process that imports layers), started at the first import and kept, forks a
``sandbox.layerhelper`` for each layer: the helper starts with its modules imported.

Why: starting a helper with ``python -I -m sandbox.layerhelper`` costs ~100 ms of CPU per
layer (interpreter, imports), more on a busy host, and that start-up sits in front of every
unpack. A fork of a process that has done it once costs a few milliseconds. The server is
exec'd, not forked from the caller (a trio daemon has threads), and is single-threaded, so
its children are what an exec'd helper would be: they may ``unshare`` and ``mount``.

Protocol, over a private ``SOCK_SEQPACKET`` socketpair (the server's end is its stdin; the
caller's end is close-on-exec, so no other child of the caller holds it):

- request: the message ``spawn`` carrying four descriptors (``SCM_RIGHTS``): the helper's
  stdin, stdout and stderr, and the layer source;
- the server forks. The child puts them on descriptors 0, 1, 2 and :data:`SOURCE_FD` and runs
  :func:`sandbox.layerhelper.run_process`. The server closes its copies, opens a pidfd of the
  child and replies with the child's pid (``struct "i"``) carrying that pidfd; a failed fork
  replies with ``-errno`` and no descriptor;
- the server reaps its children when SIGCHLD comes, after it has replied: a child that dies at
  once stays a zombie, holding its pid, until its pidfd exists, so a pidfd never names another
  process (pid_max may be as low as 32768). Callers follow a helper through its pidfd only:
  poll it for the exit, signal through it;
- the server exits at the end of its socket: when the caller closes it, or dies. A helper sets
  PR_SET_PDEATHSIG once it has its plan, so it dies with the server.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Final, NoReturn

from runtimed.errors import InternalError, SnapshotError
from sandbox import syscalls

MODULE: Final = "sandbox.helperserver"
REQUEST: Final = b"spawn"
SOURCE_FD: Final = 3
_FDS: Final = 4  # stdin, stdout, stderr, source
_REPLY: Final = struct.Struct("i")
_HIGH_FD: Final = 10


# --- the server process -------------------------------------------------------------------


def _reap(_signum: int = 0, _frame: object = None) -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _child(sock: socket.socket, fds: list[int]) -> NoReturn:
    """In the forked child: the four descriptors in place, then the helper."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        # Moved out of the way first: a received descriptor may have any number, 0-3 included.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD) for fd in fds]
        for target, fd in zip((0, 1, 2, SOURCE_FD), high, strict=True):
            os.dup2(fd, target)  # the copy is not close-on-exec, as an inherited one is not
        for fd in {*fds, *high} - {0, 1, 2, SOURCE_FD}:
            os.close(fd)
        from sandbox import layerhelper  # imported already: the server loaded it

        layerhelper.run_process()
    finally:
        os._exit(70)  # EX_SOFTWARE: only if the helper itself could not run


def serve(sock: socket.socket) -> None:
    """Fork a helper for each request until the socket ends (see the module docstring)."""
    signal.signal(signal.SIGCHLD, _reap)
    try:
        _serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        return  # the caller went away while it was being answered: as at the end of the socket


def _serve(sock: socket.socket) -> None:
    while True:
        message, fds, _, _ = socket.recv_fds(sock, len(REQUEST), _FDS)
        if not message:
            return
        if message != REQUEST or len(fds) != _FDS:
            for fd in fds:
                os.close(fd)
            sock.send(_REPLY.pack(-errno.EINVAL))
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            try:
                pid = os.fork()
            except OSError as exc:
                pid = -(exc.errno or 1)
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                _child(sock, fds)
            for fd in fds:
                os.close(fd)
            if pid < 0:
                sock.send(_REPLY.pack(pid))
                continue
            pidfd = os.pidfd_open(pid)  # a zombie still has one: SIGCHLD is held back
            try:
                socket.send_fds(sock, [_REPLY.pack(pid)], [pidfd])
            finally:
                os.close(pidfd)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def main() -> None:
    # stdin is the socket; a forked helper gets its own stdin on descriptor 0.
    sock = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    from sandbox import layerhelper  # noqa: F401  # loaded once, here, for every child

    serve(sock)


# --- the caller's side --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Helper:
    """A forked helper: its pid (for messages) and a pidfd (to wait for it and signal it),
    which the caller owns."""

    pid: int
    pidfd: int


class _Server:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        try:
            # A session of its own: a Ctrl-C meant for a CLI run does not reach the server
            # (and print its traceback); the server ends with its socket instead.
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-m", MODULE],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.lock = threading.Lock()

    def spawn(self, fds: list[int]) -> Helper | None:
        """The helper forked for ``fds``, or None if this server is gone."""
        with self.lock:
            try:
                socket.send_fds(self.sock, [REQUEST], fds)
                reply, pidfds, _, _ = socket.recv_fds(self.sock, _REPLY.size, 1)
            except (BrokenPipeError, ConnectionResetError):
                return None
        if len(reply) != _REPLY.size:
            return None
        (pid,) = _REPLY.unpack(reply)
        if pid < 0:
            raise syscalls.kernel_error(-pid, syscall="fork layer helper")
        if len(pidfds) != 1:
            raise InternalError(f"layer helper server: no pidfd for helper {pid}")
        return Helper(pid, pidfds[0])

    def close(self) -> None:
        self.sock.close()
        self.process.wait()


_lock = threading.Lock()
_server: _Server | None = None


def _forget_in_child() -> None:
    """A process forked from a caller starts a server of its own when it needs one: the two
    must not talk over one socket. Its copy of the socket goes, so that the caller's server
    still ends with the caller."""
    global _lock, _server
    _lock = threading.Lock()  # another thread may have held it at the fork
    if _server is not None:
        _server.sock.close()
        _server = None


os.register_at_fork(after_in_child=_forget_in_child)


def spawn(stdin: int, stdout: int, stderr: int, source: int) -> Helper:
    """A layer helper with these descriptors (see the module docstring), from the server,
    which is started (again) when there is none or it has gone.

    Raises:
        KernelError: the server could not fork.
        SnapshotError: the server died as soon as it was started.
    """
    global _server
    fds = [stdin, stdout, stderr, source]
    for _ in range(2):  # a server found dead (its socket ended) is replaced once
        with _lock:
            if _server is None:
                _server = _Server()
            server = _server
        helper = server.spawn(fds)
        if helper is not None:
            return helper
        with _lock:
            if _server is server:
                _server = None
        server.close()
    raise SnapshotError("layer helper server: gone right after it was started")


def server_pid() -> int | None:
    """The running server's pid, if any (for tests and diagnostics)."""
    with _lock:
        return None if _server is None else _server.process.pid


if __name__ == "__main__":
    main()
