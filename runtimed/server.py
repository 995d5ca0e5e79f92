"""IO: the varlink server: accepts connections, checks peers, frames calls, dispatches, replies.

Each connection runs two tasks in its own nursery: a *reader* that feeds received bytes (and
SCM_RIGHTS descriptors) to the sans-IO codec (:mod:`runtimed.protocol`) and queues the calls,
and a *runner* that executes the queued calls one after the other and sends their replies in
order, as varlink requires. The reader keeps reading while a call runs, so a client that
closes its connection cancels its running call (an Exec's process tree is killed by the
sandbox's cancellation). A malformed or oversized frame is answered once, in order, and the
connection is closed; an invalid message is answered and the connection goes on; nothing a
client sends reaches another client.

Exceptions become error replies in exactly one place, :func:`reply_for_exception`: our errors
travel by name with their details; anything else is ``io.runtimed.Internal``, its traceback
logged with the request id and never sent.
"""

from __future__ import annotations

import array
import contextvars
import itertools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, Protocol, TypeVar

import trio

from runtimed.config import Limits
from runtimed.errors import (
    InternalError,
    InvalidParamsError,
    Json,
    LimitExceededError,
    MalformedFrameError,
    MethodNotFoundError,
    PermissionDeniedError,
    RuntimedError,
    sole_exception,
)
from runtimed.interface import error_reply
from runtimed.protocol import EOF, NEED_DATA, Call, Connection, Reply, Role

log = logging.getLogger(__name__)

REQUEST_ID: Final[contextvars.ContextVar[str | None]] = contextvars.ContextVar(
    "runtimed_request_id", default=None
)
"""The id of the request the current task works on; every log line about it shows it."""

RECEIVE_SIZE: Final = 65536
MAX_FDS_PER_MESSAGE: Final = 16
CLOSE_TIMEOUT: Final = 1.0
ACCEPT_ERROR_PAUSE: Final = 0.1
"""Seconds to wait after accept() fails for lack of resources (trio's serve_listeners too)."""
SEND_TIMEOUT: Final = 30.0
"""Seconds a reply may wait for a client that does not read before the connection is dropped."""

# asm-generic/socket.h (not in Python's socket module)
SO_PEERGROUPS: Final = 59


