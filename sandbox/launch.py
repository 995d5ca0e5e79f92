"""IO (trio): run one exec request in the sandbox and say truthfully how it ran.

:func:`open_run` runs one request, in two halves, and cleans up after it:

- :func:`prepare_run` (blocking, in a thread): snapshot → requested platform → mode decision
  (:mod:`sandbox.mode`, refusals before anything is created) → user and environment from the
  image and the rootfs → run directory (commit runs only) → plan. A :class:`Runners` pool
  remembers the result for requests that come again.
- :class:`Execution`: the run's cgroups (a spare's, or new ones), then the sandbox, set up by
  the native runner (:mod:`sandbox.runner`; a spare of the pool has built it already); a stop
  sends SIGTERM through the runner's pidfd, waits :data:`STOP_GRACE`, then kills the whole
  tree through the cgroup. It streams stdout and stderr as :class:`OutputChunk` values in the
  order they are read, enforces the timeout, and :meth:`Execution.wait` returns the
  :class:`RunResult`. :func:`open_execution` runs a :class:`PreparedRun` the caller made.

The execution report is checked on the running processes, not inferred: every
:data:`SAMPLE_INTERVAL` at first, then less often (up to :data:`SAMPLE_INTERVAL_MAX`), the
run's ``cgroup.procs`` is read and each process's ``/proc/PID/exe``
classified (an emulator's interpreter path means emulated by it, anything else native) with
its CPU time; the command itself stops once after its execve so that PID 1 reads its
``/proc/PID/exe`` (``confirmed`` in the report), however short-lived it is. Processes
too short-lived to be sampled show up only in ``unobserved_cpu_seconds`` (cgroup total minus
what was attributed, PID 1 included from the point it joins the cgroups, before the command).

Nothing outlives a run: the mounts live in the runner's private mount namespace and go with
it, PID 1 dies with the runner (PDEATHSIG) and takes the PID namespace down, and the cgroups
go too: the runner reads the run's accounting files once PID 1 is reaped, reports them with
``finished`` and removes the cgroups, off the daemon's thread; when it could not (it was
SIGKILLed, or a cgroup stayed busy), the launcher kills what is left and removes them after
the run (in the pool's background when there is one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import logging
import math
import os
import select
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, Protocol

import psutil
import trio

from binfmt.detect import find_interpreter
from binfmt.entry import format_flags, format_register_line
from binfmt.install import desired_entry, desired_flags, version_tuple
from binfmt.platform import Platform, is_linux, parse_platform
from binfmt.qemu import target_for_platform
from binfmt.report import Emulator, PlatformReport
from runtimed.errors import Json, RuntimedError, SandboxError, sole_exception
from sandbox import cgroups, runner
from sandbox.mode import ExecMode, Mode, check_platform, decide
from sandbox.plan import Plan, build_plan
from sandbox.rootfs import LayeredRoot
from sandbox.spec import ExecSpec, command, merge_env, resolve_user
from sandbox.wire import (
    EncodedPlan,
    ExecFailed,
    Exited,
    Finished,
    Started,
    StepFailed,
    join_cgroups,
    parse_status,
)

log = logging.getLogger(__name__)

STOP_GRACE: Final = 2.0
CLEANUP_TIMEOUT: Final = 10.0
WORKER_THREADS: Final = 2
SAMPLE_INTERVAL: Final = 0.02
SAMPLE_INTERVAL_MAX: Final = 0.32
OUTPUT_BUFFER: Final = 64
READ_SIZE: Final = 65536
HOST_RESOLV_CONF: Final = Path("/etc/resolv.conf")
HERMETIC_KERNEL: Final = (6, 7)
PREPARED_KEPT: Final = 16
SPARES_KEPT: Final = 4
"""At most this many sandbox shapes keep spares (those built most recently): a multi-platform
build alternates between the roots of its platforms."""
SPARES_PER_SHAPE: Final = 2
"""Spares kept ready per shape. With one, a run that follows another at once waits for the
spare built meanwhile whenever that build is slower than the run: after an idle spell (its
first cgroup move waits for an RCU grace period) and whenever the VM loses a CPU to its
neighbours (a grace period then waits for the descheduled CPU). With two, such a run takes
the other one, and the wait, if any, falls on a later run and is shorter by the time the
runs between took. Measured on this 2-core VM, alternating with a pool of one:

- three native Execs back to back after 0.5 s idle: 6.1-6.7, 20.3-22.0 and 6.7-7.1 ms with
  one spare; 5.5-7.3, 6.7-7.5 and 14.9-17.0 ms with two;
