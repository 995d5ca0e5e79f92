"""The daemon's own parts: journal-style log lines, its socket, loading the configuration."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from runtimed.daemon import JournalFormatter, bind_socket, build_parser, load_config
from runtimed.errors import ConfigError
from runtimed.server import REQUEST_ID


def _record(level: int, message: str, *, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("runtimed.x", level, __file__, 1, message, (), exc_info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
    ],
)
def test_daemon_parts_journal_priority_prefix(level: int, prefix: str) -> None:
    assert JournalFormatter().format(_record(level, "listening")) == f"{prefix}listening"


def test_daemon_parts_journal_lines_carry_the_request_id_and_prefix_every_line() -> None:
    token = REQUEST_ID.set("4.2")
    try:
        text = JournalFormatter().format(_record(logging.ERROR, "internal error", exc=True))
    finally:
        REQUEST_ID.reset(token)
    lines = text.splitlines()
    assert lines[0] == "<3>[4.2] internal error"
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_daemon_parts_own_socket_modes(tmp_path: Path) -> None:
    private = tmp_path / "a" / "rt.sock"
    with bind_socket(private, None):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    shared = tmp_path / "b.sock"
    with bind_socket(shared, os.getgid()):
        info = shared.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, os.getgid())


def test_daemon_parts_stale_socket_is_replaced_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "rt.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # bound, never listening: connect is refused
        with bind_socket(path, None) as live:
            assert live.getsockname() == str(path)
            with pytest.raises(ConfigError, match="another daemon is listening"):
                bind_socket(path, None)


def test_daemon_parts_socket_path_taken_by_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rt.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        bind_socket(path, None)
    assert path.read_text() == "precious"


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_daemon_parts_config_file_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "runtimed.toml"
    config.write_text('group = "builders"\nsocket = "/run/a.sock"\n')
    loaded = load_config(_args("--config", str(config), "--socket", "/run/b.sock"))
    assert (loaded.group, loaded.socket) == ("builders", Path("/run/b.sock"))


def test_daemon_parts_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(_args("--config", str(tmp_path / "missing.toml")))
