"""IO: the method table: validates each call's parameters and shapes its replies.

The capabilities themselves (binfmt_misc, the snapshot store, the sandbox) sit behind the
:class:`Backend` protocol: :mod:`runtimed.backend` implements it with the real modules, the
component tests with a fake. Handlers own only what is about the wire: parameter types,
descriptor hand-over, base64 output chunks no larger than a message allows, and the exec
concurrency limit.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Final, Protocol

from runtimed.config import Limits
from runtimed.errors import (
    VARLINK_INTERFACE,
    InvalidParamsError,
    Json,
    LimitExceededError,
    MethodNotFoundError,
    PermissionDeniedError,
)
from runtimed.interface import (
    MAX_SOURCE_NAME,
    SERVICE_DESCRIPTION,
    SERVICE_INTERFACE,
    is_source_name,
)
from runtimed.server import Handler, Request

log = logging.getLogger(__name__)

OutputSink = Callable[[str, bytes], Awaitable[None]]
"""Receives ("stdout" | "stderr", bytes) in the order the sandbox read them."""
ProgressSink = Callable[[Mapping[str, Json]], Awaitable[None]]

EXPORT_FORMATS: Final = ("tar", "oci")
# Room left in a message for the JSON around one base64 chunk.
_ENVELOPE: Final = 256


class Backend(Protocol):
    """The capabilities the daemon serves (IO seam)."""

    async def get_platforms(self) -> dict[str, Json]: ...

    async def check_binfmt(self) -> dict[str, Json]: ...

    async def install_emulators(
        self, platforms: list[str] | None, *, force: bool
    ) -> dict[str, Json]: ...

    async def uninstall_emulators(self, platforms: list[str] | None) -> dict[str, Json]: ...

    async def import_snapshot(
        self, fd: int, *, platform: str | None, source: str | None, progress: ProgressSink
    ) -> dict[str, Json]:
        """``source``: the client's name for what it sends, to record (None: the daemon's)."""
        ...

    async def list_snapshots(self) -> list[Json]: ...

    async def inspect_snapshot(self, snapshot_id: str) -> dict[str, Json]: ...

    async def remove_snapshot(self, snapshot_id: str) -> None: ...

    async def export_snapshots(self, snapshot_ids: list[str], fd: int, *, fmt: str) -> int: ...

    async def collect_garbage(self) -> list[str]: ...

    async def exec(self, spec: Mapping[str, Json], output: OutputSink) -> dict[str, Json]: ...


@dataclass(slots=True)
class ExecGate:
    """Counts running execs against ``limits().concurrent_execs`` (re-read on each exec)."""

    limits: Callable[[], Limits]
    running: int = 0

    def enter(self) -> None:
        limit = self.limits().concurrent_execs
        if self.running >= limit:
            raise LimitExceededError(
                f"{limit} execs are already running",
                details={"limit": "concurrent_execs", "value": limit},
                hint="retry later, or raise limits.concurrent_execs in runtimed.toml",
            )
        self.running += 1

    def leave(self) -> None:
        self.running -= 1


def _string(params: Mapping[str, Json], name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidParamsError(f"{name} must be a non-empty string", details={"parameter": name})
    return value


def _optional_string(params: Mapping[str, Json], name: str) -> str | None:
    return None if params.get(name) is None else _string(params, name)


def _source_name(params: Mapping[str, Json]) -> str | None:
    value = _optional_string(params, "source")
    if value is not None and not is_source_name(value):
        raise InvalidParamsError(
            f"source must be printable and at most {MAX_SOURCE_NAME} characters",
            details={"parameter": "source"},
        )
    return value


def _strings(params: Mapping[str, Json], name: str) -> list[str]:
    value = params.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise InvalidParamsError(
            f"{name} must be a non-empty list of non-empty strings", details={"parameter": name}
        )
    return [str(v) for v in value]


def _platforms(params: Mapping[str, Json]) -> list[str] | None:
    return None if params.get("platforms") is None else _strings(params, "platforms")


def _bool(params: Mapping[str, Json], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InvalidParamsError(f"{name} must be a boolean", details={"parameter": name})
    return value


def _no_parameters(params: Mapping[str, Json]) -> None:
    if params:
        name = sorted(params)[0]
        raise InvalidParamsError(f"unexpected parameter {name!r}", details={"parameter": name})


def method_table(
    backend: Backend,
    *,
    description: str,
    limits: Callable[[], Limits],
    gate: ExecGate,
) -> dict[str, Handler]:
    """Every method the daemon serves, by fully qualified name.

    Args:
        backend: The capabilities.
        description: The text of ``io.runtimed.varlink``.
        limits: The current limits (message size bounds the output chunks).
        gate: The exec concurrency counter (shared so the daemon can report it).
    """
    descriptions = {SERVICE_INTERFACE: SERVICE_DESCRIPTION, VARLINK_INTERFACE: description}
    version = _version()  # reading package metadata takes milliseconds: once

    async def get_info(request: Request) -> dict[str, Json]:
        _no_parameters(request.parameters)
        return {
            "vendor": "runtimed",
            "product": "runtimed",
            "version": version,
            "url": "",
            "interfaces": list(descriptions),
        }

    async def get_interface_description(request: Request) -> dict[str, Json]:
        interface = _string(request.parameters, "interface")
        if interface not in descriptions:
            raise MethodNotFoundError(
                f"no interface {interface} here", details={"interface": interface}
            )
        return {"description": descriptions[interface]}

    async def get_platforms(request: Request) -> dict[str, Json]:
        _no_parameters(request.parameters)
        return {"report": await backend.get_platforms()}

    async def check_binfmt(request: Request) -> dict[str, Json]:
        _no_parameters(request.parameters)
        return await backend.check_binfmt()

    async def install_emulators(request: Request) -> dict[str, Json]:
        platforms = _platforms(request.parameters)
        force = _bool(request.parameters, "force")
        return await backend.install_emulators(platforms, force=force)

    async def uninstall_emulators(request: Request) -> dict[str, Json]:
        return await backend.uninstall_emulators(_platforms(request.parameters))

    async def import_snapshot(request: Request) -> dict[str, Json]:
        platform = _optional_string(request.parameters, "platform")
        source = _source_name(request.parameters)
        fd = request.take_fd("fileDescriptor")
        try:

            async def progress(state: Mapping[str, Json]) -> None:
                await request.progress({"progress": dict(state)})

            snapshot = await backend.import_snapshot(
                fd, platform=platform, source=source, progress=progress
            )
        finally:
            os.close(fd)
        return {"snapshot": snapshot}

    async def list_snapshots(request: Request) -> dict[str, Json]:
        _no_parameters(request.parameters)
        return {"snapshots": await backend.list_snapshots()}

    async def inspect_snapshot(request: Request) -> dict[str, Json]:
        snapshot_id = _string(request.parameters, "id")
        return {"snapshot": await backend.inspect_snapshot(snapshot_id)}

    async def remove_snapshot(request: Request) -> dict[str, Json]:
        snapshot_id = _string(request.parameters, "id")
        await backend.remove_snapshot(snapshot_id)
        return {}

    async def export_snapshot(request: Request) -> dict[str, Json]:
        ids = _strings(request.parameters, "ids")
        fmt = _optional_string(request.parameters, "format") or "tar"
        if fmt not in EXPORT_FORMATS:
            raise InvalidParamsError(
                f"format must be one of {', '.join(EXPORT_FORMATS)}",
                details={"parameter": "format"},
            )
        fd = request.take_fd("fileDescriptor")
        try:
            size = await backend.export_snapshots(ids, fd, fmt=fmt)
        finally:
            os.close(fd)
        return {"size": size}

    async def collect_garbage(request: Request) -> dict[str, Json]:
        _no_parameters(request.parameters)
        return {"removed": list[Json](await backend.collect_garbage())}

    async def exec_(request: Request) -> dict[str, Json]:
        spec = request.parameters.get("spec")
        if not isinstance(spec, dict):
            raise InvalidParamsError("spec must be an object", details={"parameter": "spec"})
        if not request.more:
            raise InvalidParamsError(
                "Exec streams its output: call it with more",
                details={"parameter": "more"},
            )
        if spec.get("mounts") and request.peer.uid != 0:
            # A bind mount names a host path, which the daemon would open with root's rights.
            raise PermissionDeniedError(
                "bind mounts of host paths are only for root clients",
                details={"uid": request.peer.uid},
            )
        # base64 grows 3 bytes to 4: keep each chunk's reply within the message size.
        chunk = max(3, (limits().message_size - _ENVELOPE) // 4 * 3)

        async def output(stream: str, data: bytes) -> None:
            for start in range(0, len(data), chunk):
                piece = base64.b64encode(data[start : start + chunk]).decode("ascii")
                await request.progress({"stream": stream, "data": piece})

        gate.enter()
        try:
            result = await backend.exec(spec, output)
        finally:
            gate.leave()
        return {"result": result}

    table: dict[str, Handler] = {
        f"{SERVICE_INTERFACE}.GetInfo": get_info,
        f"{SERVICE_INTERFACE}.GetInterfaceDescription": get_interface_description,
        "GetPlatforms": get_platforms,
        "CheckBinfmt": check_binfmt,
        "InstallEmulators": install_emulators,
        "UninstallEmulators": uninstall_emulators,
        "ImportSnapshot": import_snapshot,
        "ListSnapshots": list_snapshots,
        "InspectSnapshot": inspect_snapshot,
        "RemoveSnapshot": remove_snapshot,
        "ExportSnapshot": export_snapshot,
        "CollectGarbage": collect_garbage,
        "Exec": exec_,
    }
    return {
        (name if "." in name else f"{VARLINK_INTERFACE}.{name}"): handler
        for name, handler in table.items()
    }


def _version() -> str:
    try:
        return metadata.version("runtimed")
    except metadata.PackageNotFoundError:
        return "unknown"