- blocks of ten back-to-back native Execs after 0.3 s idle: 0.89-0.97x as long with two in
  five of six runs that lost 4-75% of the CPU to steal (1.04x in the sixth), 0.98-1.03x in
  quiet ones."""
EAGER_GAP: Final = 0.005


class ImageConfigView(Protocol):
    @property
    def env(self) -> Sequence[str]: ...
    @property
    def entrypoint(self) -> Sequence[str]: ...
    @property
    def cmd(self) -> Sequence[str]: ...
    @property
    def working_dir(self) -> str: ...
    @property
    def user(self) -> str: ...


class SnapshotView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def platform(self) -> Platform: ...
    @property
    def config(self) -> ImageConfigView: ...


class SnapshotSource(Protocol):
    """What a run needs from the snapshot store (``sandbox.store.Store``).

    ``runs_dir``: a directory on which every run that keeps no changes mounts its private
    tmpfs, each in its own mount namespace (so one serves them all).
    """

    runs_dir: Path

    def get(self, ref: str) -> SnapshotView: ...
    def resolve(self, ref: str) -> str: ...
    def layer_paths(self, snapshot_id: str) -> list[Path]: ...
    def new_run_dir(self) -> Path: ...
    def remove_run_dir(self, path: Path) -> None: ...
    def commit_upper(self, parent_id: str, upper: Path) -> SnapshotView: ...


class Stream(enum.StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputChunk:
    stream: Stream
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PreparedRun:
    """A decided, planned run; a run that keeps its changes has a run directory on disk (the
    upper directory a commit takes) until the clean-up after it."""

    spec: ExecSpec
    snapshot_id: str
    mode: ExecMode
    plan: Plan
    run_dir: Path | None
    interpreters: frozenset[str]
    hierarchies: cgroups.Hierarchies  # read once per run: for the plan and the cgroups


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessAccount:
    processes: int = 0
    cpu_seconds: float = 0.0

    def to_json(self) -> dict[str, Json]:
        return {"processes": self.processes, "cpu_seconds": round(self.cpu_seconds, 3)}


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionReport:
    """How the run actually ran (mode decided up front, confirmed on running processes)."""

    mode: Mode
    platform: str
    interpreter: str | None
    entry: str | None
    command_exe: str | None
    confirmed: bool
    native: ProcessAccount
    emulated: Mapping[str, ProcessAccount]
    unobserved_cpu_seconds: float | None

    def to_json(self) -> dict[str, Json]:
        return {
            "mode": str(self.mode),
            "platform": self.platform,
            "interpreter": self.interpreter,
            "entry": self.entry,
            "command_exe": self.command_exe,
            "confirmed": self.confirmed,
            "native": self.native.to_json(),
            "emulated": {k: v.to_json() for k, v in sorted(self.emulated.items())},
            "unobserved_cpu_seconds": None
            if self.unobserved_cpu_seconds is None
            else round(self.unobserved_cpu_seconds, 3),
        }

    def summary(self) -> str:
        """One line: the mode and processes and CPU seconds of each kind."""
        how = f"emulated by {self.interpreter}" if self.interpreter else "native"
        parts = [f"{self.native.processes} native ({self.native.cpu_seconds:.2f}s CPU)"]
        parts += [
            f"{acc.processes} emulated by {Path(exe).name} ({acc.cpu_seconds:.2f}s CPU)"
            for exe, acc in sorted(self.emulated.items())
        ]
        checked = "confirmed" if self.confirmed else "not confirmed on the running process"
        return f"{self.platform}: {how}, {checked}; processes: {', '.join(parts)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    exit_code: int
    signal: int | None
    timed_out: bool
    cancelled: bool
    report: ExecutionReport
    resources: cgroups.ResourceUsage
    oom_kills: int = 0
    snapshot: str | None = None

    def to_json(self) -> dict[str, Json]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "signal_name": None if self.signal is None else signal.Signals(self.signal).name,
            "timed_out": self.timed_out,
            "cancelled": self.cancelled,
            "report": self.report.to_json(),
            "resources": {
                "cpu_seconds": self.resources.cpu_seconds,
                "peak_memory": self.resources.peak_memory,
                "oom_kills": self.oom_kills,
            },
            "snapshot": self.snapshot,
        }


# --- prepare --------------------------------------------------------------------------------------


def requested_platform(text: str | None, *, snapshot: Platform, host: Platform) -> Platform:
    """The platform to run for: the snapshot's by default, the host's for ``host``.

    Raises:
        PlatformError: not a platform specifier.
    """
    if text is None:
        return snapshot
    if text == "host":
        return host
    return parse_platform(text, host=host)


def hermetic_emulation(
    platform: Platform, report: PlatformReport
) -> tuple[PlatformReport, list[str]]:
    """The report and register lines for emulating ``platform`` with handlers registered only
    in the sandbox's own user namespace, leaving the host's binfmt_misc untouched.

    Raises:
        SandboxError: the kernel has no per-user-namespace binfmt_misc (before Linux 6.7).
        UnsupportedPlatformError: QEMU user mode does not run ``platform``.
        InterpreterNotFoundError: no static QEMU interpreter for it is installed.
    """
    if report.runs_natively(platform) or not is_linux(platform):
        return report, []
    release = os.uname().release
    if (version_tuple(release) or (0, 0)) < HERMETIC_KERNEL:
        raise SandboxError(
            f"hermetic emulation needs Linux >= 6.7 (binfmt_misc instances per user "
            f"namespace); this kernel is {release}",
            hint=f"register the handler on the host instead: runtimectl binfmt install {platform}",
        )
    target = target_for_platform(platform)
    interpreter = find_interpreter(target)
    flags = desired_flags(preserve_argv0=interpreter.preserve_argv0, credential=False)
    entry = desired_entry(target, os.fspath(interpreter.path), flags)
    emulator = Emulator(
        entry=entry.name, interpreter=entry.interpreter, flags=format_flags(entry.flags)
    )
    hermetic = dataclasses.replace(report, emulated={platform: emulator})
    return hermetic, [format_register_line(entry).decode("latin-1")]


def prepare_run(spec: ExecSpec, source: SnapshotSource, report: PlatformReport) -> PreparedRun:
    """Decide and plan a run (blocking: reads the store and the rootfs).

    Raises:
        SnapshotNotFoundError, PlatformError, NonLinuxExecError, NoEmulatorError,
        PlatformMismatchError, ExecFailedError, InvalidSpecError: refused before anything is
            created (only the run directory, removed again on failure).
    """
    info = source.get(spec.snapshot)
    platform = requested_platform(spec.platform, snapshot=info.platform, host=report.host)
    binfmt: list[str] = []
    if spec.hermetic:
        report, binfmt = hermetic_emulation(platform, report)
    check_platform(platform, report)  # NonLinuxExec/NoEmulator before touching any file
    layers = [path.absolute() for path in source.layer_paths(info.id)]
    root = LayeredRoot(layers)
    config = info.config
    identity = resolve_user(
        spec.user or config.user or None,
        passwd=root.read_text("/etc/passwd"),
        group=root.read_text("/etc/group"),
    )
    argv = command(spec.args, entrypoint=config.entrypoint, cmd=config.cmd)
    env = merge_env(config.env, spec.env, home=identity.home, hostname=spec.hostname)
    cwd = spec.cwd or config.working_dir or "/"
    mode = decide(platform, report, root, argv0=argv[0], path=env["PATH"], cwd=cwd)
    for bind in spec.mounts:
        if not os.path.exists(bind.source):
            raise SandboxError(
                f"bind mount source {bind.source} does not exist",
                details={"source": bind.source},
            )
    resolv_conf = _host_resolv_conf()
    hierarchies = cgroups.detect()
    # Only a commit needs the upper directory after the run: the others keep it on the run's
    # private tmpfs, with nothing to create or remove on disk.
    run_dir = source.new_run_dir() if spec.commit else None
    try:
        if run_dir is not None:
            (run_dir / "mnt").mkdir()
        plan = build_plan(
            spec=dataclasses.replace(spec, cwd=cwd),
            layers=[os.fspath(p) for p in layers],
            run_dir=os.fspath((run_dir or source.runs_dir).absolute()),
            scratch=run_dir is None,
            argv=argv,
            env=env,
            identity=identity,
            resolv_conf=resolv_conf,
            cgroups=[],
            cgroup_namespace=hierarchies.pure_v2,
            binfmt=binfmt,
        )
    except BaseException:
        if run_dir is not None:
            source.remove_run_dir(run_dir)
        raise
    return PreparedRun(
        spec=spec,
        snapshot_id=info.id,
        mode=mode,
        plan=plan,
        run_dir=run_dir,
        interpreters=frozenset(e.interpreter for e in report.emulated.values()),
        hierarchies=hierarchies,
    )


def _host_resolv_conf() -> str:
    try:
        return HOST_RESOLV_CONF.read_text()
    except FileNotFoundError:
        return ""


class _HostResolvConf:
    """The host's resolv.conf, read again only once its inode, size or mtime changed: the pool
    checks it before every run, and a stat costs a fraction of a read."""

    def __init__(self) -> None:
        self._seen: tuple[int, int, int, int] | None = None
        self._text = ""

    def read(self) -> str:
        try:
            st = os.stat(HOST_RESOLV_CONF)
        except FileNotFoundError:
            self._seen = None
            return ""
        seen = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if seen != self._seen:
            # Read after the stat: a change in between is seen (and read) on the next call.
            self._text, self._seen = _host_resolv_conf(), seen
        return self._text


# --- observe ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Observed:
    exe: str
    cpu_seconds: float


@dataclass(slots=True)
class _Look:
    """One look at the run's processes (:func:`_look`)."""

    exclude: set[int] = field(default_factory=set)  # not the run's command or its children
    seen: dict[tuple[int, float], _Observed] = field(default_factory=dict)
    inner: set[int] = field(default_factory=set)  # their PIDs in the sandbox


