"""IO: the exec'd, single-threaded helper that does binfmt's namespace and mount work.

Run as ``sys.executable -I -m binfmt.helper COMMAND ...`` (never imported by the daemon: it
calls ``unshare(2)``, which fails with EINVAL in a multi-threaded process, and ``mount(2)``,
which STYLE.md §6 keeps out of the daemon). Standard library only. Every reply is ONE JSON object
on stdout; the exit status is 0 with a result and 1 with ``{"error": {...}}``.

Commands and their replies:

=====================================  =========================================================
``mount DIR``                          ``{"mounted": DIR}`` after ``mount -t binfmt_misc`` there
``probe native`` (probes on stdin)     ``{"private_binfmt_misc": true, "results": [...]}``; or
                                       ``{"private_binfmt_misc": false, "reason": "..."}``
``probe emulated`` (probes on stdin)   ``{"results": [...]}``
any failed system call                 ``{"error": {"syscall", "errno", "path", "message"}}``
=====================================  =========================================================

The probes come as ``{"probes": [{"name": "linux/arm64", "image": "<base64 ELF>"}]}`` on stdin;
each result is ``{"name", "ran", "native", "exe", "exe_id", "error"}``: whether the image ran,
whether the kernel ran it itself, ``/proc/PID/exe`` while it ran (the interpreter when emulated)
with its ``[st_dev, st_ino]``, and why it did not run.

Probe set-up, in order (each step one function below):

1. ``unshare``: *native* gets a new user and mount namespace (root mapped to the caller); so
   does *emulated* unless the caller is already root, which only needs a mount namespace. A
   user namespace that mounts no binfmt_misc of its own uses its parent's instance, so the
   emulated probe sees exactly the caller's handlers.
2. make ``/`` private (nothing mounted here propagates back), mount a tmpfs over the temporary
   directory (exec allowed, gone with the namespace, nothing left behind on the host).
3. *native* only: mount a fresh binfmt_misc instance; it belongs to the new user namespace and
   is empty, so no handler can answer (kernel >= 6.7; older kernels refuse with EPERM, reported
   as ``private_binfmt_misc: false``).
4. write the probes into a root directory holding nothing else and start each there
   (``fork``, ``chroot``, ``execv``; SIGKILL as parent-death signal): with no interpreter in
   the root, emulation works only through one the kernel pinned at registration (the F flag).
5. let them settle for :data:`SETTLE_SECONDS`, read ``/proc/PID/exe`` of each survivor, then
   SIGKILL and reap all of them.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import select
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Final

# --- <linux/sched.h> ---------------------------------------------------------------------------
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUSER: Final = 0x10000000
# --- <linux/mount.h> ---------------------------------------------------------------------------
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
# --- <linux/prctl.h> ---------------------------------------------------------------------------
PR_SET_PDEATHSIG: Final = 1

# How long probes get to crash before a survivor counts as running. QEMU starts a static guest
# in a few milliseconds; a broken interpreter or probe dies well within this.
SETTLE_SECONDS: Final = 0.2
# Bound the untrusted-ish input: a probe image is a few hundred bytes.
MAX_PROBES: Final = 64
MAX_IMAGE_BYTES: Final = 64 * 1024

_libc: Final = ctypes.CDLL(None, use_errno=True)


def _errno_name(err: int) -> str:
    """``EPERM`` for 1; the number itself for one the errno module does not name."""
    return errno.errorcode.get(err, str(err))


class SyscallError(Exception):
    """A failed system call, reported as the helper's one JSON error record."""

    def __init__(self, syscall: str, err: int, path: str) -> None:
        self.syscall, self.errno, self.path = syscall, err, path
        super().__init__(f"{syscall} {path}: {_errno_name(err)} ({os.strerror(err)})")

    def record(self) -> dict[str, str]:
        return {
            "syscall": self.syscall,
            "errno": _errno_name(self.errno),
            "path": self.path,
            "message": str(self),
        }


def _check(result: int, syscall: str, path: str) -> None:
    if result != 0:
        raise SyscallError(syscall, ctypes.get_errno(), path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare", "")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    encoded = (source.encode(), target.encode(), fstype and fstype.encode(), data and data.encode())
    result = _libc.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3])
    _check(result, "mount", target)


def _write_file(path: str, text: str) -> None:
    try:
        with open(path, "w") as file:
            file.write(text)
    except OSError as exc:
        raise SyscallError("write", exc.errno or errno.EIO, path) from exc


@dataclass(frozen=True, slots=True)
class Probe:
    name: str
    image: bytes


@dataclass(slots=True)
class Started:
    """A probe after its exec: ``pid`` is None once it is reaped (or never ran)."""

    probe: Probe
    path: str
    pid: int | None
    error: str | None

    def reap(self, pid: int, *, kill: bool) -> int:
        """Wait for the probe ``pid`` (after SIGKILL if ``kill``); return its wait status."""
        self.pid = None
        if kill:
            os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]


def read_probes(text: str) -> list[Probe]:
    """The probes of the request on stdin; a malformed request raises ValueError."""
    request = json.loads(text)
    items = request.get("probes") if isinstance(request, dict) else None
    if not isinstance(items, list) or len(items) > MAX_PROBES:
        raise ValueError(f"'probes' must be a list of at most {MAX_PROBES}")
    probes = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("each probe must be an object")
        name, image = item.get("name"), item.get("image")
        if not isinstance(name, str) or not isinstance(image, str):
            raise ValueError("each probe needs a string 'name' and 'image'")
        data = base64.b64decode(image, validate=True)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"probe {name!r} is larger than {MAX_IMAGE_BYTES} bytes")
        probes.append(Probe(name, data))
    return probes


