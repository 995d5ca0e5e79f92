"""Pure. Turn a resolved exec request into a plan: the data the sandbox runner executes.

A :class:`Plan` says which namespaces to create, the overlay root (snapshot layers + the run's
upper and work dirs), the ordered mount operations applied under the new root, and what to exec
as whom. Every op has ``describe()`` (logged in debug mode, and named by an error in its step);
:mod:`sandbox.wire` encodes the plan for the native runner (``sandbox/native/runner.c``).

The default profile follows Docker/runc and bubblewrap: fresh ``/proc`` (nosuid, noexec, nodev)
with Docker's masked and read-only paths, ``/dev`` as a tmpfs with device nodes bound from the
host (mknod is EPERM outside the initial user namespace), a new devpts instance, ``/dev/shm``,
a read-only ``/sys``, and ``/etc/resolv.conf``, ``/etc/hosts`` and ``/etc/hostname`` provided.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from runtimed.errors import SandboxError
from sandbox.spec import BindSpec, ExecSpec, Identity, Network, Rlimit, TmpfsSpec

# Docker's default capability set (moby oci/caps/defaults.go): 14 capabilities, CAP_MKNOD
# included because build tools create device nodes (debootstrap's second stage checks it).
DEFAULT_CAPABILITIES: Final = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
# Docker's default masked and read-only paths (moby oci/defaults.go).
MASKED_PATHS: Final = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS: Final = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# Bound from the host's /dev: the same nodes Docker and bubblewrap provide.
DEVICES: Final = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS: Final[Mapping[str, str]] = {
    "/dev/fd": "/proc/self/fd",
    "/dev/stdin": "/proc/self/fd/0",
    "/dev/stdout": "/proc/self/fd/1",
    "/dev/stderr": "/proc/self/fd/2",
    "/dev/ptmx": "pts/ptmx",
}
HOSTS: Final = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
# Overlay options, Documentation/filesystems/overlayfs.rst: "userxattr" stores overlay
# metadata (whiteouts, opaque dirs) as user.overlay.* xattrs, which is what the store's layer
# directories use and what a mount inside a user namespace requires; "index" and "metacopy"
# need trusted.* xattrs and are refused with userxattr, so both are off explicitly rather than
# left to kernel or module defaults. "volatile" ("Volatile mount") omits every sync of the
# upper file system, including the syncfs of the whole host file system that unmounting the
# overlay otherwise does when a run ends (milliseconds of disk flush per run, more on a busy
# host): the upper directory is scratch, removed after the run, and a commit syncs the store
# itself (``syncfs`` before the new layer is renamed in).
OVERLAY_OPTIONS: Final = ("userxattr", "index=off", "metacopy=off", "volatile")
NAMESPACES: Final = frozenset({"user", "mount", "pid", "uts", "ipc", "net", "cgroup"})


def _depth(path: str) -> int:
    return len([part for part in path.split("/") if part])


class Op:
    """A mount operation below the new root; ``destination`` is a path inside the sandbox."""

    kind: ClassVar[str]
    destination: str

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, slots=True, kw_only=True)
class BindMount(Op):
    """Bind a host path (absolute, seen before pivot_root) onto ``destination``."""

    kind: ClassVar[str] = "bind"
    source: str
    destination: str
    readonly: bool = False

    def describe(self) -> str:
        return f"bind {self.source} on {self.destination}{' (ro)' if self.readonly else ''}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TmpfsMount(Op):
    kind: ClassVar[str] = "tmpfs"
    destination: str
    size: int | None = None
    mode: int = 0o755
    noexec: bool = False
    nodev: bool = True

    def describe(self) -> str:
        size = f" size={self.size}" if self.size else ""
        return f"tmpfs on {self.destination} mode={self.mode:o}{size}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcMount(Op):
    """A fresh procfs of the new PID namespace, nosuid, noexec, nodev."""

    kind: ClassVar[str] = "proc"
    destination: str = "/proc"

    def describe(self) -> str:
        return f"proc on {self.destination} (nosuid,noexec,nodev)"


@dataclass(frozen=True, slots=True, kw_only=True)
class SysfsMount(Op):
    """A read-only sysfs (a read-only bind of the host's when the net namespace forbids it)."""

    kind: ClassVar[str] = "sysfs"
    destination: str = "/sys"

    def describe(self) -> str:
        return f"sysfs on {self.destination} (ro)"


@dataclass(frozen=True, slots=True, kw_only=True)
class DevptsMount(Op):
    """A new devpts instance, so ptys of the sandbox are its own."""

    kind: ClassVar[str] = "devpts"
    destination: str = "/dev/pts"

    def describe(self) -> str:
        return f"devpts on {self.destination} (newinstance)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Symlink(Op):
    kind: ClassVar[str] = "symlink"
    target: str
    destination: str

    def describe(self) -> str:
        return f"symlink {self.destination} -> {self.target}"


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskPath(Op):
    """Hide a path: /dev/null over a file, an empty read-only tmpfs over a directory."""

    kind: ClassVar[str] = "mask"
    destination: str

    def describe(self) -> str:
        return f"mask {self.destination}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadonlyPath(Op):
    """Bind a path onto itself read-only (if it exists)."""

    kind: ClassVar[str] = "readonly"
    destination: str

    def describe(self) -> str:
        return f"read-only {self.destination}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FileMount(Op):
    """Write ``content`` into the runner's workspace and bind it onto ``destination``."""

    kind: ClassVar[str] = "file"
    destination: str
    content: str

    def describe(self) -> str:
        return f"file {self.destination} ({len(self.content)} bytes)"


@dataclass(frozen=True, slots=True, kw_only=True)
class OverlayMount:
    """The sandbox's root: the snapshot's layers (lowest first) under the run's upper dir."""

    layers: tuple[str, ...]
    upper: str
    work: str

    def options(self) -> str:
        # lowerdir lists the top layer first (overlayfs.rst, "Multiple lower layers").
        lower = ":".join(reversed(self.layers))
        return ",".join(
            (
                f"lowerdir={lower}",
                f"upperdir={self.upper}",
                f"workdir={self.work}",
                *OVERLAY_OPTIONS,
            )
        )

    def describe(self) -> str:
        return f"overlay root: {len(self.layers)} layer(s), upper {self.upper}"


def optimize(ops: Sequence[Op]) -> list[Op]:
    """Order ops by destination depth (stable) and drop binds that change nothing.

    A bind is redundant when a later op mounts on the same destination (it would be hidden),
    or when a shallower bind already covers it with the same source subtree and the same
    read-only flag (mkosi ``FSOperation.optimize``).
    """
    kept: list[Op] = []
    for i, op in enumerate(ops):
        if isinstance(op, BindMount):
            if any(later.destination == op.destination for later in ops[i + 1 :]):
                continue
            if any(_covers(other, op) for other in ops if other is not op):
                continue
        kept.append(op)
    return sorted(kept, key=lambda op: _depth(op.destination))


def _covers(outer: Op, inner: BindMount) -> bool:
    if not isinstance(outer, BindMount) or outer.readonly != inner.readonly:
        return False
    if not inner.destination.startswith(outer.destination.rstrip("/") + "/"):
        return False
    relative = inner.destination[len(outer.destination.rstrip("/")) :]
    return inner.source == outer.source.rstrip("/") + relative


def default_ops(*, hostname: str, resolv_conf: str, shm_size: int) -> list[Op]:
    """The default profile's mounts (see the module docstring)."""
    ops: list[Op] = [
        ProcMount(),
        *(MaskPath(destination=path) for path in MASKED_PATHS),
        *(ReadonlyPath(destination=path) for path in READONLY_PATHS),
        TmpfsMount(destination="/dev", mode=0o755, nodev=False),
        *(BindMount(source=f"/dev/{name}", destination=f"/dev/{name}") for name in DEVICES),
        *(Symlink(target=target, destination=link) for link, target in DEV_LINKS.items()),
        DevptsMount(),
        TmpfsMount(destination="/dev/shm", size=shm_size, mode=0o1777, noexec=True),
        SysfsMount(),
        FileMount(destination="/etc/resolv.conf", content=resolv_conf),
        FileMount(destination="/etc/hosts", content=f"{HOSTS}127.0.1.1\t{hostname}\n"),
        FileMount(destination="/etc/hostname", content=f"{hostname}\n"),
    ]
    return ops


def _request_ops(mounts: Sequence[BindSpec], tmpfs: Sequence[TmpfsSpec]) -> list[Op]:
    ops: list[Op] = [
        BindMount(source=m.source, destination=m.destination, readonly=m.readonly) for m in mounts
    ]
    ops.extend(TmpfsMount(destination=t.destination, size=t.size, mode=0o1777) for t in tmpfs)
    return ops


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Everything the runner needs (:func:`sandbox.wire.encode_plan`)."""

    root: OverlayMount
    workspace: str
    namespaces: tuple[str, ...]
    hostname: str
    loopback: bool
    ops: tuple[Op, ...]
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    rlimits: tuple[Rlimit, ...]
    capabilities: tuple[str, ...]
    cgroups: tuple[str, ...]
    binfmt: tuple[str, ...] = ()
    accounting: tuple[str, ...] = ()
    """Files in ``cgroups`` the runner reads once PID 1 is gone, for the run's resource use."""
    scratch: bool = False
    """Upper and work directories on the workspace tmpfs (made there by the runner)."""

    def describe(self) -> list[str]:
        """One line per step, in execution order (logged by the launcher in debug mode)."""
        return [self.root.describe(), *(op.describe() for op in self.ops)]


def build_plan(
    *,
    spec: ExecSpec,
    layers: Sequence[str],
    run_dir: str,
    scratch: bool = False,
    argv: Sequence[str],
    env: Mapping[str, str],
    identity: Identity,
    resolv_conf: str,
    cgroups: Sequence[str],
    cgroup_namespace: bool,
    binfmt: Sequence[str] = (),
) -> Plan:
    """The plan for one run of ``spec`` over ``layers`` with ``run_dir``'s upper and work.

    With ``scratch``, ``run_dir`` is only where the run's private tmpfs (the workspace) is
    mounted, in the run's own mount namespace, so one directory serves every run: the upper
    and work directories are made on that tmpfs and go with it. Without, they are on disk in
    ``run_dir`` (a commit turns the upper directory into a layer) and the workspace is
    ``run_dir/mnt``.

    ``binfmt`` register lines make the emulation hermetic: the sandbox gets a user namespace
    of its own (identity-mapped) whose private binfmt_misc instance holds them (Linux >= 6.7).

    Raises:
        SandboxError: a layer or run path the overlay options cannot express.
    """
    for path in (*layers, run_dir):
        if any(c in path for c in ":,\n") or not path.startswith("/"):
            raise SandboxError(
                f"invalid sandbox plan: layer path {path!r} cannot be an overlay directory",
                details={"field": "layers"},
            )
    namespaces = ["user"] if binfmt else []
    namespaces += ["mount", "pid", "uts", "ipc"]
    if spec.network is Network.NONE:
        namespaces.append("net")
    if cgroup_namespace:
        namespaces.append("cgroup")
    ops = [
        *default_ops(hostname=spec.hostname, resolv_conf=resolv_conf, shm_size=spec.shm_size),
        *_request_ops(spec.mounts, spec.tmpfs),
    ]
    return Plan(
        root=OverlayMount(layers=tuple(layers), upper=f"{run_dir}/upper", work=f"{run_dir}/work"),
        workspace=run_dir if scratch else f"{run_dir}/mnt",
        scratch=scratch,
        namespaces=tuple(namespaces),
        hostname=spec.hostname,
        loopback=spec.network is Network.NONE,
        ops=tuple(optimize(ops)),
        argv=tuple(argv),
        env=tuple(env.items()),
        cwd=spec.cwd or "/",
        uid=identity.uid,
        gid=identity.gid,
        groups=identity.groups,
        rlimits=spec.rlimits,
        capabilities=DEFAULT_CAPABILITIES,
        cgroups=tuple(cgroups),
        binfmt=tuple(binfmt),
    )
