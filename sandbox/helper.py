"""IO: the sandbox helper: a warm, single-threaded fork server that sets up each sandbox.

Started once as ``python -I -m sandbox.helper --serve FD`` (``sandbox.launch.open_forkserver``),
it reads requests from the SOCK_SEQPACKET socket FD: the plan JSON of one run with four fds
attached (stdin, stdout, stderr, status). For each it forks a child that sets up namespaces,
the overlay root and the mounts of the :class:`sandbox.plan.Plan`, then runs the command under
a PID 1 of its own; the reply is the child's PID with a pidfd attached. It imports only the
stdlib and ``sandbox`` (STYLE §6) and never starts a thread: ``unshare`` of some namespaces
fails with EINVAL in a threaded process, which is why the trio side never does this itself.
Forking a warm interpreter costs about a millisecond; exec'ing a fresh one costs tens.

Processes::

    launcher ─socket─► server ── fork ──► helper ── unshare, fork ──► PID 1 ── fork ──► command
                                          moves PID 1 into the        reaps zombies,    drops
                                          run's cgroups, forwards     forwards signals, privileges,
                                          TERM/INT/HUP, exits with    exits with the    chdir,
                                          PID 1's status; dies with   command's status  exec
                                          the server (PDEATHSIG)

Steps, in this fixed order (each its own function):

 1. ``validate_plan``: validate the request's plan.
 2. for hermetic emulation ``enter_user_namespace`` (a child in an identity-mapped user
    namespace carries on, the helper supervises it); ``unshare_namespaces``: mount, PID, UTS,
    IPC (+ net), the host name, ``lo`` up in a new network namespace, fork PID 1
    (``PR_SET_PDEATHSIG``); then ``join_cgroups``: the helper moves PID 1 into the run's
    cgroups while PID 1 goes on with steps 3 to 7. The first write to ``cgroup.procs`` waits
    for an RCU grace period (``percpu_down_write`` of the cgroup threadgroup lock: about
    10 ms here), which this overlaps with the mounts instead of adding it to every run.
    PID 1 ``await_cgroups`` before step 8 (then unshares the cgroup namespace, rooted in the
    run's cgroup), so the command and everything it forks are in the run's cgroups.
 3. ``make_root_slave``: ``/`` rslave, so nothing propagates back to the host.
 4. ``mount_workspace``: a private tmpfs on the run's ``mnt/`` for the new root and the files;
    ``register_emulators`` there for hermetic emulation.
 5. ``mount_newroot``: the overlay (snapshot layers, the run's upper and work dirs).
 6. ``apply_ops``: the plan's ops in order (``sandbox.mounts``), then the working directory.
 7. ``switch_root``: ``pivot_root(".", ".")`` and detach the old root.
 8. ``drop_privileges``: PID 1 sets rlimits, drops the bounding set to the plan's capabilities
    (Docker's 14) and clears ambient ones; the command switches groups, gid and uid and sets
    ``no_new_privs``.
 9. ``change_directory``: chdir to the working directory (as the command's user).
10. ``exec_command``: ``execvpe`` with the plan's environment (``PATH`` lookup in the sandbox).

Status messages, one JSON object per line on the status fd (after runc ``sync.go``):

=====================================================  ========================================
message                                                meaning
=====================================================  ========================================
``{"type": "error", "error": {code, message, ...}}``   a step failed (the helper exits 125) or
                                                       the exec failed (exit 126, or 127 for
                                                       ENOENT); nothing ran
``{"type": "started", "pid": N, "exe": P}``            the command was exec'd: its PID inside
                                                       the sandbox and ``/proc/N/exe`` read
                                                       while it was stopped after execve
``{"type": "exited", "code": N}``                      the command exited with status N
``{"type": "exited", "signal": N}``                    the command was killed by signal N
=====================================================  ========================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import struct
import sys
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

from runtimed.errors import ExecFailedError, Json, RuntimedError, SandboxError
from sandbox import idmap, mounts, syscalls
from sandbox.plan import Plan

log = logging.getLogger(__name__)

SETUP_FAILED: Final = 125
EXEC_FAILED: Final = 126
NOT_FOUND: Final = 127
FORWARDED_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_NAMESPACE_FLAGS: Final = {
    "mount": syscalls.CLONE_NEWNS,
    "pid": syscalls.CLONE_NEWPID,
    "uts": syscalls.CLONE_NEWUTS,
    "ipc": syscalls.CLONE_NEWIPC,
    "net": syscalls.CLONE_NEWNET,
    "cgroup": syscalls.CLONE_NEWCGROUP,
}
# A request: the plan JSON (a few KiB) with stdin, stdout, stderr and the status fd attached.
MAX_REQUEST: Final = 1 << 20
REQUEST_FDS: Final = 4
# struct ifreq (<net/if.h>): a 16-byte name, then the union (short ifr_flags), 40 bytes in all.
_IFREQ: Final = struct.Struct("16sH22x")


class Status:
    """The status fd: one JSON message per line, each a single atomic pipe write."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, message: dict[str, Json]) -> None:
        os.write(self.fd, json.dumps(message).encode() + b"\n")

    def error(self, exc: BaseException) -> None:
        if not isinstance(exc, RuntimedError):
            exc = SandboxError(f"sandbox helper failed: {exc!r}")
        self.send({"type": "error", "error": exc.to_json()})


