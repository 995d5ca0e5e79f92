"""Pure. The one error hierarchy of runtimed, shared by the RPC, the CLI and the logs.

Every concrete class has a class-level ``code``: a stable dotted ``area.Name``. Codes are API:
never renamed or reused (``tests/unit/runtimed/test_errors.py`` checks that they are unique and
that every leaf has one). The varlink error name is ``io.runtimed.<Name>``, so the ``Name`` part
is unique across areas too.

This module is a leaf: it imports nothing from the project.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import ClassVar, Final

Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]

VARLINK_INTERFACE: Final = "io.runtimed"


class ExitArea(enum.IntEnum):
    """Exit status of ``runtimectl`` per error area (documented in the README)."""

    OK = 0
    FINDINGS = 1
    USAGE = 2
    FAILURE = 3
    PERMISSION = 4
    NOT_FOUND = 5
    PLATFORM = 6


class RuntimedError(Exception):
    """Root of every error runtimed raises on purpose.

    Args:
        message: One line naming the operation and the object ("mount overlay on /x: EPERM").
        details: JSON-able parameters, sent over the wire as the varlink error's parameters.
        hint: What the user can do about it, when we know.
    """

    code: ClassVar[str] = "internal.Internal"
    exit_area: ClassVar[ExitArea] = ExitArea.FAILURE

    def __init__(
        self,
        message: str,
        *,
        details: Mapping[str, Json] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Json] = dict(details or {})
        self.hint = hint

    @classmethod
    def varlink_name(cls) -> str:
        return f"{VARLINK_INTERFACE}.{cls.code.rpartition('.')[2]}"

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} (hint: {self.hint})"

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        if self.hint is not None:
            out["hint"] = self.hint
        return out

    @classmethod
    def rebuild(cls, message: str, details: Mapping[str, Json], hint: str | None) -> RuntimedError:
        """This class again from the parts ``to_json()`` or a wire error carried."""
        return cls(message, details=details, hint=hint)


class InternalError(RuntimedError):
    """A bug: the traceback is logged, never sent. Shares the root's code."""


# --- usage and configuration -------------------------------------------------------------------


class UsageError(RuntimedError):
    code = "usage.InvalidArgument"
    exit_area = ExitArea.USAGE


class ConfigError(RuntimedError):
    code = "config.InvalidConfig"
    exit_area = ExitArea.USAGE


class PermissionDeniedError(RuntimedError):
    code = "auth.PermissionDenied"
    exit_area = ExitArea.PERMISSION


class LimitExceededError(RuntimedError):
    code = "limits.LimitExceeded"


# --- platforms ---------------------------------------------------------------------------------


class PlatformError(RuntimedError):
    """A platform specifier that cannot be parsed."""

    code = "platform.InvalidPlatform"
    exit_area = ExitArea.USAGE


class UnsupportedPlatformError(RuntimedError):
    """A valid platform that runtimed (or QEMU) has no support for."""

    code = "platform.UnsupportedPlatform"
    exit_area = ExitArea.PLATFORM


class NonLinuxExecError(RuntimedError):
    """Exec requested for a platform whose OS is not Linux."""

    code = "platform.NonLinuxExec"
    exit_area = ExitArea.PLATFORM


class NoEmulatorError(RuntimedError):
    """A Linux platform the host cannot run natively and no working handler emulates."""

    code = "platform.NoEmulator"
    exit_area = ExitArea.PLATFORM


class PlatformMismatchError(RuntimedError):
    """The entrypoint binary is built for another platform than the one requested."""

    code = "platform.PlatformMismatch"
    exit_area = ExitArea.PLATFORM


# --- ELF ---------------------------------------------------------------------------------------


class ElfError(RuntimedError):
    """Not an ELF file, truncated, or not understood."""

    code = "elf.InvalidElf"


# --- binfmt_misc -------------------------------------------------------------------------------


class BinfmtError(RuntimedError):
    code = "binfmt.BinfmtFailed"


class BinfmtNotMountedError(BinfmtError):
    code = "binfmt.NotMounted"


class BinfmtEntryError(BinfmtError):
    """A register line or status text that is malformed or beyond the kernel's limits."""

    code = "binfmt.InvalidEntry"


class HandlerConflictError(BinfmtError):
    code = "binfmt.HandlerConflict"


class NativePlatformError(BinfmtError):
    """Refused: a handler for a platform the host runs natively would emulate native code."""

    code = "binfmt.NativeHandlerRefused"
    exit_area = ExitArea.PLATFORM


