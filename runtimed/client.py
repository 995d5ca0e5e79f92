"""IO: the Python client of the runtimed daemon (trio), plus a small synchronous wrapper.

This is the API a Python build frontend imports::

    async with open_client(Path("/run/runtimed/runtimed.sock")) as client:
        report = await client.get_platforms()
        async with client.open_exec({"snapshot": sid, "argv": ["uname", "-m"]}) as events:
            async for event in events:
                if isinstance(event, ExecOutput):
                    sys.stdout.buffer.write(event.data)
                else:
                    print(event.result["exit_status"])

Error replies come back as the exceptions of :mod:`runtimed.errors` the daemon raised
(through :func:`runtimed.interface.error_from_reply`). Files travel as descriptors (SCM_RIGHTS)
with the call, so the daemon never opens a path of ours with its own rights. Leaving
:meth:`Client.open_exec` before the final reply closes the connection, which makes the daemon
cancel the exec and kill its process tree.
"""

from __future__ import annotations

import array
import base64
import errno
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import trio

from runtimed.config import Config
from runtimed.errors import (
    DaemonUnavailableError,
    InvalidParamsError,
    Json,
    MalformedFrameError,
    PermissionDeniedError,
    RpcError,
    UsageError,
)
from runtimed.interface import error_from_reply
from runtimed.protocol import EOF, NEED_DATA, Call, Connection, Reply, Role

DEFAULT_SOCKET: Final = Config().socket
CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 1.0
RECEIVE_SIZE: Final = 65536
MAX_MESSAGE_SIZE: Final = Config().limits.message_size

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecOutput:
    """A chunk of the command's output, in the order the daemon read it."""

    stream: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecResult:
    """The final reply: exit status, execution report and resource use."""

    result: dict[str, Json]


ExecEvent = ExecOutput | ExecResult


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecOutcome:
    """Everything an exec produced, collected (:meth:`Client.exec`)."""

    stdout: bytes
    stderr: bytes
    result: dict[str, Json] = field(default_factory=dict)


class ReplyStream:
    """The replies of one ``more`` call: (parameters, continues) pairs, the last one final."""

    def __init__(self, receive: Callable[[], Awaitable[Reply]]) -> None:
        self._receive = receive
        self.done = False

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> tuple[dict[str, Json], bool]:
        if self.done:
            raise StopAsyncIteration
        reply = await self._receive()
        self.done = not reply.continues
        return dict(reply.parameters), reply.continues


class ExecStream:
    """An exec's events: :class:`ExecOutput` chunks, then one :class:`ExecResult`."""

    def __init__(self, replies: ReplyStream) -> None:
        self._replies = replies

    def __aiter__(self) -> ExecStream:
        return self

    async def __anext__(self) -> ExecEvent:
        reply, continues = await self._replies.__anext__()
        if not continues:
            return ExecResult(result=_expect(reply, "result", dict))
        return ExecOutput(
            stream=_expect(reply, "stream", str), data=_base64(_expect(reply, "data", str))
        )