@dataclass(frozen=True, slots=True, kw_only=True)
class Peer:
    """The credentials of a connected client, as the kernel reported them at connect time."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def peer_allowed(peer: Peer, allowed_gid: int | None) -> bool:
    """Root and members (primary or supplementary) of the allowed group may connect."""
    if peer.uid == 0:
        return True
    return allowed_gid is not None and (peer.gid == allowed_gid or allowed_gid in peer.groups)


class Transport(Protocol):
    """One accepted connection: bytes and descriptors in, bytes out."""

    async def receive(self, max_bytes: int) -> tuple[bytes, list[int]]: ...

    async def send_all(self, data: bytes) -> None: ...

    def send_nowait(self, data: bytes) -> int:
        """Send what fits without waiting; how many bytes that was."""
        ...

    async def aclose(self) -> None: ...

    def peer(self) -> Peer: ...


@dataclass(slots=True)
class StreamTransport:
    """A trio stream with given credentials and no descriptor passing (tests, in-process)."""

    stream: trio.abc.Stream
    credentials: Peer

    async def receive(self, max_bytes: int) -> tuple[bytes, list[int]]:
        return bytes(await self.stream.receive_some(max_bytes)), []

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def send_nowait(self, data: bytes) -> int:
        return 0  # a generic stream can only send_all

    async def aclose(self) -> None:
        await self.stream.aclose()

    def peer(self) -> Peer:
        return self.credentials


@dataclass(slots=True)
class UnixTransport:
    """An accepted AF_UNIX stream: SCM_RIGHTS descriptors, SO_PEERCRED + SO_PEERGROUPS."""

    stream: trio.SocketStream

    async def receive(self, max_bytes: int) -> tuple[bytes, list[int]]:
        try:
            data, ancdata, flags, _ = await self.stream.socket.recvmsg(
                max_bytes, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4), socket.MSG_CMSG_CLOEXEC
            )
        except OSError as exc:
            # ECONNRESET when the peer closed with our reply unread: the connection is over.
            raise trio.BrokenResourceError(f"receive: {exc.strerror}") from exc
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if flags & socket.MSG_CTRUNC:
            close_fds(list(fds))
            raise MalformedFrameError(f"more than {MAX_FDS_PER_MESSAGE} descriptors in a message")
        return data, list(fds)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def send_nowait(self, data: bytes) -> int:
        """A write(2) to the non-blocking socket: a reply, as a rule, whole, without the
        timeout and the stream machinery :meth:`send_all` needs for a client that reads slowly.

        Raises:
            trio.BrokenResourceError: the client is gone.
        """
        try:
            return os.write(self.stream.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send: {exc.strerror}") from exc

    async def aclose(self) -> None:
        await self.stream.aclose()

    def peer(self) -> Peer:
        """The peer's credentials.

        Raises:
            trio.BrokenResourceError: the peer is already gone.
        """
        sock = self.stream.socket
        try:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError as exc:
            raise trio.BrokenResourceError(f"SO_PEERCRED: {exc.strerror}") from exc
        pid, uid, gid = struct.unpack("3i", cred)
        return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: trio.socket.SocketType) -> frozenset[int]:
    # SO_PEERGROUPS (Linux 4.13): the supplementary groups at connect time, race-free unlike
    # reading /proc/PID/status. ERANGE means a bigger buffer is needed.
    for count in (256, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * 4)
        except OSError:
            continue
        return frozenset(array.array("I", raw[: len(raw) - len(raw) % 4]))
    return frozenset()


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            log.warning("closing received descriptor %d failed", fd)


@dataclass(slots=True, kw_only=True)
class Request:
    """One call as a handler sees it. ``fds`` are closed by the server after the call."""

    id: str
    method: str
    parameters: Mapping[str, Json]
    more: bool
    peer: Peer
    fds: list[int] = field(default_factory=list)
    send: Callable[[Reply], Awaitable[None]]

    async def progress(self, parameters: Mapping[str, Json]) -> None:
        """Send a ``continues`` reply; dropped when the client did not ask for ``more``."""
        if self.more:
            await self.send(Reply(parameters=parameters, continues=True))

    def take_fd(self, parameter: str) -> int:
        """The descriptor whose index the parameter holds; the caller now owns (closes) it.

        Raises:
            InvalidParamsError: the parameter is missing, not an int, or no such descriptor
                came with the call.
        """
        index = self.parameters.get(parameter)
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidParamsError(
                f"{parameter} must be the index of a descriptor passed with the call",
                details={"parameter": parameter},
            )
        if not 0 <= index < len(self.fds) or self.fds[index] < 0:
            raise InvalidParamsError(
                f"{parameter}={index} but {len(self.fds)} descriptors came with the call",
                details={"parameter": parameter},
                hint="pass the file as SCM_RIGHTS ancillary data in the call's sendmsg()",
            )
        fd, self.fds[index] = self.fds[index], -1
        return fd


Handler = Callable[[Request], Awaitable[dict[str, Json]]]


def reply_for_exception(exc: BaseException, request_id: str | None) -> Reply:
    """The error reply for an exception a call raised (the one place this happens)."""
    error = _runtimed_error(exc)
    if error is None:
        log.error("internal error", exc_info=exc)
        error = InternalError("internal error")
    name, parameters = error_reply(error, request_id=request_id)
    return Reply(error=name, parameters=parameters)


def _runtimed_error(exc: BaseException) -> RuntimedError | None:
    # A handler's nursery wraps what its tasks raised: one error of ours inside a group is
    # still that error.
    if isinstance(exc, BaseExceptionGroup):
        exc = sole_exception(exc)
    if isinstance(exc, RuntimedError) and type(exc) is not InternalError:
        return exc
    return None


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A reply the runner sends in order instead of running a call."""

    error: RuntimedError
    close: bool


_Item = Call | _Refusal
S = TypeVar("S", bound=trio.abc.AsyncResource)


