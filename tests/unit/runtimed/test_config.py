"""The daemon's configuration: TOML text to a validated Config (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtimed.config import Config, Limits, LogLevel, apply_overrides, parse_config
from runtimed.errors import ConfigError


def test_config_empty_text_gives_the_embedded_defaults() -> None:
    config = parse_config("")
    assert config == Config()
    assert config.socket == Path("/run/runtimed/runtimed.sock")
    assert config.state_dir == Path("/var/lib/runtimed")
    assert config.group == "runtimed"
    assert config.emulators is None
    assert config.limits == Limits()


def test_config_full_file_is_read() -> None:
    config = parse_config(
        """
        socket = "/run/x.sock"
        state_dir = "/srv/rt"
        binfmt_misc = "/tmp/bm"
        group = "builders"
        emulators = ["linux/arm64", "linux/s390x", "linux/arm64"]
        log_level = "debug"
        shutdown_grace = 2

        [limits]
        concurrent_execs = 3
        message_size = 65536
        calls_per_connection = 4
        """
    )
    assert config == Config(
        socket=Path("/run/x.sock"),
        state_dir=Path("/srv/rt"),
        binfmt_misc=Path("/tmp/bm"),
        group="builders",
        emulators=("linux/arm64", "linux/s390x"),
        log_level=LogLevel.DEBUG,
        shutdown_grace=2.0,
        limits=Limits(concurrent_execs=3, message_size=65536, calls_per_connection=4),
    )


def test_config_empty_emulator_list_means_none() -> None:
    assert parse_config("emulators = []").emulators == ()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("socket = 'relative.sock'", "socket"),
        ("socket = 5", "socket"),
        ("state_dir = ''", "state_dir"),
        ("group = 'Root Group'", "group"),
        ("group = 0", "group"),
        ("emulators = 'all'", "emulators"),
        ("emulators = ['arm64']", "emulators"),
        ("emulators = [1]", "emulators"),
        ("log_level = 'loud'", "log_level"),
        ("log_level = [1]", "log_level"),
        ("shutdown_grace = -1", "shutdown_grace"),
        ("shutdown_grace = true", "shutdown_grace"),
        ("sockets = '/x'", "sockets"),
        ("limits = 5", "limits"),
        ("[limits]\nconcurrent_execs = 0", "limits.concurrent_execs"),
        ("[limits]\nmessage_size = 10", "limits.message_size"),
        ("[limits]\ncalls_per_connection = true", "limits.calls_per_connection"),
        ("[limits]\nstreams = 3", "limits.streams"),
    ],
)
def test_config_invalid_value_names_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="/etc/runtimed/runtimed.toml")
    assert info.value.details["key"] == key
    assert info.value.message.startswith(f"/etc/runtimed/runtimed.toml: {key}: ")


def test_config_not_toml_names_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^f\.toml: not valid TOML"):
        parse_config("socket = ", source="f.toml")


def test_config_overrides_replace_only_given_values() -> None:
    base = parse_config("group = 'builders'\nsocket = '/run/a.sock'")
    config = apply_overrides(base, {"socket": "/tmp/b.sock", "group": None, "state_dir": "/s"})
    assert config.socket == Path("/tmp/b.sock")
    assert config.group == "builders"
    assert config.state_dir == Path("/s")


def test_config_override_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(Config(), {"binfmt_misc": "proc/bm"})
    assert info.value.details == {"source": "command line", "key": "binfmt_misc"}


@given(st.text(max_size=40))
def test_config_arbitrary_text_parses_or_raises_config_error(text: str) -> None:
    try:
        config = parse_config(text)
    except ConfigError:
        return
    assert isinstance(config, Config)
