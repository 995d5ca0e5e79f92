"""IO: systemd integration: socket activation (pure env parsing) and sd_notify (one send).

Socket activation (sd_listen_fds(3)): systemd passes listening sockets as fds 3, 4, ... and
says so in ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (which process they are meant for) and
``LISTEN_FDNAMES`` (colon-separated names, from ``FileDescriptorName=``). The parsing takes the
environment as a mapping, as gunicorn's ``systemd.py`` does, so it is tested without a process.

Readiness (sd_notify(3)): one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named
in ``NOTIFY_SOCKET``; a leading ``@`` names the abstract namespace.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from runtimed.errors import ConfigError

# systemd/sd-daemon.h
SD_LISTEN_FDS_START: Final = 3
ACTIVATION_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenFd:
    """One socket systemd passed in."""

    fd: int
    name: str


def parse_listen_fds(env: Mapping[str, str], *, pid: int) -> tuple[ListenFd, ...]:
    """The sockets passed by socket activation to process ``pid``; () when there are none.

    Raises:
        ConfigError: the variables are set for this process but malformed (the variable is
            named in ``details['key']``).
    """
    if env.get("LISTEN_PID") != str(pid) or "LISTEN_FDS" not in env:
        return ()
    count_text = env["LISTEN_FDS"]
    if not count_text.isdigit() or int(count_text) > 1024:
        raise ConfigError(
            f"LISTEN_FDS={count_text!r} is not a socket count", details={"key": "LISTEN_FDS"}
        )
    count = int(count_text)
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else ["unknown"] * count
    if len(names) != count:
        raise ConfigError(
            f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS={count}",
            details={"key": "LISTEN_FDNAMES"},
        )
    return tuple(ListenFd(fd=SD_LISTEN_FDS_START + i, name=name) for i, name in enumerate(names))


def format_notify(**fields: str) -> bytes:
    """An sd_notify datagram: ``format_notify(READY="1", STATUS="serving")``."""
    for key, value in fields.items():
        if not key.isupper() or "\n" in value:
            raise ValueError(f"sd_notify field {key}={value!r} is not a KEY=one-line value")
    return "".join(f"{key}={value}\n" for key, value in fields.items()).encode()


def notify_address(env: Mapping[str, str]) -> str | None:
    """The socket address sd_notify sends to, None when not supervised (pure)."""
    path = env.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return None
    return "\0" + path[1:] if path[0] == "@" else path


def notify(env: Mapping[str, str], **fields: str) -> bool:
    """Send one sd_notify datagram if ``NOTIFY_SOCKET`` is set; True when sent.

    A failure to send is reported as False, not raised: readiness notification must never
    take the service down (systemd then sees a start-up timeout and says so).
    """
    address = notify_address(env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(format_notify(**fields), address)
    except OSError:
        return False
    return True


def listen_fd_is_unix_stream(fd: int) -> bool:
    """Whether an inherited fd is a listening AF_UNIX stream socket (sd_is_socket_unix)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    with sock:
        return (
            sock.family == socket.AF_UNIX
            and sock.type == socket.SOCK_STREAM
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        )