@dataclass(slots=True)
class _Observer:
    """Samples of the run's processes, keyed by (pid, start time) against PID reuse."""

    exclude: set[int] = field(default_factory=set)
    seen: dict[tuple[int, float], _Observed] = field(default_factory=dict)
    command_pid: int | None = None  # the command's PID inside the sandbox
    command_seen: bool = False

    def merge(self, look: _Look) -> None:
        self.exclude |= look.exclude
        self.seen.update(look.seen)
        if self.command_pid in look.inner:
            self.command_seen = True


def _look(group: cgroups.RunCgroup, exclude: frozenset[int]) -> _Look:
    """Every process of the run but the runner's and the sandbox's PID 1 (blocking: reads
    ``/proc``); ``exclude``: PIDs known to be those."""
    look = _Look()
    for pid in group.pids():
        if pid in exclude:
            continue
        try:
            inner = _inner_pid(pid)
            if inner is None or inner == 1:
                # the runner's own processes (outside the sandbox's PID namespace), PID 1
                look.exclude.add(pid)
                continue
            proc = psutil.Process(pid)
            with proc.oneshot():
                key = (pid, proc.create_time())
                times = proc.cpu_times()
            exe = os.readlink(f"/proc/{pid}/exe")
        except (psutil.Error, OSError):
            continue
        look.inner.add(inner)
        look.seen[key] = _Observed(exe=exe, cpu_seconds=times.user + times.system)
    return look