class Client:
    """One connection to the daemon; one call at a time (calls are serialised).

    Args:
        stream: A connected stream; descriptors can be passed only on a ``trio.SocketStream``.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._codec = Connection(Role.CLIENT, max_frame_size=MAX_MESSAGE_SIZE)
        self._lock = trio.Lock()

    async def aclose(self) -> None:
        await self.stream.aclose()

    # --- generic calls --------------------------------------------------------------------

    async def call(
        self, method: str, parameters: Mapping[str, Json] | None = None, *, fds: Sequence[int] = ()
    ) -> dict[str, Json]:
        """Call a method and return its reply's parameters.

        Raises:
            RuntimedError: the daemon's error, as the class it raised.
            DaemonUnavailableError: the connection broke.
        """
        async with self._lock:
            await self._send(Call(method=method, parameters=dict(parameters or {})), fds)
            reply = await self._receive()
            if reply.continues:
                await self.aclose()
                raise RpcError(f"{method}: the daemon streamed replies to a call without more")
            return dict(reply.parameters)

    @asynccontextmanager
    async def open_stream(
        self, method: str, parameters: Mapping[str, Json] | None = None, *, fds: Sequence[int] = ()
    ) -> AsyncIterator[ReplyStream]:
        """Call with ``more``; iterate (parameters, continues) pairs up to the last reply.

        Leaving the block early closes the connection (the daemon cancels the call).
        """
        async with self._lock:
            await self._send(Call(method=method, parameters=dict(parameters or {}), more=True), fds)
            replies = ReplyStream(self._receive)
            try:
                yield replies
            finally:
                if not replies.done:
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                        await self.aclose()

    # --- io.runtimed ----------------------------------------------------------------------

    async def get_info(self) -> dict[str, Json]:
        return await self.call("org.varlink.service.GetInfo")

    async def get_interface_description(self, interface: str = "io.runtimed") -> str:
        reply = await self.call(
            "org.varlink.service.GetInterfaceDescription", {"interface": interface}
        )
        return _expect(reply, "description", str)

    async def get_platforms(self) -> dict[str, Json]:
        """The platform report (``binfmt.report.PlatformReport.to_json()``)."""
        return _expect(await self.call("io.runtimed.GetPlatforms"), "report", dict)

    async def check_binfmt(self) -> dict[str, Json]:
        """The diagnosis of ``runtimectl check-binfmt``: ok, findings, platforms."""
        reply = await self.call("io.runtimed.CheckBinfmt")
        _expect(reply, "ok", bool)
        return reply

    async def install_emulators(
        self, platforms: Sequence[str] | None = None, *, force: bool = False
    ) -> dict[str, Json]:
        params: dict[str, Json] = {"force": force}
        if platforms is not None:
            params["platforms"] = list(platforms)
        return await self.call("io.runtimed.InstallEmulators", params)

    async def uninstall_emulators(self, platforms: Sequence[str] | None = None) -> dict[str, Json]:
        params: dict[str, Json] = {}
        if platforms is not None:
            params["platforms"] = list(platforms)
        return await self.call("io.runtimed.UninstallEmulators", params)

    async def import_snapshot(
        self,
        fd: int,
        *,
        platform: str | None = None,
        source: str | None = None,
        progress: Callable[[dict[str, Json]], Awaitable[None]] | None = None,
    ) -> dict[str, Json]:
        """Import from an open file or pipe (the descriptor is passed, not the path).

        ``source`` is what the snapshot records as its origin (see
        :func:`runtimed.interface.is_source_name`); ``progress`` receives the daemon's
        progress objects while it works.
        """
        params: dict[str, Json] = {"fileDescriptor": 0}
        if platform is not None:
            params["platform"] = platform
        if source is not None:
            params["source"] = source
        async with self.open_stream("io.runtimed.ImportSnapshot", params, fds=[fd]) as replies:
            async for reply, continues in replies:
                if not continues:
                    return _expect(reply, "snapshot", dict)
                if progress is not None and isinstance(reply.get("progress"), dict):
                    await progress(_expect(reply, "progress", dict))
        raise RpcError("ImportSnapshot: the daemon ended without a final reply")

    async def list_snapshots(self) -> list[Json]:
        return _expect(await self.call("io.runtimed.ListSnapshots"), "snapshots", list)

    async def inspect_snapshot(self, snapshot_id: str) -> dict[str, Json]:
        reply = await self.call("io.runtimed.InspectSnapshot", {"id": snapshot_id})
        return _expect(reply, "snapshot", dict)

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await self.call("io.runtimed.RemoveSnapshot", {"id": snapshot_id})

    async def export_snapshots(
        self, snapshot_ids: Sequence[str], fd: int, *, fmt: str = "tar"
    ) -> int:
        """Write snapshots to an open, writable file; returns the bytes written.

        ``tar``: one snapshot as a rootfs tarball; ``oci``: an OCI layout archive (several
        snapshots of different platforms make one multi-platform image).
        """
        reply = await self.call(
            "io.runtimed.ExportSnapshot",
            {"ids": list(snapshot_ids), "fileDescriptor": 0, "format": fmt},
            fds=[fd],
        )
        return _expect(reply, "size", int)

    async def collect_garbage(self) -> list[Json]:
        """Delete unused layers; their chain ids."""
        return _expect(await self.call("io.runtimed.CollectGarbage"), "removed", list)

    @asynccontextmanager
    async def open_exec(self, spec: Mapping[str, Json]) -> AsyncIterator[ExecStream]:
        """Run a command; iterate its output chunks, then one :class:`ExecResult`.

        Leaving the block before the result cancels the exec (its tree is killed).
        """
        async with self.open_stream("io.runtimed.Exec", {"spec": dict(spec)}) as replies:
            yield ExecStream(replies)

    async def exec(self, spec: Mapping[str, Json]) -> ExecOutcome:
        """Run a command and collect its output and result."""
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        result: dict[str, Json] = {}
        async with self.open_exec(spec) as events:
            async for event in events:
                if isinstance(event, ExecOutput):
                    out.setdefault(event.stream, []).append(event.data)
                else:
                    result = event.result
        return ExecOutcome(
            stdout=b"".join(out["stdout"]), stderr=b"".join(out["stderr"]), result=result
        )

    # --- wire -----------------------------------------------------------------------------

    async def _send(self, call: Call, fds: Sequence[int]) -> None:
        data = self._codec.send(call)
        try:
            if not fds:
                await self.stream.send_all(data)
                return
            if not isinstance(self.stream, trio.SocketStream):
                raise UsageError("descriptors can only be passed over a Unix socket")
            # The descriptors travel with the first bytes of the call (sd-varlink does so).
            sock = self.stream.socket
            sent = await sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            await self.stream.send_all(data[sent:])
        except (OSError, trio.BrokenResourceError) as exc:
            raise DaemonUnavailableError(
                f"sending {call.method} to runtimed failed: {exc}"
            ) from exc

    async def _receive(self) -> Reply:
        while True:
            try:
                event = self._codec.next_event()
            except (MalformedFrameError, InvalidParamsError) as exc:
                await self.aclose()
                raise RpcError(f"the daemon sent a malformed reply: {exc.message}") from exc
            if isinstance(event, Reply):
                if event.error is not None:
                    raise error_from_reply(event.error, event.parameters)
                return event
            if event is EOF:
                raise DaemonUnavailableError("runtimed closed the connection")
            assert event is NEED_DATA
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (OSError, trio.BrokenResourceError) as exc:
                raise DaemonUnavailableError(f"connection to runtimed lost: {exc}") from exc
            self._codec.receive_data(bytes(data))


def _expect(reply: Mapping[str, Json], name: str, kind: type[T]) -> T:
    value = reply.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RpcError(f"the daemon's reply lacks a valid {name!r}", details={"parameter": name})
    return value


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise RpcError("the daemon sent output that is not base64") from exc


@asynccontextmanager
async def open_client(path: Path = DEFAULT_SOCKET) -> AsyncIterator[Client]:
    """Connect to the daemon's socket.

    Raises:
        DaemonUnavailableError: nothing listens there (with a hint how to start it).
        PermissionDeniedError: the socket refuses us (not in the daemon's group).
    """
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_unix_socket(str(path))
    except PermissionError as exc:
        raise PermissionDeniedError(
            f"connect to {path}: permission denied",
            details={"path": str(path)},
            hint="run as root or as a member of the daemon's group (default: runtimed)",
        ) from exc
    except (OSError, trio.TooSlowError) as exc:
        missing = isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
        raise DaemonUnavailableError(
            f"connect to {path}: {exc.strerror if isinstance(exc, OSError) else 'timed out'}",
            details={"path": str(path)},
            hint=(
                "start it: systemctl start runtimed.socket (or pass --socket PATH)"
                if missing
                else None
            ),
        ) from exc
    client = Client(stream)
    try:
        yield client
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await client.aclose()


class SyncClient:
    """Blocking wrapper: each method opens a connection, calls, and closes it."""

    def __init__(self, path: Path = DEFAULT_SOCKET) -> None:
        self.path = path

    def _run(self, use: Callable[[Client], Awaitable[T]]) -> T:
        async def main() -> T:
            async with open_client(self.path) as client:
                return await use(client)

        return trio.run(main)

    def get_info(self) -> dict[str, Json]:
        return self._run(lambda c: c.get_info())

    def get_platforms(self) -> dict[str, Json]:
        return self._run(lambda c: c.get_platforms())

    def check_binfmt(self) -> dict[str, Json]:
        return self._run(lambda c: c.check_binfmt())

    def install_emulators(
        self, platforms: Sequence[str] | None = None, *, force: bool = False
    ) -> dict[str, Json]:
        return self._run(lambda c: c.install_emulators(platforms, force=force))

    def uninstall_emulators(self, platforms: Sequence[str] | None = None) -> dict[str, Json]:
        return self._run(lambda c: c.uninstall_emulators(platforms))

    def import_snapshot(
        self, fd: int, *, platform: str | None = None, source: str | None = None
    ) -> dict[str, Json]:
        return self._run(lambda c: c.import_snapshot(fd, platform=platform, source=source))

    def list_snapshots(self) -> list[Json]:
        return self._run(lambda c: c.list_snapshots())

    def inspect_snapshot(self, snapshot_id: str) -> dict[str, Json]:
        return self._run(lambda c: c.inspect_snapshot(snapshot_id))

    def remove_snapshot(self, snapshot_id: str) -> None:
        self._run(lambda c: c.remove_snapshot(snapshot_id))

    def export_snapshots(self, snapshot_ids: Sequence[str], fd: int, *, fmt: str = "tar") -> int:
        return self._run(lambda c: c.export_snapshots(snapshot_ids, fd, fmt=fmt))

    def collect_garbage(self) -> list[Json]:
        return self._run(lambda c: c.collect_garbage())

    def exec(self, spec: Mapping[str, Json]) -> ExecOutcome:
        return self._run(lambda c: c.exec(spec))
