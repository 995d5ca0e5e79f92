"""Pure. The plan as the native runner reads it, and the status lines it writes back.

The runner (``sandbox/native/runner.c``) reads the plan in two halves (:class:`EncodedPlan`),
each NUL-terminated tokens in a fixed order, with a count before every list; nothing in a
plan may contain a NUL byte (argv, environment, paths and file contents can't reach
``execve`` or the kernel with one anyway). It answers with one JSON
object per line on its status fd; byte strings (paths, the command's image) travel as hex,
since any byte string is a Linux path but not every one is valid JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from runtimed.errors import Json, SandboxError
from sandbox.plan import (
    BindMount,
    DevptsMount,
    FileMount,
    MaskPath,
    Op,
    Plan,
    ProcMount,
    ReadonlyPath,
    Symlink,
    SysfsMount,
    TmpfsMount,
)

SHAPE_MAGIC: Final = "runtimed-shape-1"
COMMAND_MAGIC: Final = "runtimed-command-1"


def _op_tokens(op: Op) -> list[str | int]:
    if isinstance(op, BindMount):
        return ["bind", op.source, op.destination, int(op.readonly)]
    if isinstance(op, TmpfsMount):
        return ["tmpfs", op.destination, op.mode, op.size or 0, int(op.noexec), int(op.nodev)]
    if isinstance(op, Symlink):
        return ["symlink", op.target, op.destination]
    if isinstance(op, FileMount):
        return ["file", op.destination, op.content]
    if isinstance(op, ProcMount | SysfsMount | DevptsMount | MaskPath | ReadonlyPath):
        return [op.kind, op.destination]
    raise SandboxError(f"the native runner has no executor for {op.describe()}")


def _items(*items: str | int) -> tuple[str | int, ...]:
    return items


def _shape_tokens(plan: Plan, uid_map: str, gid_map: str) -> Iterator[str | int]:
    yield SHAPE_MAGIC
    yield from _items("overlay", plan.root.options(), "workspace", plan.workspace)
    yield from _items("scratch", int(plan.scratch))
    yield from _items("namespaces", len(plan.namespaces), *plan.namespaces)
    yield from _items("hostname", plan.hostname, "loopback", int(plan.loopback))
    yield from _items("uid_map", uid_map, "gid_map", gid_map)
    yield from _items("binfmt", len(plan.binfmt), *plan.binfmt)
    yield from _items("ops", len(plan.ops))
    for op in plan.ops:
        yield from _op_tokens(op)
    yield from _cgroups_tokens(plan.cgroups, plan.accounting)


def _cgroups_tokens(cgroups: Sequence[str], accounting: Sequence[str]) -> Iterator[str | int]:
    """The end of a shape: last, so that :func:`join_cgroups` can add them to a shape."""
    yield from _items("cgroups", len(cgroups), *cgroups)
    yield from _items("accounting", len(accounting), *accounting)
    yield "end"


def _command_tokens(plan: Plan, capabilities: int) -> Iterator[str | int]:
    yield COMMAND_MAGIC
    yield from _items("cwd", plan.cwd, "uid", plan.uid, "gid", plan.gid)
    yield from _items("groups", len(plan.groups), *plan.groups)
    yield from _items("rlimits", len(plan.rlimits))
    for limit in plan.rlimits:
        yield from _items(limit.name, limit.soft, limit.hard)
    yield from _items("capabilities", capabilities)
    yield from _items("argv", len(plan.argv), *plan.argv)
    yield from _items("env", len(plan.env), *(f"{key}={value}" for key, value in plan.env))
    yield "end"


def _encode(tokens: Iterator[str | int]) -> bytes:
    out = bytearray()
    for item in tokens:
        if isinstance(item, int):
            if not 0 <= item < 1 << 64:
                raise SandboxError(f"sandbox plan value {item} is out of range")
            data = str(item).encode()
        else:
            data = item.encode("utf-8", "surrogateescape")
            if b"\0" in data:
                raise SandboxError(f"sandbox plan value {item!r} contains a NUL byte")
        out += data + b"\0"
    return bytes(out)


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedPlan:
    """A plan in the runner's two halves.

    ``shape``: the sandbox (namespaces, cgroups to join, the root and its mounts), read first;
    ``command``: what runs in it, read by PID 1 once the sandbox is built. Plans whose shapes
    are equal once their cgroups are left out build the same sandbox, so a runner that built
    one ahead of time, in cgroups of its own, can take the command of any of them.
    """

    shape: bytes
    command: bytes


def encode_shape(plan: Plan, *, uid_map: str = "", gid_map: str = "") -> bytes:
    """The first half of ``plan``: for a plan with a user namespace, with the ID maps its
    parent writes (``/proc/PID/uid_map`` text).

    Raises:
        SandboxError: a value holds a NUL byte, or a number is negative or beyond 64 bits.
    """
    return _encode(_shape_tokens(plan, uid_map, gid_map))


_NO_CGROUPS: Final = _encode(_cgroups_tokens((), ()))
"""The end of a shape encoded without cgroups."""


def join_cgroups(shape: bytes, cgroups: Sequence[str], accounting: Sequence[str]) -> bytes:
    """``shape``, encoded without cgroups, now with ``cgroups`` to join and their
    ``accounting`` files to read at the end: the launcher encodes a sandbox's shape once and
    adds each run's cgroups to it.

    Raises:
        SandboxError: ``shape`` names cgroups already, or a path holds a NUL byte.
    """
    if not shape.endswith(_NO_CGROUPS):
        raise SandboxError("sandbox shape already names its cgroups")
    return shape[: -len(_NO_CGROUPS)] + _encode(_cgroups_tokens(cgroups, accounting))


def encode_plan(
    plan: Plan, *, capabilities: int, uid_map: str = "", gid_map: str = ""
) -> EncodedPlan:
    """Both halves of ``plan``, its capabilities as a bit mask (see :func:`encode_shape`).

    Raises:
        SandboxError: a value holds a NUL byte, or a number is negative or beyond 64 bits.
    """
    return EncodedPlan(
        shape=encode_shape(plan, uid_map=uid_map, gid_map=gid_map),
        command=_encode(_command_tokens(plan, capabilities)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFailed:
    """A set-up step failed (the runner exits 125): the system call, its errno, the path it
    was given, its flags, and the index of the plan op being applied (None outside them)."""

    syscall: str
    errno: int
    path: str | None
    flags: int | None
    op: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecFailed:
    """``execve`` of the command failed (exit 127 for ENOENT, else 126)."""

    errno: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Started:
    """The command was exec'd: its PID in the sandbox and ``/proc/PID/exe`` of the new image."""

    pid: int
    exe: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Exited:
    """The command exited with ``code``, or was killed by ``signal``."""

    code: int | None
    signal: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished:
    """PID 1 was reaped: the PID namespace is empty. ``accounting``: the text of each of the
    plan's accounting files, read then (None for one that could not be read). The runner
    removes the run's cgroups next, and exits 0 if it removed them all."""

    accounting: tuple[str | None, ...]