def _inner_pid(pid: int) -> int | None:
    """The PID of host process ``pid`` in the sandbox's namespace (``NSpid``, proc(5))."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[1]) if len(fields) > 1 else None
    return None


def _account(
    observer: _Observer,
    prepared: PreparedRun,
    command_exe: str | None,
    total_cpu: float | None,
) -> ExecutionReport:
    native = ProcessAccount()
    emulated: dict[str, ProcessAccount] = {}
    observed = list(observer.seen.values())
    if command_exe is not None and not observer.command_seen:
        # Too short-lived to sample: PID 1 saw its image; its CPU stays "unobserved".
        observed.append(_Observed(exe=command_exe, cpu_seconds=0.0))
    for item in observed:
        if item.exe in prepared.interpreters:
            acc = emulated.get(item.exe, ProcessAccount())
            emulated[item.exe] = ProcessAccount(
                processes=acc.processes + 1, cpu_seconds=acc.cpu_seconds + item.cpu_seconds
            )
        else:
            native = ProcessAccount(
                processes=native.processes + 1,
                cpu_seconds=native.cpu_seconds + item.cpu_seconds,
            )
    decided = prepared.mode.emulator.interpreter if prepared.mode.emulator else None
    if command_exe is None:
        confirmed = False
    elif decided is None:
        confirmed = command_exe not in prepared.interpreters
    else:
        confirmed = command_exe == decided
    attributed = native.cpu_seconds + sum(a.cpu_seconds for a in emulated.values())
    return ExecutionReport(
        mode=prepared.mode.mode,
        platform=str(prepared.mode.platform),
        interpreter=decided,
        entry=prepared.mode.entry,
        command_exe=command_exe,
        confirmed=confirmed,
        native=native,
        emulated=emulated,
        unobserved_cpu_seconds=None if total_cpu is None else max(0.0, total_cpu - attributed),
    )


# --- execute ----------------------------------------------------------------------------------


class Execution:
    """A running sandbox: ``output`` yields chunks until both streams end; then ``wait()``."""

    def __init__(
        self,
        prepared: PreparedRun,
        group: cgroups.RunCgroup,
        source: SnapshotSource | None,
        *,
        runner: _Runner | None = None,
        encoded: EncodedPlan | None = None,
        workers: trio.CapacityLimiter | None = None,
        lasting: Callable[[], None] | None = None,
    ) -> None:
        self.prepared = prepared
        self.group = group
        self.source = source
        # A runner that has its shape already (a spare, or one the pool started for this
        # run) with the plan it got, or neither: start() encodes the plan and starts a runner;
        # the worker threads for looks at the run's processes.
        self._runner = runner
        self._encoded = encoded
        self._workers = workers
        # Called once the run has lasted one SAMPLE_INTERVAL (with the first look).
        self._lasting = lasting
        send, self.output = trio.open_memory_channel[OutputChunk](OUTPUT_BUFFER)
        self._send = send
        # The nursery the run started in: the stop and the looks at the processes start
        # there when they are due, so that a short run costs neither task.
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._ended = False  # the sandbox is gone (its status ended); output may still come
        # When the first look at the processes and the stop at the timeout are due.
        self._observe_at = math.inf
        self._stop_at = math.inf
        self._done = trio.Event()
        self._observer = _Observer()
        self._error: RuntimedError | None = None
        self._started = False
        self._command_exe: str | None = None
        self._exit: Exited | None = None
        # The runner said so (with the run's accounting): nothing more comes on its status.
        self._finished: Finished | None = None
        self._stop_scope = trio.CancelScope()
        self._observe_scope = trio.CancelScope()
        self._usage: tuple[cgroups.ResourceUsage, dict[str, int]] | None = None
        self.timed_out = False
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the run: SIGTERM to the command, then kill the whole tree after the grace."""
        if not self._ended and not self._stopping:
            self.cancelled = True
            self._stop()

    def _stop(self) -> None:
        self._stopping = True
        assert self._nursery is not None  # cancel() and the timeout come once it runs
        assert self._runner is not None
        self._nursery.start_soon(self._stop_tree, self._runner.pidfd)

    async def wait(self) -> RunResult:
        """The result once the command, its runner and the output streams have ended.

        Read ``output`` to its end first (or concurrently): a full channel stalls the command.

        With ``commit`` requested and exit status 0, the run's upper directory becomes a new
        snapshot (``RunResult.snapshot``).

        Raises:
            RuntimedError: the sandbox could not be set up or the command could not be
                executed (the error the runner reported), or the commit failed.
        """
        await self._done.wait()
        if self._error is not None and not self._started:
            raise self._error
        usage, events = self._usage or (
            cgroups.ResourceUsage(cpu_seconds=None, peak_memory=None),
            {},
        )
        total = usage.cpu_seconds
        report = _account(self._observer, self.prepared, self._command_exe, total)
        code, signum = self._status()
        result = RunResult(
            exit_code=code,
            signal=signum,
            timed_out=self.timed_out,
            cancelled=self.cancelled,
            report=report,
            resources=usage,
            oom_kills=events.get("oom_kill", 0),
        )
        run_dir = self.prepared.run_dir
        if run_dir is not None and code == 0 and self.source is not None:
            await self.release()  # the overlay goes with the runner's mount namespace
            upper = run_dir / "upper"
            info = await trio.to_thread.run_sync(
                self.source.commit_upper, self.prepared.snapshot_id, upper
            )
            result = dataclasses.replace(result, snapshot=info.id)
        return result

    def _finish_cgroup(self) -> tuple[cgroups.ResourceUsage, dict[str, int]]:
        if self._finished is not None:  # the sandbox is empty, and the runner read the files
            return self.group.accounting(self._finished.accounting)
        self.group.kill(exiting=None if self._runner is None else self._runner.pid)
        return self.group.accounting()

    def _status(self) -> tuple[int, int | None]:
        if self._exit is not None:
            if self._exit.signal is not None:
                return 128 + self._exit.signal, self._exit.signal
            if self._exit.code is not None:
                return self._exit.code, None
        # No exit record: the runner or PID 1 was killed before the command's status came, and
        # the whole tree with it (SIGKILL, by us after the grace or by someone else).
        return 128 + signal.SIGKILL, signal.SIGKILL

    async def _stop_tree(self, pidfd: int) -> None:
        """On :meth:`cancel` or at the timeout: SIGTERM, the grace, then kill the whole tree
        (what trio's ``deliver_cancel`` does for ``run_process``). Cancelled once the sandbox
        is gone."""
        with self._stop_scope:
            _pidfd_signal(pidfd, signal.SIGTERM)
            await trio.sleep(STOP_GRACE)
            await trio.to_thread.run_sync(self.group.kill)
            _pidfd_signal(pidfd, signal.SIGKILL)

    async def release(self) -> None:
        """Reap the runner once it has exited (its mount namespace torn down with it); one
        still there after :data:`CLEANUP_TIMEOUT` is killed. Call it once the run ended."""
        runner = self._runner
        if runner is None:
            return
        self._runner = None
        if runner.fds:  # a spare that never got its command: it waits for one
            await runner.discard()
            return
        with trio.move_on_after(CLEANUP_TIMEOUT) as waiting:
            await trio.lowlevel.wait_readable(runner.pidfd)
        if waiting.cancelled_caught:
            await runner.discard()
            return
        if runner.collect():
            self.group.forget()  # the runner removed the cgroups

    async def _relay(self, status_fd: int, stdout: int, stderr: int) -> None:
        """Relay the runner's status and the command's output, from one task: the three pipes
        are in an epoll set of the run's own, which trio waits on (a task per pipe cost more
        than the rest of a short run's relaying).

        The status counts until the sandbox is gone: the runner reaped PID 1 (``finished``:
        the PID namespace is empty; only the runner's own exit, which tears down the mount
        namespace, is left) or the runner's processes all ended (EOF on the status pipe,
        which only they hold). Then whatever is left in the cgroup dies, and the output is
        relayed up to its end. Meanwhile the timeout and the first look at the processes
        (one :data:`SAMPLE_INTERVAL` after the start) start their tasks when they are due."""
        names = {stdout: Stream.STDOUT, stderr: Stream.STDERR}
        poller = select.epoll()
        pending = {status_fd, stdout, stderr}
        timeout = self.prepared.spec.timeout
        now = trio.current_time()
        self._observe_at = now + SAMPLE_INTERVAL
        self._stop_at = math.inf if timeout is None else now + timeout
        try:
            for fd in pending:
                os.set_blocking(fd, False)
                poller.register(fd, select.EPOLLIN)
            status = b""
            while pending:
                with trio.move_on_at(self._next_due()):
                    await trio.lowlevel.wait_readable(poller.fileno())
                self._start_due()
                for fd, _ in poller.poll(0):
                    data = _read_ready(fd)
                    if data is None:
                        continue
                    if fd in names:
                        if data:
                            await self._deliver(OutputChunk(stream=names[fd], data=data))
                            continue
                    else:
                        status += data
                        while b"\n" in status and self._finished is None:
                            line, status = status.split(b"\n", 1)
                            self._on_status(line)
                        if data and self._finished is None:
                            continue
                        self._end()
                    poller.unregister(fd)
                    os.close(fd)
                    pending.discard(fd)
        finally:
            trio.lowlevel.notify_closing(poller.fileno())
            poller.close()
            for fd in pending:
                os.close(fd)
            self._send.close()
            self._ended = True  # nothing more starts for the run
            self._done.set()

    def _next_due(self) -> float:
        return math.inf if self._ended else min(self._observe_at, self._stop_at)

    def _start_due(self) -> None:
        """Start the first look at the processes (and tell the pool the run lasts), and the
        stop at the timeout, once due."""
        if self._ended:
            return
        now = trio.current_time()
        assert self._nursery is not None  # it runs
        if now >= self._observe_at:
            self._observe_at = math.inf
            self._nursery.start_soon(self._observe)
            if self._lasting is not None:
                self._lasting()
        if now >= self._stop_at:
            self._stop_at = math.inf
            if not self._stopping:
                self.timed_out = True
                self._stop()

    async def _deliver(self, chunk: OutputChunk) -> None:
        """Hand a chunk of output on; while the reader is slow, what falls due still starts
        (a run whose output nobody reads still times out)."""
        try:
            self._send.send_nowait(chunk)
            return
        except trio.WouldBlock:
            pass
        while True:
            with trio.move_on_at(self._next_due()):
                await self._send.send(chunk)
                return
            self._start_due()

    def _end(self) -> None:
        """The sandbox is gone: whatever is left in the cgroup dies now, so the output pipes
        reach EOF. A few small reads of cgroupfs: not worth a trip to a thread."""
        self._ended = True
        self._stop_scope.cancel()
        self._observe_scope.cancel()
        self._usage = self._finish_cgroup()

    def _on_status(self, line: bytes) -> None:
        try:
            message = parse_status(line)
        except SandboxError as exc:
            self._error = exc
            return
        log.debug("runner status: %s", message)
        plan = self.prepared.plan
        if isinstance(message, StepFailed):
            self._error = runner.step_error(message, plan)
        elif isinstance(message, ExecFailed):
            self._error = runner.exec_error(message, plan)
        elif isinstance(message, Started):
            self._started = True
            self._command_exe = message.exe
            self._observer.command_pid = message.pid
        elif isinstance(message, Exited):
            self._exit = message
        elif isinstance(message, Finished):
            self._finished = message

    async def _observe(self) -> None:
        """Look at the run's processes now and then until it ends, the first time one
        interval after the start: the command itself is known from its ``started`` status,
        and a run over sooner (most build steps' ``true``, ``test``, ``mkdir``) costs no look.
        A look under way when the run ends is abandoned (its thread finishes on its own, and
        nothing of it is used): the result does not wait for it. Started by :meth:`_relay`
        once the first interval is over, cancelled once the sandbox is gone."""
        interval = SAMPLE_INTERVAL
        with self._observe_scope:
            while True:
                if self._started:
                    exclude = frozenset(self._observer.exclude)
                    look = await trio.to_thread.run_sync(
                        _look, self.group, exclude, abandon_on_cancel=True, limiter=self._workers
                    )
                    self._observer.merge(look)
                    # Often at first, when short-lived build steps come and go, then less: a
                    # look is a trip to a thread and a /proc read per process.
                    interval = min(interval * 2, SAMPLE_INTERVAL_MAX)
                await trio.sleep(interval)

    def start(self, nursery: trio.Nursery) -> None:
        """Hand the plan to the runner (a spare, one started for the run, or one started now)
        and relay everything in ``nursery`` until the sandbox has ended; a stop and the looks
        at the processes run there too. :meth:`release` reaps the runner afterwards."""
        if log.isEnabledFor(logging.DEBUG):  # not built on every run for nothing
            for line in self.prepared.plan.describe():
                log.debug("%s", line)
        shape: bytes | None = None  # a pool's runner has its shape already
        if self._runner is None:
            self._encoded = _with_cgroups(self.prepared, self.group, None)
            shape = self._encoded.shape
            # From the trio thread, which lives as long as the run (the runner's PDEATHSIG).
            self._runner = _start_runner()
        assert self._encoded is not None  # a pool's runner comes with its plan
        stdin, stdout, stderr, status_fd, shape_fd, command_fd = self._runner.take_fds()
        self._nursery = nursery
        nursery.start_soon(self._relay, status_fd, stdout, stderr)
        if shape is not None:
            _feed_soon(nursery, shape_fd, shape)
        if command_fd >= 0:  # else it was written before the runner started
            _feed_soon(nursery, command_fd, self._encoded.command)
        _feed_soon(nursery, stdin, self.prepared.spec.stdin or b"")