class InterpreterNotFoundError(BinfmtError):
    code = "binfmt.InterpreterNotFound"
    exit_area = ExitArea.NOT_FOUND


# --- kernel ------------------------------------------------------------------------------------


class KernelError(RuntimedError):
    """A system call failed. Carries the syscall, the path and the errno by name."""

    code = "kernel.SyscallFailed"

    def __init__(
        self,
        message: str,
        *,
        syscall: str,
        errno_name: str,
        path: str | None = None,
        flags: str | None = None,
        details: Mapping[str, Json] | None = None,
        hint: str | None = None,
    ) -> None:
        merged: dict[str, Json] = {"syscall": syscall, "errno": errno_name}
        if path is not None:
            merged["path"] = path
        if flags is not None:
            merged["flags"] = flags
        merged.update(details or {})
        super().__init__(message, details=merged, hint=hint)
        self.syscall = syscall
        self.errno_name = errno_name
        self.path = path
        self.flags = flags

    @classmethod
    def rebuild(cls, message: str, details: Mapping[str, Json], hint: str | None) -> RuntimedError:
        rest = dict(details)
        syscall, errno_name = rest.pop("syscall", "?"), rest.pop("errno", "?")
        path, flags = rest.pop("path", None), rest.pop("flags", None)
        return cls(
            message,
            syscall=str(syscall),
            errno_name=str(errno_name),
            path=path if isinstance(path, str) else None,
            flags=flags if isinstance(flags, str) else None,
            details=rest,
            hint=hint,
        )


# --- snapshots ---------------------------------------------------------------------------------


class SnapshotError(RuntimedError):
    code = "snapshot.SnapshotFailed"


class SnapshotNotFoundError(SnapshotError):
    code = "snapshot.SnapshotNotFound"
    exit_area = ExitArea.NOT_FOUND


class SnapshotInUseError(SnapshotError):
    code = "snapshot.SnapshotInUse"


class InvalidArchiveError(SnapshotError):
    """An archive or image that is corrupt, truncated, hostile or fails its digest."""

    code = "snapshot.InvalidArchive"


# --- sandbox -----------------------------------------------------------------------------------


class SandboxError(RuntimedError):
    code = "sandbox.SandboxFailed"


class InvalidSpecError(SandboxError):
    code = "sandbox.InvalidSpec"
    exit_area = ExitArea.USAGE


class ExecFailedError(SandboxError):
    """The sandbox was set up but the command could not be executed (not found, ENOEXEC)."""

    code = "sandbox.ExecFailed"


# --- RPC ---------------------------------------------------------------------------------------


class RpcError(RuntimedError):
    code = "rpc.RpcFailed"


class MalformedFrameError(RpcError):
    code = "rpc.MalformedFrame"


class InvalidParamsError(RpcError):
    """A message field is missing or of the wrong type; ``details['parameter']`` names it."""

    code = "rpc.InvalidParameter"
    exit_area = ExitArea.USAGE


class MethodNotFoundError(RpcError):
    code = "rpc.MethodNotFound"


class DaemonUnavailableError(RpcError):
    code = "rpc.DaemonUnavailable"


def all_error_classes() -> list[type[RuntimedError]]:
    """Every class of the hierarchy, root included, in definition order."""
    seen: list[type[RuntimedError]] = []
    stack: list[type[RuntimedError]] = [RuntimedError]
    while stack:
        cls = stack.pop(0)
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def error_class_for_code(code: str) -> type[RuntimedError]:
    """The class whose code is ``code``; unknown codes map to InternalError (the client side)."""
    for cls in all_error_classes()[1:]:
        if "code" in vars(cls) and cls.code == code:
            return cls
    return InternalError


def error_from_json(obj: Json, *, fallback: str) -> RuntimedError:
    """Rebuild an error from its ``to_json()`` record (a helper's status report) as its class.

    Args:
        obj: The record; anything that is not one becomes an InternalError.
        fallback: The message to use when the record carries none.
    """
    if not isinstance(obj, dict):
        return InternalError(f"{fallback}: malformed error record {obj!r}")
    code, message, details, hint = (obj.get(k) for k in ("code", "message", "details", "hint"))
    return error_class_for_code(code if isinstance(code, str) else "").rebuild(
        message if isinstance(message, str) else fallback,
        details if isinstance(details, dict) else {},
        hint if isinstance(hint, str) else None,
    )


def leaf_exceptions(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside ``group`` and its nested groups, in order (nurseries nest them)."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += leaf_exceptions(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside (nested) groups, or the group itself when there are more."""
    leaves = leaf_exceptions(group)
    return leaves[0] if len(leaves) == 1 else group