def enter_namespaces(*, user: bool) -> None:
    """Step 1: a new mount namespace, and a user namespace mapping root to us if ``user``."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWNS | (CLONE_NEWUSER if user else 0))
    if user:
        # user_namespaces(7): setgroups must be denied before an unprivileged gid_map write.
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")


def private_workspace() -> str:
    """Step 2: make every mount private and put a fresh tmpfs over the temporary directory."""
    mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    work = tempfile.gettempdir()
    mount("runtimed-probe", work, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    return work


def mount_private_binfmt_misc(work: str) -> str | None:
    """Step 3: an empty binfmt_misc instance of our own; None if mounted, else why not."""
    target = os.path.join(work, "binfmt_misc")
    os.mkdir(target)
    try:
        mount("binfmt_misc", target, "binfmt_misc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    except SyscallError as exc:
        return f"{exc} (per-user-namespace binfmt_misc needs kernel >= 6.7)"
    entries = sorted(set(os.listdir(target)) - {"register", "status"})
    if entries:
        return f"the new binfmt_misc instance is not empty: {entries}"
    return None


def start_probe(root: str, probe: Probe, index: int) -> Started:
    """Step 4: write ``probe`` as the only file of ``root`` and exec it chrooted there."""
    name = f"probe{index}"
    path = os.path.join(root, name)
    with open(path, "wb") as file:
        file.write(probe.image)
    os.chmod(path, 0o755)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            # A probe never ends by itself: it must die with us, even if we crash (the
            # death signal survives execve for a non-setuid program, see prctl(2)).
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl", "")
            if os.getppid() != parent:
                os._exit(127)
            os.chroot(root)
            os.chdir("/")
            os.execv("/" + name, [name])
        except (OSError, SyscallError) as exc:
            os.write(write_end, str(exc.errno or errno.EIO).encode())
        finally:
            os._exit(127)
    os.close(write_end)
    # The close-on-exec pipe reads EOF once exec succeeded, or the child's errno if it failed.
    with os.fdopen(read_end, "rb") as pipe:
        failure = pipe.read()
    if failure:
        os.waitpid(pid, 0)
        err = int(failure)
        return Started(probe, path, None, f"exec: {_errno_name(err)}")
    return Started(probe, path, pid, None)


def settle(started: list[Started]) -> None:
    """Step 5a: wait :data:`SETTLE_SECONDS`; a probe that dies meanwhile is reaped and its
    ``error`` says how."""
    fds = {os.pidfd_open(s.pid): (s, s.pid) for s in started if s.pid is not None}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    waiting = len(fds)
    deadline = time.monotonic() + SETTLE_SECONDS
    try:
        while waiting and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                waiting -= 1
                probe, pid = fds[fd]
                probe.error = _describe_status(probe.reap(pid, kill=False))
    finally:
        for fd in fds:
            os.close(fd)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"died of {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def collect(started: list[Started]) -> list[dict[str, object]]:
    """Step 5b: name what runs each survivor, then kill and reap it."""
    results: list[dict[str, object]] = []
    for s in started:
        exe: str | None = None
        exe_id: list[int] | None = None
        if s.pid is not None:
            link = f"/proc/{s.pid}/exe"
            try:
                exe = os.readlink(link)
                # stat follows the magic link to the very file running, even a deleted one.
                info = os.stat(link)
                exe_id = [info.st_dev, info.st_ino]
            except OSError as exc:
                exe = None
                s.error = f"readlink {link}: {_errno_name(exc.errno or 0)}"
            s.reap(s.pid, kill=True)
        results.append(
            {
                "name": s.probe.name,
                "ran": exe is not None,
                "native": exe == s.path,
                "exe": exe,
                "exe_id": exe_id,
                "error": s.error,
            }
        )
    return results


def run_probes(mode: str, probes: list[Probe]) -> dict[str, object]:
    """Steps 1-5 for ``mode`` ``native`` or ``emulated``."""
    native = mode == "native"
    enter_namespaces(user=native or os.geteuid() != 0)
    work = private_workspace()
    reply: dict[str, object] = {}
    if native:
        reason = mount_private_binfmt_misc(work)
        reply["private_binfmt_misc"] = reason is None
        if reason is not None:
            reply["reason"] = reason
            return reply
    root = os.path.join(work, "root")
    os.mkdir(root)
    started: list[Started] = []
    try:
        for index, probe in enumerate(probes):
            started.append(start_probe(root, probe, index))
        settle(started)
        reply["results"] = collect(started)
    finally:
        # Only after a failure are some left: never leave an endless loop running.
        for s in started:
            if s.pid is not None:
                s.reap(s.pid, kill=True)
    return reply


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 2 and argv[0] == "mount":
            mount("binfmt_misc", argv[1], "binfmt_misc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            reply: dict[str, object] = {"mounted": argv[1]}
        elif len(argv) == 2 and argv[0] == "probe" and argv[1] in ("native", "emulated"):
            reply = run_probes(argv[1], read_probes(sys.stdin.read()))
        else:
            print(f"usage: {sys.argv[0]} mount DIR | probe native|emulated", file=sys.stderr)
            return 2
    except SyscallError as exc:
        print(json.dumps({"error": exc.record()}))
        return 1
    except ValueError as exc:
        print(json.dumps({"error": {"syscall": "read", "errno": "EINVAL", "message": str(exc)}}))
        return 1
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