SHAPE: Final = 4  # the indexes of the shape and command pipes among a runner's fds
COMMAND: Final = 5


@dataclass(slots=True)
class _Runner:
    """A started runner: its PID and pidfd, and until :meth:`take_fds` the launcher's ends of
    its stdin, stdout, stderr, status, shape and command pipes (-1 for one already used)."""

    pid: int
    pidfd: int
    fds: list[int]

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    async def discard(self) -> None:
        """Kill a runner that never got its command and reap it."""
        for fd in self.take_fds():
            if fd >= 0:
                os.close(fd)
        _pidfd_signal(self.pidfd, signal.SIGKILL)
        await trio.lowlevel.wait_readable(self.pidfd)  # its exit unmounts what it built
        self.collect()

    def alive(self) -> bool:
        """Whether the runner is still there (a spare killed meanwhile is not)."""
        try:
            exited = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return exited is None

    def collect(self) -> bool:
        """Reap the runner, which has exited (its pidfd was readable), and close the pidfd;
        whether it exited 0: its sandbox ended and it removed the run's cgroups."""
        exited = None
        with contextlib.suppress(ChildProcessError):
            exited = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        os.close(self.pidfd)
        return exited is not None and exited.si_code == os.CLD_EXITED and exited.si_status == 0


@contextlib.contextmanager
def _runner_pipes() -> Iterator[tuple[list[int], list[int]]]:
    """Our ends and the runner's of its pipes (stdin, stdout, stderr, status, shape,
    command), for the block that starts it: theirs are closed after it (the runner has its
    own copies then), ours too if it failed."""
    ours: list[int] = []
    theirs: list[int] = []
    try:
        for child_reads in (True, False, False, False, True, True):
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            ours.append(write_end if child_reads else read_end)
            theirs.append(read_end if child_reads else write_end)
        yield ours, theirs
    except BaseException:
        for fd in ours:
            if fd >= 0:  # not one the block used up
                os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)


def _start_runner() -> _Runner:
    """A runner on pipes, waiting for its plan, posix_spawn'd: from the trio thread, which
    outlives the run (see :func:`sandbox.runner.spawn`)."""
    with _runner_pipes() as (ours, theirs):
        pid, pidfd = runner.spawn(theirs)
    return _Runner(pid=pid, pidfd=pidfd, fds=ours)


async def _fork_runner(
    spawner: runner.Spawner, group: cgroups.RunCgroup, shape: bytes, command: bytes | None
) -> tuple[_Runner, bytes]:
    """A runner forked by ``spawner`` (serving other tasks meanwhile) once it created
    ``group``'s directories (named by ``setup(defer=True)``), with ``shape`` in its pipe
    before it starts: it reads it without waiting, and no write has to wake it. The part
    that did not fit, if any, is for the caller to :func:`_feed` to ``fds[SHAPE]``; else
    that is -1, as for a spare. A ``command`` that fits in one atomic pipe write goes in
    ahead the same way (``fds[COMMAND]`` is -1 then)."""
    with _runner_pipes() as (ours, theirs):
        rest = _write_ahead(ours[SHAPE], shape)
        if not rest:
            ours[SHAPE] = -1  # written and closed
        if command is not None and len(command) <= select.PIPE_BUF:
            _write_ahead(ours[COMMAND], command)  # into an empty pipe: all of it
            ours[COMMAND] = -1
        pid, pidfd = await spawner.spawn(theirs, group.dirs)
    return _Runner(pid=pid, pidfd=pidfd, fds=ours), rest


def _pidfd_signal(pidfd: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signum)


def _read_ready(fd: int) -> bytes | None:
    """A chunk from pipe ``fd``, which epoll found readable: b"" at its end, None if there
    was nothing after all."""
    try:
        return os.read(fd, READ_SIZE)
    except BlockingIOError:
        return None


def _write_ahead(fd: int, data: bytes) -> bytes:
    """Write to pipe ``fd`` what fits without waiting (a plan half, as a rule, whole) and
    close it once all is written; the rest, if any, is for :func:`_feed`. A reader gone (the
    runner died: its status says why) takes nothing more."""
    os.set_blocking(fd, False)
    try:
        rest = data[os.write(fd, data) :] if data else b""
    except BlockingIOError:
        return data
    except BrokenPipeError:
        rest = b""
    if not rest:
        os.close(fd)
    return rest


