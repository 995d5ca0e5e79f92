"""IO: one run's cgroups: limits (memory, pids, CPU), accounting, whole-tree kill and removal.

Each controller is taken from cgroup v2 when the unified hierarchy offers it below our own
cgroup, else from its v1 hierarchy (this machine: v1 memory/pids/cpu/cpuacct plus a cgroup2
mount at /sys/fs/cgroup/unified with only hugetlb). A run's cgroups are named
``runtimed-<run>`` under the cgroup the caller is in, in every hierarchy used, so the caller's
own limits still apply (on a pure v2 host whose cgroup cannot hand controllers down, under
``runtimed/`` at the root instead, see :func:`v2_parent`). The v2 group, when there is one,
is created even without controllers: it gives ``cgroup.kill`` (Linux 5.14) and a reliable
process list. A limit no hierarchy can enforce is an error, never silently dropped.

Kill: v2 ``cgroup.kill`` when available (it kills every process including new forks);
otherwise the v1 freezer (freeze, SIGKILL everything, thaw), otherwise SIGKILL in rounds until
``cgroup.procs`` stays empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from runtimed.errors import SandboxError

log = logging.getLogger(__name__)

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
CFS_PERIOD_US: Final = 100_000
REMOVE_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Hierarchies:
    """Where each controller lives: a v2 directory (our cgroup) and v1 hierarchies."""

    unified: Path | None
    unified_controllers: frozenset[str]
    v1: Mapping[str, Path]
    pure_v2: bool
    unified_root: Path | None = None  # the cgroup2 mount point


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceUsage:
    cpu_seconds: float | None
    peak_memory: int | None


def _own_cgroups() -> dict[str, str]:
    """``/proc/self/cgroup``: hierarchy controllers ("" for v2) → our path in it."""
    out = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def detect() -> Hierarchies:
    """Read the mounts and our own cgroups; which controller comes from where."""
    own = _own_cgroups()
    unified: Path | None = None
    unified_root: Path | None = None
    v1: dict[str, Path] = {}
    pure_v2 = False
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, options, *_ = line.split()
        point = Path(mountpoint)
        if fstype == "cgroup2" and "" in own and unified is None:
            unified = point / own[""].lstrip("/")
            unified_root = point
            pure_v2 = point == CGROUP_ROOT
        elif fstype == "cgroup":
            for name in ("memory", "pids", "cpu", "cpuacct", "freezer"):
                if name in options.split(",") and name in own:
                    v1[name] = point / own[name].lstrip("/")
    controllers: frozenset[str] = frozenset()
    if unified is not None:
        with contextlib.suppress(OSError):
            controllers = frozenset((unified / "cgroup.controllers").read_text().split())
    return Hierarchies(
        unified=unified,
        unified_controllers=controllers,
        v1=v1,
        pure_v2=pure_v2,
        unified_root=unified_root,
    )


def _enable_controllers(group: Path, names: frozenset[str]) -> bool:
    """Enable ``names`` for the children of ``group``; whether the kernel took them all."""
    try:
        for name in sorted(names):
            (group / "cgroup.subtree_control").write_text(f"+{name}")
    except OSError:
        return False
    return True


def v2_parent(h: Hierarchies) -> Path:
    """Where a run's v2 cgroup goes: below our own cgroup when it can hand the controllers
    down, else below ``runtimed/`` at the root of the hierarchy.

    cgroup v2 lets no cgroup with processes enable controllers for its children ("no
    internal processes", cgroup-v2.rst), and the launcher's own cgroup has the launcher in
    it; on a pure v2 host without delegation the runs then go where Docker's cgroupfs driver
    puts containers, in a shared parent of ours at the root (kept between runs).
    """
    assert h.unified is not None
    wanted = frozenset({"memory", "pids", "cpu"} & h.unified_controllers)
    if not wanted or _enable_controllers(h.unified, wanted):
        return h.unified
    if h.unified_root is None or h.unified_root == h.unified:
        return h.unified  # the root itself: nothing better exists
    shared = h.unified_root / "runtimed"
    try:
        shared.mkdir(exist_ok=True)
    except OSError as exc:
        raise SandboxError(
            f"create cgroup {shared}: {exc.strerror}", details={"path": str(shared)}
        ) from exc
    _enable_controllers(h.unified_root, wanted)
    _enable_controllers(shared, wanted)
    return shared


class RunCgroup:
    """The cgroups of one run. Create with :func:`create`; always :meth:`remove`."""

    def __init__(self, hierarchies: Hierarchies, name: str) -> None:
        self.hierarchies = hierarchies
        self.name = name
        self.dirs: list[Path] = []
        self._v2: Path | None = None
        self._v1: dict[str, Path] = {}
        self._deferred = False  # setup(defer=True) is naming the directories, not making them
        self._files: tuple[Path | None, Path | None, Path | None] = (None, None, None)

    def _make(self, parent: Path) -> Path:
        path = parent / self.name
        if not self._deferred:
            try:
                path.mkdir()
            except OSError as exc:
                raise creation_error(path, exc.errno or errno.EIO) from exc
        self.dirs.append(path)
        return path

    def _controller_dir(self, controller: str) -> Path | None:
        h = self.hierarchies
        if self._v2 is not None and controller in h.unified_controllers:
            return self._v2
        if controller in h.v1:
            if controller not in self._v1:
                self._v1[controller] = self._make(h.v1[controller])
            return self._v1[controller]
        return None

    def _require(self, controller: str, what: str) -> Path:
        path = self._controller_dir(controller)
        if path is None:
            raise SandboxError(
                f"cannot limit {what}: no cgroup {controller} controller is available",
                hint="mount the cgroup v1 hierarchy or delegate the v2 controller to runtimed",
            )
        return path

    def setup(self, *, limitable: frozenset[str] = frozenset(), defer: bool = False) -> None:
        """Create the directories: v2's, memory's (for the peak memory), the v1 cpuacct and
        freezer without v2, and those of the controllers in ``limitable`` (``cpu``,
        ``pids``), so that such a limit never needs a new one (for a group joined before its
        limits are known). With ``defer``, only name them (``dirs``, in the order to create
        them): a runner's spawner creates them (:class:`sandbox.runner.Spawner`)."""
        h = self.hierarchies
        self._deferred = defer
        try:
            if h.unified is not None:
                parent = v2_parent(h)
                # What a new child gets: the controllers its parent enables for children.
                enabled: frozenset[str] = frozenset()
                with contextlib.suppress(OSError):
                    enabled = frozenset(_read(parent / "cgroup.subtree_control").split())
                self._v2 = self._make(parent)
                self.hierarchies = dataclasses.replace(h, unified_controllers=enabled)
            for controller in ("memory", *sorted(limitable)):
                self._controller_dir(controller)
            if self._v2 is None:
                self._controller_dir("cpuacct")
                self._controller_dir("freezer")
        finally:
            self._deferred = False
        self._files = self._find_accounting_files()

    def has(self, controller: str) -> bool:
        """Whether the run's processes are in a cgroup of ``controller`` (made by setup)."""
        if self._v2 is not None and controller in self.hierarchies.unified_controllers:
            return True
        return controller in self._v1

    def limit(self, *, memory: int | None, pids: int | None, cpus: float | None) -> None:
        """Apply the limits asked for.

        Raises:
            SandboxError: a limit no hierarchy can enforce, or the kernel refused it.
        """
        if memory is not None:
            path = self._require("memory", "memory")
            if path == self._v2:
                _write(path / "memory.max", str(memory))
                _write_optional(path / "memory.swap.max", "0")
            else:
                _write(path / "memory.limit_in_bytes", str(memory))
                _write_optional(path / "memory.memsw.limit_in_bytes", str(memory))
        if pids is not None:
            _write(self._require("pids", "the number of processes") / "pids.max", str(pids))
        if cpus is not None:
            path = self._require("cpu", "CPU")
            quota = max(1000, int(cpus * CFS_PERIOD_US))
            if path == self._v2:
                _write(path / "cpu.max", f"{quota} {CFS_PERIOD_US}")
            else:
                _write(path / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(path / "cpu.cfs_quota_us", str(quota))

    def pids(self) -> list[int]:
        """Every process of the run (host PIDs)."""
        seen: set[int] = set()
        for path in self.dirs:
            with contextlib.suppress(OSError):
                seen.update(int(p) for p in _read(path / "cgroup.procs").split())
        return sorted(seen)

    def _any_besides(self, exiting: int | None) -> bool:
        """Whether a process other than ``exiting`` is in the run's cgroups. One hierarchy
        tells: the run's processes are in its cgroup of each, and a process of the run cannot
        move itself out of one (cgroupfs is not delegated to the sandbox)."""
        if not self.dirs:
            return False
        with contextlib.suppress(OSError):
            return bool(set(map(int, _read(self.dirs[0] / "cgroup.procs").split())) - {exiting})
        return bool(set(self.pids()) - {exiting})

    def kill(self, *, exiting: int | None = None) -> None:
        """SIGKILL every process of the run, including ones forked meanwhile.

        Args:
            exiting: A process of the group known to be on its way out (the run's runner):
                alone, it is left to exit.
        """
        if not self._any_besides(exiting):
            # Nothing left can fork: skip cgroup.kill, which can block for hundreds of
            # milliseconds behind other cgroup operations on a busy host.
            return
        if self._v2 is not None and (self._v2 / "cgroup.kill").exists():
            _write(self._v2 / "cgroup.kill", "1")
            return
        freezer = self._v1.get("freezer")
        if freezer is not None:
            _write(freezer / "freezer.state", "FROZEN")
        try:
            for _ in range(100):
                victims = self.pids()
                if not victims:
                    break
                for pid in victims:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if freezer is not None:
                    break  # frozen: nothing forks; the kills land on thaw
        finally:
            if freezer is not None:
                _write(freezer / "freezer.state", "THAWED")

    def _memory_dir(self) -> Path | None:
        if self._v2 is not None and "memory" in self.hierarchies.unified_controllers:
            return self._v2
        return self._v1.get("memory")

    def accounting_files(self) -> tuple[Path | None, Path | None, Path | None]:
        """Where the run's use is read at its end, in this order: CPU time (v2 ``cpu.stat``,
        else v1 ``cpuacct.usage``), peak memory (``memory.peak`` or
        ``memory.max_usage_in_bytes``) and memory events (``memory.events`` or
        ``memory.oom_control``); None for what its cgroups do not have. Found once, by
        :meth:`setup`: a run asks twice (the runner's plan, the result)."""
        return self._files

    def _find_accounting_files(self) -> tuple[Path | None, Path | None, Path | None]:
        cpu: Path | None = None
        if self._v2 is not None:
            cpu = self._v2 / "cpu.stat"
        elif "cpuacct" in self._v1:
            cpu = self._v1["cpuacct"] / "cpuacct.usage"
        memory = self._memory_dir()
        if memory is None:
            return cpu, None, None
        if memory == self._v2:
            return cpu, memory / "memory.peak", memory / "memory.events"
        return cpu, memory / "memory.max_usage_in_bytes", memory / "memory.oom_control"

    def for_runner(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The directories the runner moves PID 1 into (and removes after it), and the
        accounting files it reads once PID 1 is gone (those that exist, in order)."""
        files = tuple(str(path) for path in self.accounting_files() if path is not None)
        return tuple(map(str, self.dirs)), files

    def accounting(
        self, texts: Sequence[str | None] | None = None
    ) -> tuple[ResourceUsage, dict[str, int]]:
        """CPU seconds, peak memory and the memory events (OOM kills, limit hits) of the run
        so far: from ``texts``, the runner's reading of :meth:`for_runner`'s files (None
        for one it could not read), or read now."""
        files = self.accounting_files()
        if texts is None:
            texts = [_read_optional(path) for path in files if path is not None]
        found = iter(texts)
        cpu_text, peak_text, events_text = (
            None if path is None else next(found, None) for path in files
        )
        cpu: float | None = None
        if cpu_text is not None and files[0] is not None:
            if files[0].name == "cpu.stat":
                usec = _keyed(cpu_text).get("usage_usec")
                cpu = None if usec is None else usec / 1e6
            else:
                with contextlib.suppress(ValueError):
                    cpu = int(cpu_text) / 1e9
        peak: int | None = None
        if peak_text is not None:
            with contextlib.suppress(ValueError):
                peak = int(peak_text)
        events = {} if events_text is None else _keyed(events_text)
        return ResourceUsage(cpu_seconds=cpu, peak_memory=peak), events

    def forget(self) -> None:
        """The directories are gone already (the runner removed them after the run)."""
        self.dirs.clear()

    def remove(self) -> None:
        """Kill what is left and remove every directory, deepest first (idempotent).

        Raises:
            SandboxError: a cgroup stayed busy past REMOVE_TIMEOUT.
        """
        self.kill()
        deadline = time.monotonic() + REMOVE_TIMEOUT
        for path in reversed(self.dirs):
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise SandboxError(
                            f"remove cgroup {path}: {exc.strerror}", details={"path": str(path)}
                        ) from exc
                    self.kill()
                    time.sleep(0.005)  # exiting processes leave the cgroup asynchronously
        self.dirs.clear()


def creation_error(path: Path, number: int) -> SandboxError:
    """The error for cgroup ``path`` that mkdir(2) refused with errno ``number``."""
    hint = (
        "run as root, or delegate a cgroup to runtimed (systemd Delegate=yes)"
        if number in (errno.EPERM, errno.EACCES)
        else None
    )
    return SandboxError(
        f"create cgroup {path}: {os.strerror(number)}", details={"path": str(path)}, hint=hint
    )


def make(paths: Sequence[Path]) -> None:
    """Create the directories :meth:`RunCgroup.setup` named with ``defer``, in order; those
    made are removed again when one fails.

    Raises:
        SandboxError: a directory could not be created.
    """
    for i, path in enumerate(paths):
        try:
            path.mkdir()
        except OSError as exc:
            for made in reversed(paths[:i]):
                made.rmdir()
            raise creation_error(path, exc.errno or errno.EIO) from exc


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise SandboxError(
            f"write {value!r} to {path}: {exc.strerror}", details={"path": str(path)}
        ) from exc


def _write_optional(path: Path, value: str) -> None:
    if path.exists():
        _write(path, value)


def _read(path: Path) -> str:
    """A cgroupfs file, read with plain read(2) calls: these are read after every run, and
    ``Path.read_text`` costs several times as much in interpreter work.

    Raises:
        OSError: as open(2) or read(2) failed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def _read_optional(path: Path) -> str | None:
    try:
        return _read(path)
    except OSError:
        return None


def _keyed(text: str) -> dict[str, int]:
    """``KEY VALUE`` lines (``cpu.stat``, ``memory.events``, ``memory.oom_control``)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def limited(*, pids: int | None, cpus: float | None) -> frozenset[str]:
    """The optional controllers limits need: ``pids`` and ``cpu`` (memory is always joined)."""
    return frozenset(name for name, limit in (("pids", pids), ("cpu", cpus)) if limit is not None)


def create(
    name: str,
    hierarchies: Hierarchies,
    *,
    memory: int | None = None,
    pids: int | None = None,
    cpus: float | None = None,
    limitable: frozenset[str] = frozenset(),
    defer: bool = False,
) -> RunCgroup:
    """The cgroups of a run named ``name`` in ``hierarchies`` (from :func:`detect`), limits
    applied; ``limitable``: the controllers (``cpu``, ``pids``) to join even without such a
    limit yet; remove() them when done. With ``defer``, named only (see
    :meth:`RunCgroup.setup`; no limits then).

    Raises:
        SandboxError: a cgroup could not be created or a requested limit cannot be enforced.
    """
    group = RunCgroup(hierarchies, f"runtimed-{name}")
    try:
        group.setup(limitable=limitable | limited(pids=pids, cpus=cpus), defer=defer)
        if not defer:
            group.limit(memory=memory, pids=pids, cpus=cpus)
    except BaseException:
        group.remove()
        raise
    return group
