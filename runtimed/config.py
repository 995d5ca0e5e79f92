"""Pure. The daemon's configuration: TOML text in, a validated frozen :class:`Config` out.

Every key has an embedded default, so no file is needed. The file (``/etc/runtimed/
runtimed.toml`` unless ``--config`` names another) looks like::

    socket = "/run/runtimed/runtimed.sock"
    state_dir = "/var/lib/runtimed"
    binfmt_misc = "/proc/sys/fs/binfmt_misc"
    group = "runtimed"              # clients in this group (and root) may connect
    emulators = "auto"              # or a list: ["linux/arm64", "linux/s390x"]; [] for none
    log_level = "info"              # debug, info, warning, error
    shutdown_grace = 5.0            # seconds running execs get after SIGTERM

    [limits]
    concurrent_execs = 64
    message_size = 8388608          # bytes of one varlink message
    calls_per_connection = 16       # calls one connection may have queued or running

``emulators = "auto"`` means every platform with a static QEMU installed that the host does
not run natively; the daemon resolves it at start-up and on SIGHUP. Command-line flags
override the file through :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from runtimed.errors import ConfigError

DEFAULT_CONFIG_PATH: Final = Path("/etc/runtimed/runtimed.toml")

# POSIX-portable group names as shadow-utils accepts them (useradd(8), "CAVEATS").
_GROUP_NAME: Final = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")
# "os/arch[/variant]"; binfmt.platform parses and normalises it when the daemon uses it.
_PLATFORM: Final = re.compile(r"[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_.]+)?")


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one daemon accepts; exceeding a limit is ``io.runtimed.LimitExceeded``."""

    concurrent_execs: int = 64
    message_size: int = 8 * 1024 * 1024
    calls_per_connection: int = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The daemon's validated configuration. ``emulators`` None means "auto"."""

    socket: Path = Path("/run/runtimed/runtimed.sock")
    state_dir: Path = Path("/var/lib/runtimed")
    binfmt_misc: Path = Path("/proc/sys/fs/binfmt_misc")
    group: str = "runtimed"
    emulators: tuple[str, ...] | None = None
    log_level: LogLevel = LogLevel.INFO
    shutdown_grace: float = 5.0
    limits: Limits = field(default_factory=Limits)


_LIMIT_RANGES: Final[Mapping[str, tuple[int, int]]] = {
    "concurrent_execs": (1, 4096),
    "message_size": (4096, 1024 * 1024 * 1024),
    "calls_per_connection": (1, 1024),
}


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Parse and validate a configuration file's text.

    Raises:
        ConfigError: the text is not TOML, a key is unknown, or a value is invalid; the
            message names the source and the key (``details['key']``).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", details={"source": source}) from exc
    values: dict[str, object] = {}
    for key, value in data.items():
        if key == "limits":
            values["limits"] = _parse_limits(value, source)
        else:
            values[key] = _parse_value(key, value, source)
    return dataclasses.replace(Config(), **values)  # type: ignore[arg-type]


def apply_overrides(config: Config, overrides: Mapping[str, str | None]) -> Config:
    """The configuration with command-line values (None = not given) put over it.

    Keys are top-level config keys (``socket``, ``state_dir``, ``binfmt_misc``, ``group``).

    Raises:
        ConfigError: a value is invalid (``details['key']`` names it).
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {key: _parse_value(key, value, "command line") for key, value in given.items()}
    return dataclasses.replace(config, **values)  # type: ignore[arg-type]


def _error(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}", details={"source": source, "key": key})


def _parse_value(key: str, value: object, source: str) -> object:
    if key in ("socket", "state_dir", "binfmt_misc"):
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise _error(source, key, "must be an absolute path")
        return Path(value)
    if key == "group":
        if not isinstance(value, str) or not _GROUP_NAME.fullmatch(value):
            raise _error(source, key, "must be a group name (like 'runtimed')")
        return value
    if key == "emulators":
        return _parse_emulators(value, source)
    if key == "log_level":
        if not isinstance(value, str) or value not in set(LogLevel):
            raise _error(source, key, f"must be one of {', '.join(LogLevel)}")
        return LogLevel(str(value))
    if key == "shutdown_grace":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
            raise _error(source, key, "must be a number of seconds between 0 and 3600")
        return float(value)
    raise _error(source, key, "unknown key")


def _parse_emulators(value: object, source: str) -> tuple[str, ...] | None:
    if value == "auto":
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise _error(source, "emulators", 'must be "auto" or a list of platforms')
    bad = [p for p in value if not _PLATFORM.fullmatch(p)]
    if bad:
        raise _error(source, "emulators", f"not a platform like linux/arm64: {bad[0]!r}")
    return tuple(dict.fromkeys(value))


def _parse_limits(value: object, source: str) -> Limits:
    if not isinstance(value, dict):
        raise _error(source, "limits", "must be a table")
    values: dict[str, int] = {}
    for key, number in value.items():
        name = f"limits.{key}"
        if key not in _LIMIT_RANGES:
            raise _error(source, name, "unknown key")
        low, high = _LIMIT_RANGES[key]
        if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
            raise _error(source, name, f"must be an integer from {low} to {high}")
        values[key] = number
    return Limits(**values)