async def _feed(fd: int, data: bytes) -> None:
    """Write the rest :func:`_write_ahead` left to pipe ``fd``, then close it."""
    async with trio.lowlevel.FdStream(fd) as stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)


def _feed_soon(nursery: trio.Nursery, fd: int, data: bytes) -> None:
    """Write ``data`` to pipe ``fd`` now, as far as it fits, the rest in ``nursery``."""
    if rest := _write_ahead(fd, data):
        nursery.start_soon(_feed, fd, rest)


@contextlib.asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Raise a nursery's lone error as itself: callers catch ``RuntimedError``, not groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        sole = sole_exception(group)
        if sole is group:
            raise
        raise sole from None


@dataclass(slots=True, kw_only=True)
class _Spare:
    """A runner that built a sandbox ahead of its request, in cgroups of its own."""

    runner: _Runner
    group: cgroups.RunCgroup
    hierarchies: cgroups.Hierarchies


def _with_cgroups(
    prepared: PreparedRun, group: cgroups.RunCgroup, encoded: EncodedPlan | None
) -> EncodedPlan:
    """The run's plan for the runner in ``group``: ``encoded`` (without cgroups) with them
    added to its shape, or the whole plan encoded now."""
    dirs, accounting = group.for_runner()
    if encoded is not None:
        return dataclasses.replace(encoded, shape=join_cgroups(encoded.shape, dirs, accounting))
    return runner.encode(dataclasses.replace(prepared.plan, cgroups=dirs, accounting=accounting))


def _named_cgroups(
    kind: str, hierarchies: cgroups.Hierarchies, limitable: frozenset[str]
) -> cgroups.RunCgroup:
    """Fresh cgroups for a runner (a spare's or a run's own), named only: the spawner
    creates them. In the cgroups of the ``limitable`` controllers too (``cpu``, ``pids``),
    so that such a limit applied once they exist needs no directory the runner was not told
    to join."""
    name = f"{kind}-{uuid.uuid4().hex[:12]}"
    return cgroups.create(name, hierarchies, limitable=limitable, defer=True)


