"""Pure. The varlink wire codec: bytes in, messages out, bytes out; no sockets here.

Theory of operation
-------------------
A varlink connection carries JSON objects, each terminated by one NUL byte
(https://varlink.org/Method-Call). A client sends *calls*; the service answers each call, in
order, with one reply or (when the call asked for ``more``) a run of replies flagged
``continues`` that ends with one reply without it. An error reply names the error and carries
its parameters.

:class:`Connection` is the codec for one side of one connection, in the style of h11's
``Connection``: the IO layer feeds it whatever bytes arrived (:meth:`Connection.receive_data`;
``b""`` means end of file), then asks for events (:meth:`Connection.next_event`) until it says
:data:`NEED_DATA`; messages to send become bytes through :meth:`Connection.send`. A server-side
codec parses :class:`Call` messages, a client-side one :class:`Reply` messages.

States and transitions of the receiving side:

=========  ================================================  =========
state      event                                             next
=========  ================================================  =========
OPEN       a complete frame that is a valid message          OPEN
OPEN       a complete frame with a bad field                 OPEN      (InvalidParamsError)
OPEN       no NUL within ``max_frame_size`` bytes            BROKEN    (MalformedFrameError)
OPEN       a frame that is not a UTF-8 JSON object           BROKEN    (MalformedFrameError)
OPEN       end of file on a frame boundary                   CLOSED    (EOF)
OPEN       end of file inside a frame                        BROKEN    (MalformedFrameError)
BROKEN     anything                                          BROKEN    (MalformedFrameError)
=========  ================================================  =========

A frame with a bad field is consumed whole, so the peer can be answered with an error and the
connection goes on; after broken framing there is no way to find the next message, so the IO
layer replies once if it can and closes.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn

from runtimed.errors import InvalidParamsError, Json, MalformedFrameError

__all__ = [
    "EOF",
    "NEED_DATA",
    "Call",
    "Connection",
    "Event",
    "Json",
    "Reply",
    "Role",
    "Sentinel",
    "parse_call",
    "parse_reply",
]

DEFAULT_MAX_FRAME_SIZE: Final = 8 * 1024 * 1024
"""Bytes of one message, NUL excluded (the daemon's default ``limits.max_message_size``)."""

# Fully qualified varlink names: "interface.Member", the interface a reverse domain name and
# the member CamelCase (https://varlink.org/Interface-Definition).
_QUALIFIED_NAME: Final = re.compile(
    r"[A-Za-z](?:-*[A-Za-z0-9])*(?:\.[A-Za-z0-9](?:-*[A-Za-z0-9])*)+\.[A-Z][A-Za-z0-9]*"
)


class Sentinel(enum.Enum):
    """Events that are not messages."""

    NEED_DATA = "NEED_DATA"
    EOF = "EOF"


NEED_DATA: Final = Sentinel.NEED_DATA
"""No complete frame is buffered: feed more bytes."""
EOF: Final = Sentinel.EOF
"""The peer closed its sending side on a frame boundary."""


class Role(enum.StrEnum):
    """Which side of the connection the codec is: it parses the other side's messages."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """A method call (client to service)."""

    method: str
    parameters: Mapping[str, Json] = field(default_factory=dict)
    more: bool = False
    oneway: bool = False
    upgrade: bool = False

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {"method": self.method}
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        for flag in ("more", "oneway", "upgrade"):
            if getattr(self, flag):
                out[flag] = True
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """A reply (service to client): parameters, or an error name with its parameters."""

    parameters: Mapping[str, Json] = field(default_factory=dict)
    continues: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {}
        if self.error is not None:
            out["error"] = self.error
        out["parameters"] = dict(self.parameters)
        if self.continues:
            out["continues"] = True
        return out


Event = Call | Reply | Sentinel


_KIND_NAMES: Final[Mapping[type, str]] = {bool: "a boolean", str: "a string", dict: "an object"}


def _field(obj: Mapping[str, Json], name: str, kind: type) -> Json:
    """The field's value, None when absent or null (as the reference implementations do)."""
    value = obj.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidParamsError(
            f"varlink message: field {name!r} must be {_KIND_NAMES[kind]}",
            details={"parameter": name},
        )
    return value


def _parameters(obj: Mapping[str, Json]) -> dict[str, Json]:
    value = _field(obj, "parameters", dict)
    return dict(value) if isinstance(value, dict) else {}


def _flag(obj: Mapping[str, Json], name: str) -> bool:
    return _field(obj, name, bool) is True


def parse_call(obj: Mapping[str, Json]) -> Call:
    """Validate a decoded JSON object as a call.

    Raises:
        InvalidParamsError: a field is missing or has the wrong type; ``details['parameter']``
            names it.
    """
    method = _field(obj, "method", str)
    if not isinstance(method, str) or not _QUALIFIED_NAME.fullmatch(method):
        raise InvalidParamsError(
            "varlink call: 'method' must be a qualified name like io.runtimed.Exec",
            details={"parameter": "method"},
        )
    call = Call(
        method=method,
        parameters=_parameters(obj),
        more=_flag(obj, "more"),
        oneway=_flag(obj, "oneway"),
        upgrade=_flag(obj, "upgrade"),
    )
    if call.more and call.oneway:
        raise InvalidParamsError(
            "varlink call: 'more' and 'oneway' exclude each other", details={"parameter": "oneway"}
        )
    return call


def parse_reply(obj: Mapping[str, Json]) -> Reply:
    """Validate a decoded JSON object as a reply.

    Raises:
        InvalidParamsError: a field has the wrong type; ``details['parameter']`` names it.
    """
    error = _field(obj, "error", str)
    if error is not None and not (isinstance(error, str) and _QUALIFIED_NAME.fullmatch(error)):
        raise InvalidParamsError(
            "varlink reply: 'error' must be a qualified error name",
            details={"parameter": "error"},
        )
    return Reply(
        parameters=_parameters(obj),
        continues=_flag(obj, "continues"),
        error=error if isinstance(error, str) else None,
    )


def _reject_constant(name: str) -> Json:
    # Python's json accepts NaN and Infinity, which are not JSON (RFC 8259).
    raise ValueError(f"{name} is not JSON")


class Connection:
    """The sans-IO codec of one side of one varlink connection.

    Args:
        role: ``Role.SERVER`` parses calls, ``Role.CLIENT`` parses replies.
        max_frame_size: The largest message accepted or sent, in bytes without the NUL.
    """

    def __init__(self, role: Role, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 2:
            raise ValueError("max_frame_size must allow at least '{}'")
        self.role = role
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer known to hold no NUL
        self._eof = False
        self._broken: MalformedFrameError | None = None

    @property
    def broken(self) -> bool:
        """True once framing failed; every later :meth:`next_event` raises again."""
        return self._broken is not None

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` records end of file.

        Raises:
            MalformedFrameError: data after end of file.
        """
        if self._eof:
            self._fail("varlink connection: data after end of file")
        if data:
            self._buffer += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        """The next complete message, :data:`NEED_DATA`, or :data:`EOF`.

        Raises:
            MalformedFrameError: the framing is broken (oversized, not JSON, not an object,
                truncated); the connection cannot recover and should be closed.
            InvalidParamsError: a complete message with a missing or mistyped field; the frame
                is consumed and the connection can go on.
        """
        if self._broken is not None:
            raise self._broken
        end = self._buffer.find(0, self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self.max_frame_size:
                self._fail(f"varlink frame exceeds {self.max_frame_size} bytes")
            if self._eof:
                if self._buffer:
                    self._fail("varlink connection closed inside a frame")
                return EOF
            return NEED_DATA
        if end > self.max_frame_size:
            self._fail(f"varlink frame exceeds {self.max_frame_size} bytes")
        frame = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        obj = self._decode(frame)
        return parse_call(obj) if self.role is Role.SERVER else parse_reply(obj)

    def send(self, message: Call | Reply) -> bytes:
        """The bytes of one message, NUL-terminated.

        Raises:
            InvalidParamsError: a server sending a call, a client sending a reply, or a
                message larger than ``max_frame_size`` (``details['parameter']`` is
                ``parameters``).
            TypeError, ValueError: a value is not JSON (an object, NaN, infinity): a bug of
                whoever built the message.
        """
        expected = Reply if self.role is Role.SERVER else Call
        if not isinstance(message, expected):
            raise InvalidParamsError(
                f"varlink {self.role} cannot send a {type(message).__name__}",
                details={"parameter": "message"},
            )
        data = json.dumps(
            message.to_json(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        if len(data) > self.max_frame_size:
            raise InvalidParamsError(
                f"varlink message of {len(data)} bytes exceeds {self.max_frame_size} bytes",
                details={"parameter": "parameters"},
            )
        return data + b"\0"

    def _decode(self, frame: bytes) -> dict[str, Json]:
        try:
            obj = json.loads(frame.decode("utf-8"), parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            self._fail(f"varlink frame is not UTF-8 JSON: {exc}")
        if not isinstance(obj, dict):
            self._fail("varlink frame is not a JSON object")
        return obj

    def _fail(self, message: str) -> NoReturn:
        self._broken = MalformedFrameError(message)
        raise self._broken
