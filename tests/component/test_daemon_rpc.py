"""Server + handlers + client over in-memory streams with a fake backend (trio, no sockets)."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

import pytest
import trio
import trio.testing

from runtimed.client import Client, ExecOutput, ExecResult
from runtimed.config import Limits
from runtimed.errors import (
    InternalError,
    InvalidParamsError,
    Json,
    LimitExceededError,
    MethodNotFoundError,
    NoEmulatorError,
    PermissionDeniedError,
    SnapshotNotFoundError,
)
from runtimed.handlers import ExecGate, OutputSink, ProgressSink, method_table
from runtimed.protocol import Call, Connection, Reply, Role
from runtimed.server import Peer, Server, StreamTransport, UnixTransport, peer_allowed

DESCRIPTION = resources.files("runtimed").joinpath("io.runtimed.varlink").read_text()
ROOT = Peer(pid=1, uid=0, gid=0)
NOBODY = Peer(pid=2, uid=65534, gid=65534)
SPEC: dict[str, Json] = {"argv": ["x"]}
BUILDER = Peer(pid=3, uid=1000, gid=1000, groups=frozenset({4242}))


@dataclass
class FakeBackend:
    """Records calls; exec emits scripted output and can block until cancelled."""

    exec_output: list[tuple[str, bytes]] = field(default_factory=list)
    exec_blocks: bool = False
    exec_started: trio.Event = field(default_factory=trio.Event)
    exec_cancelled: trio.Event = field(default_factory=trio.Event)
    fail_with: Exception | None = None
    bad_json: bool = False

    async def get_platforms(self) -> dict[str, Json]:
        if self.fail_with is not None:
            raise self.fail_with
        return {"host": "linux/amd64", "native": ["linux/amd64", "linux/386"]}

    async def check_binfmt(self) -> dict[str, Json]:
        return {"ok": True, "findings": [{"severity": "info"}], "platforms": {}}

    async def install_emulators(
        self, platforms: list[str] | None, *, force: bool
    ) -> dict[str, Json]:
        chosen: Json = None if platforms is None else list[Json](platforms)
        return {"changes": [{"platforms": chosen, "force": force}], "report": {}}

    async def uninstall_emulators(self, platforms: list[str] | None) -> dict[str, Json]:
        return {"changes": [], "report": {}}

    async def import_snapshot(
        self, fd: int, *, platform: str | None, source: str | None, progress: ProgressSink
    ) -> dict[str, Json]:
        raise AssertionError("descriptors do not pass over memory streams")

    async def list_snapshots(self) -> list[Json]:
        if self.bad_json:
            return [{"size": float("nan")}]  # a backend bug: not JSON
        return [{"id": "s1"}]

    async def inspect_snapshot(self, snapshot_id: str) -> dict[str, Json]:
        if snapshot_id != "s1":
            raise SnapshotNotFoundError(f"no snapshot {snapshot_id}", details={"id": snapshot_id})
        return {"id": "s1"}

    async def remove_snapshot(self, snapshot_id: str) -> None:
        await self.inspect_snapshot(snapshot_id)

    async def export_snapshots(self, snapshot_ids: list[str], fd: int, *, fmt: str) -> int:
        raise AssertionError("descriptors do not pass over memory streams")

    async def collect_garbage(self) -> list[str]:
        return ["sha256:aa"]

    async def exec(self, spec: Mapping[str, Json], output: OutputSink) -> dict[str, Json]:
        self.exec_started.set()
        for stream, data in self.exec_output:
            await output(stream, data)
        if self.exec_blocks:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.exec_cancelled.set()
                raise
        return {"exit_status": 0, "argv": spec.get("argv")}


class FakeListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands out the server ends of memory stream pairs (trio's MemoryListener idea)."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self.send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self.receive.receive()

    async def aclose(self) -> None:
        await self.receive.aclose()


@dataclass
class Harness:
    server: Server[trio.abc.Stream]
    listener: FakeListener
    backend: FakeBackend
    pending: list[Peer]

    async def connect(self, peer: Peer = ROOT) -> Client:
        self.pending.append(peer)
        return Client(await self.listener.connect())

    async def raw(self, peer: Peer = ROOT) -> trio.abc.Stream:
        return (await self.connect(peer)).stream


@asynccontextmanager
async def serving(
    limits: Limits | None = None, allowed_gid: int | None = 4242
) -> AsyncIterator[Harness]:
    limits = limits or Limits()
    backend = FakeBackend()
    listener = FakeListener()
    pending: list[Peer] = []
    server: Server[trio.abc.Stream] = Server(
        method_table(
            backend, description=DESCRIPTION, limits=lambda: limits, gate=ExecGate(lambda: limits)
        ),
        limits=lambda: limits,
        authorize=lambda peer: peer_allowed(peer, allowed_gid),
        transport_for=lambda stream: StreamTransport(stream, pending.pop(0)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, [listener])
        yield Harness(server, listener, backend, pending)
        nursery.cancel_scope.cancel()


async def raw_exchange(stream: trio.abc.Stream, data: bytes) -> list[Reply]:
    """Send bytes, read replies until the server closes the connection."""
    codec = Connection(Role.CLIENT)
    await stream.send_all(data)
    replies: list[Reply] = []
    while chunk := await stream.receive_some(65536):
        codec.receive_data(bytes(chunk))
        while isinstance(event := codec.next_event(), Reply):
            replies.append(event)
    return replies


async def test_daemon_rpc_get_info_and_descriptions() -> None:
    async with serving() as h:
        client = await h.connect()
        info = await client.get_info()
        assert info["interfaces"] == ["org.varlink.service", "io.runtimed"]
        assert await client.get_interface_description() == DESCRIPTION
        assert "interface org.varlink.service" in await client.get_interface_description(
            "org.varlink.service"
        )
        with pytest.raises(MethodNotFoundError):
            await client.get_interface_description("com.example.nope")


async def test_daemon_rpc_get_platforms_and_snapshots() -> None:
    async with serving() as h:
        client = await h.connect(BUILDER)
        assert (await client.get_platforms())["host"] == "linux/amd64"
        assert (await client.check_binfmt())["findings"] == [{"severity": "info"}]
        assert await client.list_snapshots() == [{"id": "s1"}]
        assert await client.inspect_snapshot("s1") == {"id": "s1"}
        assert await client.collect_garbage() == ["sha256:aa"]
        changes = await client.install_emulators(["linux/arm64"], force=True)
        assert changes["changes"] == [{"platforms": ["linux/arm64"], "force": True}]


async def test_daemon_rpc_errors_come_back_as_our_classes() -> None:
    async with serving() as h:
        client = await h.connect()
        with pytest.raises(SnapshotNotFoundError) as info:
            await client.remove_snapshot("nope")
        assert info.value.details == {"id": "nope"}
        h.backend.fail_with = NoEmulatorError("no emulator for linux/riscv64", hint="install qemu")
        with pytest.raises(NoEmulatorError, match="riscv64") as emul:
            await client.get_platforms()
        assert emul.value.hint == "install qemu"


async def test_daemon_rpc_internal_error_is_logged_not_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as h:
        client = await h.connect()
        h.backend.fail_with = ValueError("secret detail")
        with (
            caplog.at_level(logging.ERROR, "runtimed.server"),
            pytest.raises(InternalError) as info,
        ):
            await client.get_platforms()
        assert "secret" not in str(info.value)
        request = info.value.details["request"]
        assert isinstance(request, str)
        [record] = caplog.records
        assert record.exc_info is not None
        assert "secret detail" in str(record.exc_info[1])
        # The connection survives an internal error.
        assert await client.list_snapshots() == [{"id": "s1"}]


@pytest.mark.parametrize(
    ("method", "parameters", "parameter"),
    [
        ("io.runtimed.InspectSnapshot", {"id": 5}, "id"),
        ("io.runtimed.InspectSnapshot", {}, "id"),
        ("io.runtimed.GetPlatforms", {"x": 1}, "x"),
        ("io.runtimed.InstallEmulators", {"platforms": "linux/arm64"}, "platforms"),
        ("io.runtimed.InstallEmulators", {"force": "yes"}, "force"),
        ("io.runtimed.Exec", {"spec": []}, "spec"),
        ("io.runtimed.ImportSnapshot", {"fileDescriptor": 0}, "fileDescriptor"),
        # Checked before the descriptor is taken: a label, never a path, of bounded length.
        ("io.runtimed.ImportSnapshot", {"fileDescriptor": 0, "source": 5}, "source"),
        ("io.runtimed.ImportSnapshot", {"fileDescriptor": 0, "source": "a\nb"}, "source"),
        ("io.runtimed.ImportSnapshot", {"fileDescriptor": 0, "source": "x" * 4097}, "source"),
        ("io.runtimed.ExportSnapshot", {"ids": []}, "ids"),
        ("io.runtimed.ExportSnapshot", {"ids": ["s1"], "format": "zip"}, "format"),
        ("io.runtimed.CollectGarbage", {"all": True}, "all"),
    ],
)
async def test_daemon_rpc_invalid_parameter_is_named(
    method: str, parameters: dict[str, Json], parameter: str
) -> None:
    async with serving() as h:
        client = await h.connect()
        with pytest.raises(InvalidParamsError) as info:
            await client.call(method, parameters)
        assert info.value.details["parameter"] == parameter


async def test_daemon_rpc_unknown_method_and_interface() -> None:
    async with serving() as h:
        client = await h.connect()
        with pytest.raises(MethodNotFoundError) as method:
            await client.call("io.runtimed.Nope")
        assert method.value.details == {"method": "io.runtimed.Nope"}
        with pytest.raises(MethodNotFoundError) as interface:
            await client.call("com.example.Thing")
        assert interface.value.details == {"interface": "com.example"}


async def test_daemon_rpc_exec_streams_output_in_order_then_result() -> None:
    async with serving() as h:
        h.backend.exec_output = [("stdout", b"one\n"), ("stderr", b"\xff\x00err"), ("stdout", b"2")]
        client = await h.connect()
        events = []
        async with client.open_exec({"argv": ["x"]}) as stream:
            events = [event async for event in stream]
        assert events == [
            ExecOutput(stream="stdout", data=b"one\n"),
            ExecOutput(stream="stderr", data=b"\xff\x00err"),
            ExecOutput(stream="stdout", data=b"2"),
            ExecResult(result={"exit_status": 0, "argv": ["x"]}),
        ]


async def test_daemon_rpc_exec_output_is_chunked_to_the_message_size() -> None:
    async with serving(Limits(message_size=4096)) as h:
        h.backend.exec_output = [("stdout", bytes(range(256)) * 100)]
        client = await h.connect()
        outcome = await client.exec({"argv": ["x"]})
        assert outcome.stdout == bytes(range(256)) * 100
        assert outcome.result["exit_status"] == 0


async def test_daemon_rpc_exec_without_more_is_refused() -> None:
    async with serving() as h:
        client = await h.connect()
        with pytest.raises(InvalidParamsError) as info:
            await client.call("io.runtimed.Exec", {"spec": {"argv": ["x"]}})
        assert info.value.details["parameter"] == "more"


async def test_daemon_rpc_exec_limit() -> None:
    async with serving(Limits(concurrent_execs=1)) as h:
        h.backend.exec_blocks = True
        first = await h.connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.exec, SPEC)
            await h.backend.exec_started.wait()
            second = await h.connect()
            with pytest.raises(LimitExceededError) as info:
                await second.exec({"argv": ["y"]})
            assert info.value.details == {"limit": "concurrent_execs", "value": 1}
            nursery.cancel_scope.cancel()


async def test_daemon_rpc_client_disconnect_cancels_the_exec() -> None:
    async with serving() as h:
        h.backend.exec_blocks = True
        h.backend.exec_output = [("stdout", b"started")]
        client = await h.connect()
        async with client.open_exec({"argv": ["sleep"]}) as stream:
            async for event in stream:
                assert event == ExecOutput(stream="stdout", data=b"started")
                break
        # Leaving the block closed the connection.
        with trio.fail_after(5):
            await h.backend.exec_cancelled.wait()
        assert h.server.running_calls == 0


async def test_daemon_rpc_garbage_framing_closes_only_that_connection() -> None:
    async with serving(Limits(message_size=4096)) as h:
        good = await h.connect()
        bad = await h.raw()
        replies = await raw_exchange(bad, b"\x00not json\x00")
        assert [r.error for r in replies] == ["io.runtimed.MalformedFrame"]
        oversized = await h.raw()
        replies = await raw_exchange(oversized, b"{" + b" " * 5000)
        assert [r.error for r in replies] == ["io.runtimed.MalformedFrame"]
        assert await good.list_snapshots() == [{"id": "s1"}]


async def test_daemon_rpc_pipelined_calls_are_answered_in_order() -> None:
    async with serving() as h:
        stream = await h.raw()
        codec = Connection(Role.CLIENT)
        await stream.send_all(
            codec.send(Call(method="io.runtimed.ListSnapshots"))
            + b'{"method": 7}\0'
            + codec.send(Call(method="io.runtimed.InspectSnapshot", parameters={"id": "s1"}))
            + codec.send(Call(method="io.runtimed.GetPlatforms", oneway=True))
            + codec.send(Call(method="io.runtimed.Nope", upgrade=True))
        )
        replies: list[Reply] = []
        while len(replies) < 4:
            codec.receive_data(bytes(await stream.receive_some(65536)))
            while isinstance(event := codec.next_event(), Reply):
                replies.append(event)
        assert replies[0].parameters == {"snapshots": [{"id": "s1"}]}
        assert replies[1].error == "org.varlink.service.InvalidParameter"
        assert replies[1].parameters["parameter"] == "method"
        assert replies[2].parameters == {"snapshot": {"id": "s1"}}
        assert replies[3].error == "org.varlink.service.MethodNotFound"


async def test_daemon_rpc_too_many_queued_calls_is_limit_exceeded() -> None:
    async with serving(Limits(calls_per_connection=2)) as h:
        stream = await h.raw()
        codec = Connection(Role.CLIENT)
        call = Call(method="io.runtimed.Exec", parameters={"spec": {}}, more=True)
        # Calls beyond the queue's room are refused, in order, and the connection closes.
        replies = await raw_exchange(stream, codec.send(call) * 6)
        assert 3 <= len(replies) < 6
        assert all(r.error is None for r in replies[:-1])
        assert replies[-1].error == "io.runtimed.LimitExceeded"
        assert replies[-1].parameters["limit"] == "calls_per_connection"


@pytest.mark.parametrize(("peer", "allowed"), [(ROOT, True), (BUILDER, True), (NOBODY, False)])
async def test_daemon_rpc_peer_credentials_decide(peer: Peer, allowed: bool) -> None:
    async with serving(allowed_gid=4242) as h:
        client = await h.connect(peer)
        if allowed:
            assert await client.list_snapshots() == [{"id": "s1"}]
        else:
            with pytest.raises(PermissionDeniedError) as info:
                await client.list_snapshots()
            assert info.value.details["uid"] == 65534


def test_daemon_rpc_peer_allowed_without_group_is_root_only() -> None:
    assert peer_allowed(ROOT, None)
    assert not peer_allowed(BUILDER, None)
    assert peer_allowed(Peer(pid=9, uid=5, gid=4242), 4242)


async def test_daemon_rpc_drain_gives_running_execs_a_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as h:
        h.backend.exec_blocks = True
        client = await h.connect()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.exec, SPEC)
            await h.backend.exec_started.wait()
            start = trio.current_time()
            await h.server.drain(grace=5)
            assert trio.current_time() - start == pytest.approx(5)
            nursery.cancel_scope.cancel()
        assert h.backend.exec_cancelled.is_set()
        with pytest.raises(trio.BrokenResourceError):
            await h.connect()  # no longer accepting


class ExplodingTransport(StreamTransport):
    """A transport whose receive fails with an error the server does not expect."""

    async def receive(self, max_bytes: int) -> tuple[bytes, list[int]]:
        raise RuntimeError("transport bug")


async def test_daemon_rpc_one_connection_failing_never_reaches_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving() as h:
        good = await h.connect()
        client_end, server_end = trio.testing.memory_stream_pair()
        with caplog.at_level(logging.ERROR, "runtimed.server"):
            await h.server.serve_connection(ExplodingTransport(server_end, ROOT))
        assert "failed" in caplog.text
        assert await good.list_snapshots() == [{"id": "s1"}]
        await client_end.aclose()


async def test_daemon_rpc_a_reply_that_is_not_json_becomes_an_internal_error() -> None:
    async with serving() as h:
        client = await h.connect()
        h.backend.bad_json = True
        with pytest.raises(InternalError):
            await client.list_snapshots()
        h.backend.bad_json = False
        assert await client.list_snapshots() == [{"id": "s1"}]


async def test_unix_transport_writes_what_fits_and_reports_a_gone_client() -> None:
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = UnixTransport(trio.SocketStream(ours))
    with theirs:
        assert transport.send_nowait(b"reply") == 5
        assert await theirs.recv(16) == b"reply"
        big = b"x" * (8 << 20)  # more than any socket buffer
        sent = transport.send_nowait(big)
        assert 0 < sent < len(big)
        assert transport.send_nowait(big) == 0  # full: the rest is for send_all
    with pytest.raises(trio.BrokenResourceError):
        transport.send_nowait(b"reply")  # the client closed its end
    await transport.aclose()