class Runners:
    """Sandboxes built ahead of their requests, and the clean-up after runs taken off their
    path. Open with :func:`open_runners`; the daemon keeps one for its lifetime.

    After each run, a spare runner builds the same sandbox again (the same snapshot, mounts
    and profile: the shape of :class:`sandbox.wire.EncodedPlan`; up to
    :data:`SPARES_PER_SHAPE` spares per shape, built one after the other, for up to
    :data:`SPARES_KEPT` shapes) in a fresh set of cgroups
    (no limits yet; cpu and pids cgroups only after a run with such limits), and waits for a
    command. The next run with that shape takes it: it writes its limits and sends its
    command, and pays neither the runner's
    start, nor the namespaces and mounts, nor the move into new cgroups (which waits for an
    RCU grace period, milliseconds, unless a move is in flight). Runs that commit or bind
    host paths never use a spare (:func:`_reusable`).
    After a run, reaping its runner (whose exit tears down the mount namespace) and
    removing its cgroups and run directory happen in the background.
    """

    def __init__(self, nursery: trio.Nursery, spawner: runner.Spawner) -> None:
        self._nursery = nursery
        self.spawner = spawner
        # Clean-ups and looks at running processes wait in line for two worker threads:
        # after a burst of runs, one thread each would be started anew (trio keeps few idle),
        # on the trio thread's time.
        self.workers = trio.CapacityLimiter(WORKER_THREADS)
        # By shape, the most recently built shape last, each shape's oldest spare first.
        self._spares: dict[bytes, list[_Spare]] = {}
        self._making: dict[bytes, trio.Event] = {}  # spares being built, by shape
        self._awaited: set[bytes] = set()  # shapes whose spare a run waits for already
        self._discards = 0  # calls of discard_spares: a spare built across one goes too
        self._closed = False
        self._eager = False  # runs come back to back: spares are built during runs
        # The controllers the last run had limits for (cpu, pids): the next spare joins their
        # cgroups too (in v1, hierarchies of their own that a run without such limits need
        # not join: a mkdir, a move and an rmdir each).
        self._limitable: frozenset[str] = frozenset()
        self._last_end = -math.inf
        # Recent decisions: (spec, snapshot ID) -> (report, resolv.conf text, the run, its
        # plan encoded without cgroups).
        self._prepared: dict[
            tuple[ExecSpec, str], tuple[PlatformReport, str, PreparedRun, EncodedPlan]
        ] = {}
        self._preparing: dict[tuple[ExecSpec, str], trio.Event] = {}
        self._resolv_conf = _HostResolvConf()

    async def prepare(
        self, spec: ExecSpec, source: SnapshotSource, report: PlatformReport
    ) -> tuple[PreparedRun, EncodedPlan | None]:
        """:func:`prepare_run`, and for a run whose sandbox can be built ahead
        (:func:`_reusable`) its plan encoded without cgroups (whose shape names the sandbox).

        Both are remembered for such runs: a snapshot never changes, so the same request on
        it decides and plans the same way, as long as the platform report and the host's
        resolv.conf are the same. The snapshot is looked up every time (it may be gone)."""
        if not _reusable(spec):
            return await trio.to_thread.run_sync(prepare_run, spec, source, report), None
        # One indexed SQLite read and a stat: not worth a trip to a thread.
        snapshot = source.resolve(spec.snapshot)
        resolv_conf = self._resolv_conf.read()
        key = (spec, snapshot)
        while (preparing := self._preparing.get(key)) is not None:
            await preparing.wait()  # the same request, arrived together: decided once
        known = self._prepared.get(key)
        if known is not None and known[0] is report and known[1] == resolv_conf:
            return known[2], known[3]
        self._preparing[key] = done = trio.Event()
        try:
            prepared = await trio.to_thread.run_sync(prepare_run, spec, source, report)
            encoded = runner.encode(prepared.plan)  # the plan has no cgroups yet
        finally:
            del self._preparing[key]
            done.set()
        if len(self._prepared) >= PREPARED_KEPT:
            del self._prepared[next(iter(self._prepared))]  # the oldest
        self._prepared[key] = (report, resolv_conf, prepared, encoded)
        return prepared, encoded

    async def take(
        self,
        key: bytes,
        hierarchies: cgroups.Hierarchies,
        *,
        limited: frozenset[str],
        emulated: bool,
    ) -> _Spare | None:
        """A spare, if one built the sandbox ``key`` (a shape without cgroups) in these cgroup
        hierarchies and is still alive (the oldest such). When none is ready and one for
        ``key`` is still being started, the first run to ask waits for it: it is ready sooner
        than a runner started now would be. The spare that replaces it is started once this
        run runs or once it ended (see :meth:`running`; ``emulated``: this run's command runs
        under an emulator)."""
        made = self._making.get(key)
        if key not in self._spares and made is not None and key not in self._awaited:
            self._awaited.add(key)
            await made.wait()
        spare = self._pop_spare(key, hierarchies, limited)
        self._eager = emulated or spare is None or trio.current_time() - self._last_end < EAGER_GAP
        self._limitable = limited
        return spare

    def _pop_spare(
        self, key: bytes, hierarchies: cgroups.Hierarchies, limited: frozenset[str]
    ) -> _Spare | None:
        """The oldest of ``key``'s spares that suits the run: built in these hierarchies, in
        cgroups of the ``limited`` controllers, and alive. Those that do not go."""
        spares = self._spares.get(key, [])
        while spares:
            spare = spares.pop(0)
            if not spares:
                del self._spares[key]
            if (
                spare.hierarchies == hierarchies
                and all(spare.group.has(controller) for controller in limited)
                and spare.runner.alive()
            ):
                return spare
            self.defer(partial(_discard_spare, spare))
        return None

    def running(self, key: bytes, hierarchies: cgroups.Hierarchies) -> None:
        """A run in the sandbox ``key`` has its command. Back to back (the last run ended just
        now), without a spare (this run is on the slow path anyway) or emulated: the next
        spare is built now, while this run runs, else it would be on the next one's path;
        otherwise once this run has lasted a while (:meth:`lasting`) or ended (:meth:`ended`),
        so that building it does not compete with a short run (a native ``true`` alone: ~1 ms
        slower with a spare built meanwhile).

        An emulated run lasts longer than a spare takes to build (QEMU's start-up alone is
        ~15 ms here), and the spare's first move into its cgroups after an idle spell waits
        for an RCU grace period (6-25 ms here, with ``cgroup_mutex`` held): built after the
        run, that wait fell on the next run's path, the second of every burst."""
        if self._eager:
            self._refill_for(key, hierarchies)

    def lasting(self, key: bytes, hierarchies: cgroups.Hierarchies) -> None:
        """A run in the sandbox ``key`` has lasted one :data:`SAMPLE_INTERVAL`: a spare that
        was to wait for its end is built now. Against a run that long, building it costs
        little, and an Exec that follows the run at once finds it ready; built at the end,
        its first cgroup move after the run waited for an RCU grace period (see
        :meth:`running`): an Exec right after a 100 ms step took 18 ms instead of 4.5."""
        if not self._eager:
            self._refill_for(key, hierarchies)

    def ended(self, key: bytes, hierarchies: cgroups.Hierarchies) -> None:
        """A run in the sandbox ``key`` has ended: start the spare for the next one, unless it
        was started while this one ran (:meth:`running`, :meth:`lasting`)."""
        self._last_end = trio.current_time()
        if not self._eager:
            self._refill_for(key, hierarchies)

    def _refill_for(self, key: bytes, hierarchies: cgroups.Hierarchies) -> None:
        if (
            self._closed
            or key in self._making
            or len(self._spares.get(key, ())) >= SPARES_PER_SHAPE
        ):
            return
        self._making[key] = trio.Event()
        self._awaited.discard(key)
        self._nursery.start_soon(self._refill, key, hierarchies, self._discards)

    def discard_spares(self) -> None:
        """Let every spare go (in the background): a snapshot was removed, and a spare's
        overlay would keep its layers' files, and their space, until it went."""
        self._discards += 1
        spares, self._spares = self._spares, {}
        for spare in itertools.chain.from_iterable(spares.values()):
            self.defer(partial(_discard_spare, spare))

    def defer(self, clean_up: Callable[[], Awaitable[None]]) -> None:
        """Run ``clean_up`` in the background (shielded from cancellation)."""
        self._nursery.start_soon(_shielded, clean_up)

    async def _refill(self, key: bytes, hierarchies: cgroups.Hierarchies, discards: int) -> None:
        kept = False
        try:
            group = _named_cgroups("spare", hierarchies, self._limitable)
            # It builds the sandbox now, and moves its PID 1 into the cgroups meanwhile.
            proc = await self._start(group, join_cgroups(key, *group.for_runner()))
            spare = _Spare(runner=proc, group=group, hierarchies=hierarchies)
            if self._closed:  # and maybe cancelled: its parts must go all the same
                await _shielded(partial(_discard_spare, spare))
            elif self._discards != discards:  # built on what may be gone now
                self.defer(partial(_discard_spare, spare))
            else:
                kept = True
                self._spares[key] = [*self._spares.pop(key, []), spare]  # now the most recent
                if len(self._spares) > SPARES_KEPT:  # the least recently built shape's go
                    for old in self._spares.pop(next(iter(self._spares))):
                        self.defer(partial(_discard_spare, old))
        except RuntimedError as exc:
            log.warning("no spare runner: %s", exc)  # runs start their own meanwhile
        finally:
            self._making.pop(key).set()
        if kept:
            self._refill_for(key, hierarchies)  # the next one, if the shape has room

    async def start(
        self, prepared: PreparedRun, encoded: EncodedPlan | None
    ) -> tuple[cgroups.RunCgroup, _Runner, EncodedPlan]:
        """A run's own runner, when no spare fits: its cgroups (limits applied once they
        exist), and its plan (``encoded`` without cgroups, or encoded now) with the shape
        in the runner's pipe.

        Raises:
            SandboxError: the cgroups or the runner could not be made, or a limit applied.
        """
        spec = prepared.spec
        group = _named_cgroups("run", prepared.hierarchies, _limited(spec))
        encoded = _with_cgroups(prepared, group, encoded)
        proc = await self._start(group, encoded.shape, encoded.command)
        try:
            # A few small writes to cgroupfs: not worth a trip to a thread.
            group.limit(memory=spec.memory, pids=spec.pids, cpus=spec.cpus)
        except BaseException:
            await _shielded(partial(_discard_spare_parts, proc, group))
            raise
        return group, proc, encoded

    async def _start(
        self, group: cgroups.RunCgroup, shape: bytes, command: bytes | None = None
    ) -> _Runner:
        """A runner the spawner forks once it made ``group`` (named only), ``shape`` in its
        pipe: on the trio thread, which serves other runs while the spawner waits for the
        cgroup lock and forks. A mkdir or a posix_spawn there took milliseconds at times."""
        try:
            proc, rest = await _fork_runner(self.spawner, group, shape, command)
        except BaseException:
            group.remove()
            raise
        try:
            if rest:
                shape_fd, proc.fds[SHAPE] = proc.fds[SHAPE], -1
                await _feed(shape_fd, rest)
        except BaseException:
            await _shielded(partial(_discard_spare_parts, proc, group))
            raise
        return proc

    async def aclose(self) -> None:
        self._closed = True
        spares, self._spares = self._spares, {}
        for spare in itertools.chain.from_iterable(spares.values()):
            await _discard_spare(spare)