class Server(Generic[S]):
    """Serves varlink calls from accepted connections through a method table.

    Args:
        methods: Fully qualified method name -> handler.
        limits: Called on each connection and call, so a reload takes effect at once.
        authorize: Whether a peer may use the service (see :func:`peer_allowed`).
        transport_for: Wraps what the listener accepted.
    """

    def __init__(
        self,
        methods: Mapping[str, Handler],
        *,
        limits: Callable[[], Limits],
        authorize: Callable[[Peer], bool],
        transport_for: Callable[[S], Transport],
    ) -> None:
        self.methods = methods
        self.limits = limits
        self.authorize = authorize
        self.transport_for = transport_for
        self.connections = 0
        self.running_calls = 0
        self._ids = itertools.count(1)
        self._accept_scope = trio.CancelScope()
        self._connections_scope = trio.CancelScope()
        self._idle = trio.Event()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[S]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve until :meth:`drain` ends it (trio ``serve_listeners``)."""
        with self._connections_scope:
            async with trio.open_nursery() as connections:
                with self._accept_scope:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(self._accept_loop, listener, connections)
                        task_status.started()
                for listener in listeners:
                    await listener.aclose()

    async def drain(self, grace: float) -> None:
        """Stop accepting; give running calls ``grace`` seconds; then cancel everything."""
        self._accept_scope.cancel()
        with trio.move_on_after(grace):
            while self.running_calls:
                self._idle = trio.Event()
                await self._idle.wait()
        self._connections_scope.cancel()

    async def _accept_loop(self, listener: trio.abc.Listener[S], connections: trio.Nursery) -> None:
        while True:
            try:
                accepted = await listener.accept()
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: keep serving the connections we have (trio's
                # serve_listeners sleeps for the same reason).
                log.warning("accept failed: %s", exc)
                await trio.sleep(ACCEPT_ERROR_PAUSE)
                continue
            connections.start_soon(self.serve_connection, self.transport_for(accepted))

    async def serve_connection(self, transport: Transport) -> None:
        """Serve one connection until the peer closes it or the daemon drains."""
        conn_id = next(self._ids)
        self.connections += 1
        try:
            peer = transport.peer()
            if self.authorize(peer):
                log.debug("connection %d from pid %d uid %d", conn_id, peer.pid, peer.uid)
                await self._serve_calls(conn_id, transport, peer)
            else:
                log.warning(
                    "connection %d refused: pid %d uid %d gid %d is neither root nor in the "
                    "allowed group",
                    conn_id,
                    peer.pid,
                    peer.uid,
                    peer.gid,
                )
                await self._refuse(transport, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.debug("connection %d lost", conn_id)
        except Exception:
            # A task's top: one connection's failure must never reach the others.
            log.exception("connection %d failed", conn_id)
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await transport.aclose()

    async def _refuse(self, transport: Transport, peer: Peer) -> None:
        # Answer the first call (varlink has no unsolicited messages), then close.
        codec = Connection(Role.SERVER, max_frame_size=self.limits().message_size)
        with trio.move_on_after(SEND_TIMEOUT):
            while True:
                data, fds = await transport.receive(RECEIVE_SIZE)
                close_fds(fds)
                codec.receive_data(data)
                try:
                    event = codec.next_event()
                except RuntimedError:
                    return
                if event is EOF:
                    return
                if event is not NEED_DATA:
                    error = PermissionDeniedError(
                        "permission denied: connect as root or as a member of the allowed group",
                        details={"uid": peer.uid},
                    )
                    await transport.send_all(codec.send(reply_for_exception(error, None)))
                    return

    async def _serve_calls(self, conn_id: int, transport: Transport, peer: Peer) -> None:
        limits = self.limits()
        codec = Connection(Role.SERVER, max_frame_size=limits.message_size)
        send_lock = trio.Lock()
        items_in, items_out = trio.open_memory_channel[tuple[_Item, list[int]]](
            limits.calls_per_connection
        )

        async with trio.open_nursery() as nursery:

            async def send(reply: Reply) -> None:
                try:
                    data = codec.send(reply)
                except (InvalidParamsError, TypeError, ValueError) as exc:
                    data = codec.send(reply_for_exception(exc, REQUEST_ID.get()))
                # Free as a rule: taken without a trip through the scheduler, which would let
                # every ready task (an Exec's clean-up, the next spare) go before the reply.
                try:
                    send_lock.acquire_nowait()
                except trio.WouldBlock:
                    await send_lock.acquire()
                try:
                    sent = transport.send_nowait(data)
                    if sent < len(data):
                        with trio.fail_after(SEND_TIMEOUT):
                            await transport.send_all(data[sent:])
                except (trio.BrokenResourceError, trio.TooSlowError):
                    # The client is gone or stuck: end the connection and its calls.
                    nursery.cancel_scope.cancel()
                    await trio.lowlevel.checkpoint()
                finally:
                    send_lock.release()

            nursery.start_soon(self._run_calls, conn_id, items_out, send, peer, nursery)
            async with items_in:
                await self._read_calls(transport, codec, items_in, limits)
            # The client closed its side: cancel what still runs for it.
            nursery.cancel_scope.cancel()

    async def _read_calls(
        self,
        transport: Transport,
        codec: Connection,
        items: trio.MemorySendChannel[tuple[_Item, list[int]]],
        limits: Limits,
    ) -> None:
        pending_fds: list[int] = []
        try:
            while True:
                try:
                    data, fds = await transport.receive(RECEIVE_SIZE)
                except MalformedFrameError as exc:
                    await items.send((_Refusal(exc, close=True), []))
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # A reset peer (it closed with our reply unread) is the end of its stream,
                    # like EOF: its calls are cancelled by the caller, nothing else is hurt.
                    return
                pending_fds += fds
                codec.receive_data(data)
                while True:
                    try:
                        event = codec.next_event()
                    except MalformedFrameError as exc:
                        await items.send((_Refusal(exc, close=True), []))
                        await trio.sleep_forever()  # the runner answers and ends the connection
                    except InvalidParamsError as exc:
                        await items.send((_Refusal(exc, close=False), []))
                        continue
                    if event is NEED_DATA:
                        break
                    if event is EOF:
                        return
                    assert isinstance(event, Call)
                    # Descriptors come in the same sendmsg() as the start of their call.
                    call_fds, pending_fds = pending_fds, []
                    try:
                        items.send_nowait((event, call_fds))
                    except trio.WouldBlock:
                        close_fds(call_fds)
                        error = LimitExceededError(
                            f"more than {limits.calls_per_connection} calls queued on one "
                            "connection",
                            details={
                                "limit": "calls_per_connection",
                                "value": limits.calls_per_connection,
                            },
                        )
                        await items.send((_Refusal(error, close=True), []))
                        await trio.sleep_forever()
        finally:
            close_fds(pending_fds)

    async def _run_calls(
        self,
        conn_id: int,
        items: trio.MemoryReceiveChannel[tuple[_Item, list[int]]],
        send: Callable[[Reply], Awaitable[None]],
        peer: Peer,
        nursery: trio.Nursery,
    ) -> None:
        numbers = itertools.count(1)
        async with items:
            async for item, fds in items:
                if isinstance(item, _Refusal):
                    log.info("connection %d: %s", conn_id, item.error.message)
                    await send(reply_for_exception(item.error, None))
                    if item.close:
                        break
                    continue
                request = Request(
                    id=f"{conn_id}.{next(numbers)}",
                    method=item.method,
                    parameters=item.parameters,
                    more=item.more,
                    peer=peer,
                    fds=fds,
                    send=send,
                )
                await self._dispatch(item, request)
        nursery.cancel_scope.cancel()

    async def _dispatch(self, call: Call, request: Request) -> None:
        token = REQUEST_ID.set(request.id)
        self.running_calls += 1
        try:
            log.debug("call %s from uid %d", call.method, request.peer.uid)
            reply = await self._call(call, request)
            if not call.oneway:
                await request.send(reply)
        finally:
            close_fds([fd for fd in request.fds if fd >= 0])
            self.running_calls -= 1
            if not self.running_calls:
                self._idle.set()
            REQUEST_ID.reset(token)

    async def _call(self, call: Call, request: Request) -> Reply:
        handler = self.methods.get(call.method)
        try:
            if handler is None:
                raise _not_found(call.method, self.methods)
            if call.upgrade:
                raise InvalidParamsError(
                    f"{call.method} does not upgrade the connection",
                    details={"parameter": "upgrade"},
                )
            return Reply(parameters=await handler(request))
        except Exception as exc:
            return reply_for_exception(exc, request.id)


def _not_found(method: str, methods: Mapping[str, Handler]) -> RuntimedError:
    interface = method.rpartition(".")[0]
    if not any(name.rpartition(".")[0] == interface for name in methods):
        return MethodNotFoundError(
            f"no interface {interface} here", details={"interface": interface}
        )
    return MethodNotFoundError(f"no method {method}", details={"method": method})