# --- 1. validate ---------------------------------------------------------------------------------


def validate_plan(obj: Json) -> Plan:
    """Validate the plan of a request.

    Raises:
        SandboxError: not a plan, or an unknown capability.
    """
    plan = Plan.from_json(obj)
    unknown = set(plan.capabilities) - set(syscalls.CAPABILITIES)
    if unknown:
        raise SandboxError(f"sandbox plan names unknown capabilities {sorted(unknown)}")
    return plan


# --- 2. namespaces -------------------------------------------------------------------------------


def open_cgroups(plan: Plan) -> list[int]:
    """The run's ``cgroup.procs`` files, opened before the mount namespace is unshared: PID 1's
    ``pivot_root`` moves the root of every process of that namespace, the helper's too."""
    fds: list[int] = []
    try:
        for directory in plan.cgroups:
            fds.append(os.open(Path(directory, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def join_cgroups(procs: list[int], pid1: int, joined: int) -> None:
    """The helper's half: move PID 1 into the run's cgroups, then tell it on ``joined``.

    On failure the pipe closes without the byte and PID 1 stops before the command.
    """
    try:
        for fd in procs:
            os.write(fd, str(pid1).encode())
        os.write(joined, b"j")
    finally:
        os.close(joined)
        for fd in procs:
            os.close(fd)


def await_cgroups(plan: Plan, joined: int) -> None:
    """PID 1's half: wait until the helper moved it into the run's cgroups (else end: the
    helper reported why on the status fd); then the cgroup namespace, if asked for, is
    rooted there.
    """
    try:
        if os.read(joined, 1) != b"j":
            os._exit(SETUP_FAILED)
    finally:
        os.close(joined)
    if "cgroup" in plan.namespaces:
        syscalls.unshare(syscalls.CLONE_NEWCGROUP)


def enter_user_namespace() -> int:
    """Fork a child into a new, identity-mapped user namespace; its PID (0 in the child).

    The maps are written by the parent: a process inside the new namespace cannot map more
    than its own ID (user_namespaces(7)). The child then has every capability there, and the
    namespaces it creates next (mount, PID, ...) belong to it.
    """
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    mapped_r, mapped_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(mapped_w)
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        syscalls.unshare(syscalls.CLONE_NEWUSER)
        os.write(ready_w, b"u")
        if os.read(mapped_r, 1) != b"m":
            raise SandboxError("the helper did not write the user namespace's ID maps")
        os.close(ready_w)
        os.close(mapped_r)
        return 0
    os.close(ready_w)
    os.close(mapped_r)
    try:
        if os.read(ready_r, 1) == b"u":
            for name in ("uid_map", "gid_map"):
                own = Path(f"/proc/self/{name}").read_text()
                Path(f"/proc/{pid}/{name}").write_text(idmap.identity_map(own))
            os.write(mapped_w, b"m")
    finally:
        os.close(ready_r)
        os.close(mapped_w)
    return pid


def unshare_namespaces(plan: Plan, spare_net: int | None) -> int:
    """Unshare, configure UTS and network, fork PID 1; its PID (0 in PID 1).

    The cgroup namespace is PID 1's to unshare, once it is in the run's cgroups. With
    ``spare_net`` (a fresh network namespace with ``lo`` up, see :func:`new_network`) the
    sandbox enters that one instead of creating its own (only given when
    :func:`takes_spare_network`); it is closed either way.
    """
    try:
        flags = 0
        for name in plan.namespaces:
            if name not in ("user", "cgroup") and not (name == "net" and spare_net is not None):
                flags |= _NAMESPACE_FLAGS[name]
        syscalls.unshare(flags)
        if spare_net is not None:
            syscalls.setns(spare_net, syscalls.CLONE_NEWNET)
        elif plan.loopback:
            bring_up_loopback()
    finally:
        if spare_net is not None:
            os.close(spare_net)
    if "uts" in plan.namespaces:
        syscalls.sethostname(plan.hostname)
    pid = os.fork()
    if pid == 0:
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    return pid


def takes_spare_network(plan: Plan) -> bool:
    """Whether the run's network namespace can be one the server made: a new one with only
    ``lo`` up, owned by the server's user namespace (not by a hermetic run's own)."""
    return "net" in plan.namespaces and plan.loopback and "user" not in plan.namespaces


def new_network() -> int | None:
    """A fresh network namespace with ``lo`` up, made by the server between requests; an fd
    on it, or None when it cannot make one (the run then makes its own).

    Creating a network namespace costs about a millisecond (and ``lo`` up a little more),
    which this takes off the path of the next request. The server enters the new namespace
    only for the two calls and returns to its own; if it cannot return it stops, rather
    than hand a later ``--network host`` run the wrong namespace. Each one is given to
    exactly one run and closed by it: never reused.

    Raises:
        KernelError: the server could not return to its own network namespace.
    """
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            # Entering its own namespace is a no-op that needs what returning to it needs
            # (CAP_SYS_ADMIN over its owner: not so in a user namespace of our own whose
            # network is the host's), so a server that could not come back never leaves.
            syscalls.setns(own, syscalls.CLONE_NEWNET)
            syscalls.unshare(syscalls.CLONE_NEWNET)
        except RuntimedError:
            return None
        try:
            bring_up_loopback()
            return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, RuntimedError):
            return None
        finally:
            syscalls.setns(own, syscalls.CLONE_NEWNET)
    finally:
        os.close(own)


def bring_up_loopback() -> None:
    """Set ``lo`` up with SIOCSIFFLAGS, as ``ip link set lo up`` would (netdevice(7))."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        raw = syscalls.ioctl(sock.fileno(), syscalls.SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
        flags = _IFREQ.unpack(raw)[1]
        syscalls.ioctl(
            sock.fileno(), syscalls.SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | syscalls.IFF_UP)
        )


# --- 3. to 7. the new root -----------------------------------------------------------------------


def make_root_slave() -> None:
    syscalls.mount(None, "/", None, syscalls.MS_SLAVE | syscalls.MS_REC)


def mount_workspace(plan: Plan) -> Path:
    workspace = Path(plan.workspace)
    syscalls.mount("tmpfs", workspace, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=700")
    (workspace / "root").mkdir()
    return workspace


def register_emulators(plan: Plan, workspace: Path) -> int | None:
    """Hermetic emulation: register the plan's handlers in this user namespace's own
    binfmt_misc instance (Linux >= 6.7), before the host's interpreters go out of reach: with
    the F flag the kernel opens the interpreter now.

    Returns an fd on the instance that PID 1 keeps open: the instance and its handlers go
    away when its last mount does, and the mount goes with the old root.
    """
    if not plan.binfmt:
        return None
    instance = workspace / "binfmt_misc"
    instance.mkdir()
    syscalls.mount("binfmt_misc", instance, "binfmt_misc", syscalls.MS_NOSUID | syscalls.MS_NODEV)
    for line in plan.binfmt:
        fd = os.open(instance / "register", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode("latin-1"))
        except OSError as exc:
            raise syscalls.oserror(exc, syscall="write", flags=line) from exc
        finally:
            os.close(fd)
    return os.open(instance, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def mount_newroot(plan: Plan, workspace: Path) -> Path:
    newroot = workspace / "root"
    mounts.mount_overlay(plan.root, newroot)
    return newroot


def apply_ops(plan: Plan, newroot: Path, workspace: Path) -> None:
    root_fd = os.open(newroot, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for op in plan.ops:
            mounts.apply(op, root_fd, workspace)
        os.close(mounts.open_directory(root_fd, plan.cwd))
    finally:
        os.close(root_fd)


def switch_root(newroot: Path) -> None:
    os.chdir(newroot)
    syscalls.pivot_root(".", ".")
    # The old root is now stacked on "/"; detach it so nothing of the host stays reachable.
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")


# --- 8. to 10. privileges and exec ---------------------------------------------------------------


def capability_mask(plan: Plan) -> int:
    keep = 0
    for name in plan.capabilities:
        keep |= 1 << syscalls.CAPABILITIES[name]
    return keep


def drop_capabilities(plan: Plan) -> None:
    """PID 1's half of step 8: rlimits, then the bounding, ambient and effective sets.

    PID 1 keeps CAP_SYS_PTRACE (outside the bounding set, so no exec can regain it) until the
    command's exec was observed: reading ``/proc/PID/exe`` of a command running as another
    user needs it. The command drops it itself (:func:`drop_privileges`).
    """
    for limit in plan.rlimits:
        resource.setrlimit(
            getattr(resource, f"RLIMIT_{limit.name.upper()}"), (limit.soft, limit.hard)
        )
    keep = capability_mask(plan)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if not keep & (1 << cap):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    observe = keep | 1 << syscalls.CAPABILITIES["CAP_SYS_PTRACE"]
    syscalls.capset(observe, observe, 0)


def drop_privileges(plan: Plan) -> None:
    """The command's half of step 8: groups, gid, uid, then no_new_privs."""
    try:
        os.setgroups(list(plan.groups))
    except PermissionError as exc:
        # A user namespace with setgroups "deny" (user_namespaces(7)) keeps the groups it was
        # created with; acceptable only when none were asked for.
        if plan.groups or Path("/proc/self/setgroups").read_text().strip() != "deny":
            raise syscalls.oserror(exc, syscall="setgroups", flags=str(plan.groups)) from exc
    try:
        os.setresgid(plan.gid, plan.gid, plan.gid)
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="setresgid", flags=str(plan.gid)) from exc
    try:
        os.setresuid(plan.uid, plan.uid, plan.uid)
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="setresuid", flags=str(plan.uid)) from exc
    if plan.uid == 0:
        # A non-root uid lost every capability with setresuid (capabilities(7)); root keeps
        # the plan's set, without PID 1's CAP_SYS_PTRACE.
        keep = capability_mask(plan)
        syscalls.capset(keep, keep, 0)
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def change_directory(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise syscalls.oserror(exc, syscall="chdir") from exc


def exec_command(plan: Plan) -> NoReturn:
    """Raises: ExecFailedError (not found in PATH, not executable)."""
    env = dict(plan.env)
    try:
        os.execvpe(plan.argv[0], list(plan.argv), env)
    except OSError as exc:
        err = syscalls.oserror(exc, syscall="execve")
        raise ExecFailedError(
            f"exec {plan.argv[0]}: {err.errno_name} ({os.strerror(exc.errno or 0)})",
            details={"argv0": plan.argv[0], "errno": err.errno_name, "path": env.get("PATH")},
        ) from exc


def run_command(plan: Plan, error_fd: int) -> NoReturn:
    """The forked command: steps 8 to 10; on failure one error record on ``error_fd``.

    It asks to be traced first, so that it stops right after a successful execve and PID 1
    can read ``/proc/PID/exe`` of the new image before it runs, however short-lived it is.
    """
    code = SETUP_FAILED
    try:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        drop_privileges(plan)
        change_directory(plan.cwd)
        syscalls.ptrace(syscalls.PTRACE_TRACEME)
        exec_command(plan)
    except ExecFailedError as exc:
        code = NOT_FOUND if exc.details.get("errno") == "ENOENT" else EXEC_FAILED
        os.write(error_fd, json.dumps(exc.to_json()).encode())
    except BaseException as exc:
        error = exc if isinstance(exc, RuntimedError) else SandboxError(repr(exc))
        os.write(error_fd, json.dumps(error.to_json()).encode())
    os._exit(code)


def start_command(plan: Plan, status: Status) -> tuple[int, int | None]:
    """Fork the command, report whether its exec succeeded and what runs; PID and, if it
    already ended before the exec (a failure), its wait status."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        run_command(plan, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        failure = pipe.read()  # EOF without data: execve closed the pipe
    if failure:
        status.send({"type": "error", "error": json.loads(failure)})
        return pid, None
    exe: str | None = None
    while True:
        _, wait_status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(wait_status):
            return pid, wait_status  # killed before it could stop
        stop = os.WSTOPSIG(wait_status)
        if stop == signal.SIGTRAP:
            # ptrace(2): a traced process stops with SIGTRAP after a successful execve.
            exe = os.readlink(f"/proc/{pid}/exe")
            syscalls.ptrace(syscalls.PTRACE_DETACH, pid)
            break
        syscalls.ptrace(syscalls.PTRACE_CONT, pid, stop)
    status.send({"type": "started", "pid": pid, "exe": exe})
    return pid, None


class Forwarder:
    """PID 1's handler for TERM/INT/HUP, installed before set-up starts: a signal that comes
    before the command exists is kept and delivered once it does (PID 1 of a PID namespace
    otherwise drops signals it has no handler for, pid_namespaces(7))."""

    def __init__(self) -> None:
        self.target: int | None = None
        self.pending: list[int] = []
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.target is None:
            self.pending.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.target, signum)

    def attach(self, pid: int) -> None:
        self.target = pid
        for signum in self.pending:
            self.handle(signum, None)
        self.pending.clear()


def serve_init(command: int, early: int | None, status: Status) -> int:
    """PID 1: reap every zombie until the command ends; its exit status."""
    wait_status = early
    while wait_status is None:
        try:
            pid, reaped = os.wait()
        except ChildProcessError:
            return SETUP_FAILED
        if pid == command:
            wait_status = reaped
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        status.send({"type": "exited", "signal": signum})
        return 128 + signum
    code = os.WEXITSTATUS(wait_status)
    status.send({"type": "exited", "code": code})
    return code


def forward_signals(pid1: int) -> None:
    """The outer helper forwards TERM/INT/HUP to PID 1 (from before it joins the cgroups)."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid1, signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def supervise(pid1: int) -> int:
    """The outer helper, once signals are forwarded: exit with PID 1's status."""
    _, wait_status = os.waitpid(pid1, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def init(plan: Plan, status: Status, joined: int) -> NoReturn:
    """PID 1 of the sandbox: steps 3 to 8, then the command, then reap until it ends."""
    forwarder = Forwarder()
    try:
        make_root_slave()
        workspace = mount_workspace(plan)
        emulators = register_emulators(plan, workspace)  # noqa: F841 - held open until exit
        newroot = mount_newroot(plan, workspace)
        apply_ops(plan, newroot, workspace)
        switch_root(newroot)
        await_cgroups(plan, joined)
        drop_capabilities(plan)
        command, early = start_command(plan, status)
        forwarder.attach(command)
        keep = capability_mask(plan)
        syscalls.capset(keep, keep, 0)
    except BaseException as exc:
        status.error(exc)
        os._exit(SETUP_FAILED)
    os._exit(serve_init(command, early, status))


def run(plan_json: Json, status: Status, spare_net: int | None = None) -> int:
    """One sandbox, from the forked child of the server: steps 1 and 2, then supervise."""
    try:
        plan = validate_plan(plan_json)
        if spare_net is not None and not takes_spare_network(plan):
            os.close(spare_net)
            spare_net = None
        if log.isEnabledFor(logging.DEBUG):  # not built on every run for nothing
            for line in plan.describe():
                log.debug("%s", line)
        if "user" in plan.namespaces:
            child = enter_user_namespace()
            if child != 0:
                forward_signals(child)
                return supervise(child)
        procs = open_cgroups(plan)
        joined_r, joined_w = os.pipe2(os.O_CLOEXEC)
        pid1 = unshare_namespaces(plan, spare_net)
    except BaseException as exc:
        status.error(exc)
        return SETUP_FAILED
    if pid1 == 0:
        os.close(joined_w)
        for fd in procs:
            os.close(fd)
        init(plan, status, joined_r)
    os.close(joined_r)
    forward_signals(pid1)
    try:
        join_cgroups(procs, pid1, joined_w)
    except (ProcessLookupError, BrokenPipeError):
        pass  # PID 1 ended already (a failed step): its own status message says why
    except BaseException as exc:
        status.error(exc)  # PID 1 stops at the closed pipe
    return supervise(pid1)


def _serve_one(
    sock: socket.socket, server: int, data: bytes, fds: list[int], spare_net: int | None
) -> int:
    """The forked child: take the request's fds as stdio and status, then :func:`run`."""
    sock.close()
    stdin, stdout, stderr, status_fd = fds
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.set_inheritable(status_fd, False)
    status = Status(status_fd)
    # The run dies with the server (and the server with the launcher's socket): nothing is
    # left running when the launcher goes away.
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:
        return SETUP_FAILED
    try:
        request = json.loads(data)
        if not isinstance(request, dict):
            raise SandboxError("sandbox request is not a JSON object")
        if request.get("debug") is True:
            logging.basicConfig(level=logging.DEBUG, format="sandbox.helper: %(message)s")
    except ValueError as exc:
        status.error(SandboxError(f"sandbox request is not JSON: {exc}"))
        return SETUP_FAILED
    except SandboxError as exc:
        status.error(exc)
        return SETUP_FAILED
    return run(request.get("plan"), status, spare_net)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def serve(sock: socket.socket) -> None:
    """The fork server: per request (plan JSON + stdin, stdout, stderr and status fds), fork a
    child that runs the sandbox and answer with its pidfd; return at EOF.

    Forking a warm, single-threaded interpreter costs about a millisecond, where exec'ing a
    fresh one costs tens (STYLE §6). Finished children are reaped as soon as SIGCHLD says so
    (no zombie outlives its run); the launcher learns their end from the status fd and the
    pidfd, not from a wait status. SIGCHLD stays blocked from fork to pidfd_open, so a child
    that ends at once is still there to be opened. Between requests it makes the next run's
    network namespace (:func:`new_network`).
    """
    server = os.getpid()
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: _reap())
    spare_net: int | None = None
    while True:
        if spare_net is None:
            spare_net = new_network()  # between requests, for the next one
        data, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST, REQUEST_FDS + 1)
        if not data:
            return
        if len(fds) != REQUEST_FDS:
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"error": f"expected {REQUEST_FDS} fds"}).encode())
            continue
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            code = SETUP_FAILED
            try:
                # The sandbox's processes wait for their own children: no reaping handler.
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                code = _serve_one(sock, server, data, fds, spare_net)
            finally:
                os._exit(code)
        if spare_net is not None:
            os.close(spare_net)  # the child's now, and only the child's
            spare_net = None
        try:
            pidfd = os.pidfd_open(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        for fd in fds:
            os.close(fd)
        try:
            socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
        finally:
            os.close(pidfd)


def main(argv: list[str]) -> int:
    if argv[:1] != ["--serve"] or len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -I -m sandbox.helper --serve FD", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[1])) as sock:
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