def _limited(spec: ExecSpec) -> frozenset[str]:
    return cgroups.limited(pids=spec.pids, cpus=spec.cpus)


def _reusable(spec: ExecSpec) -> bool:
    """Whether a run's sandbox can be built ahead of it, and its plan remembered: not with a
    run directory of its own (a commit), nor with host paths bound (a path bound ahead of time
    could have been replaced since)."""
    return not spec.commit and not spec.mounts


async def _shielded(action: Callable[[], Awaitable[object]]) -> None:
    with trio.CancelScope(shield=True):
        await action()


@contextlib.asynccontextmanager
async def open_runners() -> AsyncIterator[Runners]:
    """A :class:`Runners` pool for many runs (the daemon keeps one for its lifetime); on exit
    the spare is discarded and every deferred clean-up has finished."""
    # Started on the trio thread, which outlives the pool: the runners it forks die with it.
    spawner = runner.Spawner()
    try:
        async with trio.open_nursery() as nursery:
            pool = Runners(nursery, spawner)
            try:
                yield pool
            finally:
                await _shielded(pool.aclose)
    finally:
        spawner.close()  # every runner it forked has been reaped by now


@contextlib.asynccontextmanager
async def open_run(
    spec: ExecSpec,
    source: SnapshotSource,
    report: PlatformReport,
    *,
    runners: Runners | None = None,
) -> AsyncIterator[Execution]:
    """Prepare and start a run; on leaving, the run directory is removed (after any commit).

    With ``runners``, the run takes the spare runner when there is one, and the clean-up
    after it (reaping the runner, removing the run directory and cgroups) happens in the
    pool's background, once the result is out.

    Raises:
        RuntimedError: every refusal of :func:`prepare_run` and :func:`open_execution`.
    """
    encoded: EncodedPlan | None = None
    if runners is None:
        prepared = await trio.to_thread.run_sync(prepare_run, spec, source, report)
    else:
        prepared, encoded = await runners.prepare(spec, source, report)
    # The sandbox's key for the pool (its shape without cgroups), for a run that can use and
    # leave a spare; the plan itself may be encoded with the run's own cgroups below.
    key = None if encoded is None else encoded.shape
    spare: _Spare | None = None
    started: _Runner | None = None
    try:
        if runners is not None and key is not None:
            spare = await runners.take(
                key,
                prepared.hierarchies,
                limited=_limited(spec),
                emulated=prepared.mode.mode is Mode.EMULATED,
            )
        if spare is not None:
            # A few small writes to cgroupfs: not worth a trip to a thread.
            spare.group.limit(memory=spec.memory, pids=spec.pids, cpus=spec.cpus)
            group = spare.group
        elif runners is not None:
            group, started, encoded = await runners.start(prepared, encoded)
        else:
            group = _create_cgroups(prepared)
    except BaseException:
        with trio.CancelScope(shield=True):
            if spare is not None:
                await _discard_spare(spare)
            if prepared.run_dir is not None:
                await trio.to_thread.run_sync(source.remove_run_dir, prepared.run_dir)
        raise
    execution = Execution(
        prepared,
        group,
        source,
        runner=started if spare is None else spare.runner,
        encoded=encoded,
        workers=None if runners is None else runners.workers,
        lasting=None
        if runners is None or key is None
        else partial(runners.lasting, key, prepared.hierarchies),
    )
    try:
        async with _executing(execution):
            if runners is not None and key is not None:
                runners.running(key, prepared.hierarchies)
            yield execution
    finally:
        if runners is not None:
            clean_up = partial(_clean_up, execution, source, runners.workers)
            if key is not None:
                runners.ended(key, prepared.hierarchies)
            runners.defer(clean_up)
        else:
            await _shielded(partial(_clean_up, execution, source))


async def _discard_spare(spare: _Spare) -> None:
    await _discard_spare_parts(spare.runner, spare.group)


async def _discard_spare_parts(proc: _Runner, group: cgroups.RunCgroup) -> None:
    """Kill a spare runner (it may have built a sandbox: wait for it to go) and remove its
    cgroups."""
    await proc.discard()
    await trio.to_thread.run_sync(group.remove)


@contextlib.asynccontextmanager
async def _executing(execution: Execution) -> AsyncIterator[None]:
    """Run ``execution`` in a nursery of its own; leaving the block early cancels it."""
    async with _single_errors(), trio.open_nursery() as nursery:
        execution.start(nursery)
        try:
            yield
        finally:
            execution.cancel()


def _create_cgroups(prepared: PreparedRun) -> cgroups.RunCgroup:
    spec = prepared.spec
    name = f"run-{uuid.uuid4().hex[:12]}"
    return cgroups.create(
        name, prepared.hierarchies, memory=spec.memory, pids=spec.pids, cpus=spec.cpus
    )


async def _clean_up(
    execution: Execution, source: SnapshotSource, limiter: trio.CapacityLimiter | None = None
) -> None:
    """After a run: reap its runner (the mounts go with it), then remove what is left of its
    cgroups (the runner removes them itself, unless it was killed or one stayed busy) and
    its run directory, in a thread of ``limiter``'s. Errors are logged: nobody waits for
    them."""
    try:
        await execution.release()
        if execution.group.dirs or execution.prepared.run_dir is not None:
            await trio.to_thread.run_sync(_remove_run, execution, source, limiter=limiter)
    except (RuntimedError, OSError) as exc:
        log.error("clean-up after the run %s: %s", execution.group.name, exc)


def _remove_run(execution: Execution, source: SnapshotSource) -> None:
    try:
        execution.group.remove()
    finally:
        if execution.prepared.run_dir is not None:
            source.remove_run_dir(execution.prepared.run_dir)


@contextlib.asynccontextmanager
async def open_execution(
    prepared: PreparedRun,
    *,
    source: SnapshotSource | None = None,
    group: cgroups.RunCgroup | None = None,
) -> AsyncIterator[Execution]:
    """Start a prepared run; leaving the block early cancels it (whole tree killed). The
    runner is reaped on leaving.

    The run's cgroups are created here unless ``group`` is given; then the caller removes it.

    Raises:
        SandboxError: the cgroups could not be created or a limit cannot be enforced.
    """
    owned = group is None
    if group is None:
        group = await trio.to_thread.run_sync(_create_cgroups, prepared)
    execution = Execution(prepared, group, source)
    try:
        async with _executing(execution):
            yield execution
    finally:
        await _shielded(execution.release)
        if owned:
            await _shielded(partial(trio.to_thread.run_sync, group.remove))