Status = StepFailed | ExecFailed | Started | Exited | Finished


def _optional_int(message: dict[str, Json], name: str) -> int | None:
    value = message.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise SandboxError(f"sandbox runner status: {name} must be an integer: {message!r}")
    return value


def _int(message: dict[str, Json], name: str) -> int:
    value = _optional_int(message, name)
    if value is None:
        raise SandboxError(f"sandbox runner status: {name} must be an integer: {message!r}")
    return value


def _hex(message: dict[str, Json], name: str) -> str | None:
    return _decode_hex(message.get(name), name, message)


def _decode_hex(value: Json, name: str, message: dict[str, Json]) -> str | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return bytes.fromhex(value).decode("utf-8", "surrogateescape")
    except ValueError:
        raise SandboxError(f"sandbox runner status: {name} must be hex: {message!r}") from None


def parse_status(line: bytes) -> Status:
    """One status line of the runner.

    Raises:
        SandboxError: not a status message the runner writes.
    """
    try:
        message = json.loads(line)
    except ValueError:
        raise SandboxError(f"sandbox runner status is not JSON: {line!r}") from None
    if not isinstance(message, dict):
        raise SandboxError(f"sandbox runner status is not an object: {line!r}")
    kind = message.get("type")
    if kind == "error" and isinstance(message.get("syscall"), str):
        return StepFailed(
            syscall=str(message["syscall"]),
            errno=_int(message, "errno"),
            path=_hex(message, "path"),
            flags=_optional_int(message, "flags"),
            op=_optional_int(message, "op"),
        )
    if kind == "exec_error":
        return ExecFailed(errno=_int(message, "errno"))
    if kind == "started":
        return Started(pid=_int(message, "pid"), exe=_hex(message, "exe") or "")
    if kind == "finished":
        texts = message.get("accounting")
        if not isinstance(texts, list):
            raise SandboxError(f"sandbox runner status: accounting must be a list: {message!r}")
        return Finished(accounting=tuple(_decode_hex(t, "accounting", message) for t in texts))
    if kind == "exited":
        return Exited(code=_optional_int(message, "code"), signal=_optional_int(message, "signal"))
    raise SandboxError(f"sandbox runner status of unknown type: {line!r}")
