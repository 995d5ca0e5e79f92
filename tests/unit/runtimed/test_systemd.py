"""systemd socket activation parsing and sd_notify datagrams."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from runtimed.errors import ConfigError
from runtimed.systemd import (
    ListenFd,
    format_notify,
    notify,
    notify_address,
    parse_listen_fds,
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ()),
        ({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, ()),  # meant for another process
        ({"LISTEN_PID": "42"}, ()),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, ()),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, (ListenFd(fd=3, name="unknown"),)),
        (
            {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "varlink:other"},
            (ListenFd(fd=3, name="varlink"), ListenFd(fd=4, name="other")),
        ),
    ],
)
def test_systemd_listen_fds(env: dict[str, str], expected: tuple[ListenFd, ...]) -> None:
    assert parse_listen_fds(env, pid=42) == expected


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, "LISTEN_FDS"),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}, "LISTEN_FDNAMES"),
    ],
)
def test_systemd_listen_fds_malformed_names_the_variable(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen_fds(env, pid=42)
    assert info.value.details["key"] == key


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        ("", None),
        ("relative", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract/notify", "\0abstract/notify"),
    ],
)
def test_systemd_notify_address(value: str | None, address: str | None) -> None:
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert notify_address(env) == address


def test_systemd_format_notify() -> None:
    assert (
        format_notify(READY="1", STATUS="serving 0 execs") == b"READY=1\nSTATUS=serving 0 execs\n"
    )
    with pytest.raises(ValueError, match="one-line"):
        format_notify(STATUS="two\nlines")


def test_systemd_notify_sends_one_datagram(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        assert notify({"NOTIFY_SOCKET": str(path)}, READY="1", STATUS="ok")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=ok\n"


def test_systemd_notify_abstract_namespace(tmp_path: Path) -> None:
    name = f"runtimed-test-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        assert notify({"NOTIFY_SOCKET": "@" + name}, STOPPING="1")
        assert receiver.recv(4096) == b"STOPPING=1\n"


def test_systemd_notify_without_supervisor_or_listener_is_false(tmp_path: Path) -> None:
    assert not notify({}, READY="1")
    assert not notify({"NOTIFY_SOCKET": str(tmp_path / "absent")}, READY="1")
