"""Pure. An exec request as a validated value: what to run, where, as whom, with which limits.

:meth:`ExecSpec.from_json` checks every field of the request the RPC (and ``runtimectl run``)
carries and raises :class:`InvalidSpecError` whose ``details['field']`` names the bad one. The
helpers below combine a spec with the snapshot's image config (command, environment) and the
rootfs's ``/etc/passwd`` and ``/etc/group`` text (user names), still without any I/O.
"""

from __future__ import annotations

import base64
import binascii
import enum
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from runtimed.errors import InvalidSpecError, Json

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_HOSTNAME: Final = "sandbox"
DEFAULT_SHM_SIZE: Final = 64 * 1024 * 1024
# RLIMIT_* names accepted in "rlimits", lowercase without the prefix (setrlimit(2)).
RLIMIT_NAMES: Final = frozenset(
    {"as", "core", "cpu", "data", "fsize", "memlock", "msgqueue", "nice", "nofile", "nproc"}
    | {"rtprio", "stack"}
)
# RFC 1123 host name label rules, 64 bytes as sethostname(2) allows.
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?")
_ENV_NAME_RE: Final = re.compile(r"[^=\0]+")
_SIZE_RE: Final = re.compile(r"([0-9]+)([kmgt]?)b?", re.IGNORECASE)
_SIZE_UNITS: Final[Mapping[str, int]] = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
}
_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?")
_KNOWN_FIELDS: Final = frozenset(
    {"snapshot", "platform", "args", "env", "cwd", "user", "hostname", "network", "mounts"}
    | {"tmpfs", "rlimits", "memory", "pids", "cpus", "timeout", "stdin", "commit", "shm_size"}
    | {"hermetic"}
)


class Network(enum.StrEnum):
    NONE = "none"
    HOST = "host"


@dataclass(frozen=True, slots=True, kw_only=True)
class BindSpec:
    """A host directory or file bound into the sandbox."""

    source: str
    destination: str
    readonly: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TmpfsSpec:
    destination: str
    size: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rlimit:
    name: str
    soft: int
    hard: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecSpec:
    """One validated exec request; defaults are the sandbox's default profile."""

    snapshot: str
    platform: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    user: str | None = None
    hostname: str = DEFAULT_HOSTNAME
    network: Network = Network.NONE
    mounts: tuple[BindSpec, ...] = ()
    tmpfs: tuple[TmpfsSpec, ...] = ()
    rlimits: tuple[Rlimit, ...] = ()
    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    timeout: float | None = None
    stdin: bytes | None = None
    commit: bool = False
    shm_size: int = DEFAULT_SHM_SIZE
    hermetic: bool = False

    @classmethod
    def from_json(cls, obj: Json) -> ExecSpec:
        """Validate a request object field by field.

        Raises:
            InvalidSpecError: a field is missing, unknown, of the wrong type or out of range;
                ``details['field']`` names it.
        """
        if not isinstance(obj, dict):
            raise _invalid("request", "must be a JSON object")
        for key in obj:
            if key not in _KNOWN_FIELDS:
                raise _invalid(key, "is not a known field")
        snapshot = _string(obj, "snapshot", required=True)
        assert snapshot is not None
        stdin = obj.get("stdin")
        return cls(
            snapshot=snapshot,
            platform=_string(obj, "platform"),
            args=tuple(_string_list(obj, "args")),
            env=_env(obj.get("env")),
            cwd=_optional_path(obj, "cwd"),
            user=_user_text(obj.get("user")),
            hostname=_hostname(obj.get("hostname", DEFAULT_HOSTNAME)),
            network=_network(obj.get("network", "none")),
            mounts=_mounts(obj.get("mounts", [])),
            tmpfs=_tmpfs(obj.get("tmpfs", [])),
            rlimits=_rlimits(obj.get("rlimits", {})),
            memory=_positive_int(obj, "memory"),
            pids=_positive_int(obj, "pids"),
            cpus=_positive_number(obj, "cpus"),
            timeout=_positive_number(obj, "timeout"),
            stdin=None if stdin in (None, "none") else _stdin(stdin),
            commit=_bool(obj, "commit"),
            shm_size=_positive_int(obj, "shm_size") or DEFAULT_SHM_SIZE,
            hermetic=_bool(obj, "hermetic"),
        )

    def to_json(self) -> dict[str, Json]:
        """The request object :meth:`from_json` reads back to an equal spec."""
        out: dict[str, Json] = {
            "snapshot": self.snapshot,
            "args": list(self.args),
            "env": dict(self.env),
            "hostname": self.hostname,
            "network": str(self.network),
            "mounts": [
                {"source": m.source, "destination": m.destination, "readonly": m.readonly}
                for m in self.mounts
            ],
            "tmpfs": [
                {"destination": t.destination}
                if t.size is None
                else {"destination": t.destination, "size": t.size}
                for t in self.tmpfs
            ],
            "rlimits": {r.name: [r.soft, r.hard] for r in self.rlimits},
            "commit": self.commit,
            "shm_size": self.shm_size,
            "hermetic": self.hermetic,
        }
        optional: dict[str, Json] = {
            "platform": self.platform,
            "cwd": self.cwd,
            "user": self.user,
            "memory": self.memory,
            "pids": self.pids,
            "cpus": self.cpus,
            "timeout": self.timeout,
            "stdin": None
            if self.stdin is None
            else {"data": base64.b64encode(self.stdin).decode("ascii")},
        }
        out.update({key: value for key, value in optional.items() if value is not None})
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who the command runs as, resolved against the rootfs's account databases."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"


def _invalid(field: str, why: str) -> InvalidSpecError:
    return InvalidSpecError(f"invalid exec request: {field} {why}", details={"field": field})


def _string(obj: Mapping[str, Json], field: str, *, required: bool = False) -> str | None:
    value = obj.get(field)
    if value is None:
        if required:
            raise _invalid(field, "is required")
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise _invalid(field, "must be a non-empty string without NUL")
    return value


def _string_list(obj: Mapping[str, Json], field: str) -> list[str]:
    value = obj.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        raise _invalid(field, "must be a list of strings without NUL")
    return [v for v in value if isinstance(v, str)]


def _bool(obj: Mapping[str, Json], field: str) -> bool:
    value = obj.get(field, False)
    if not isinstance(value, bool):
        raise _invalid(field, "must be true or false")
    return value


def _positive_int(obj: Mapping[str, Json], field: str) -> int | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _invalid(field, "must be a positive integer")
    return value


def _positive_number(obj: Mapping[str, Json], field: str) -> float | None:
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _invalid(field, "must be a positive number")
    return float(value)


def sandbox_path(text: Json, field: str) -> str:
    """An absolute, normalised path without ``..`` components, or InvalidSpecError."""
    if not isinstance(text, str) or not text.startswith("/") or "\0" in text:
        raise _invalid(field, "must be an absolute path")
    if ".." in text.split("/"):
        raise _invalid(field, "must not contain '..'")
    return posixpath.normpath(text).replace("//", "/")


def _optional_path(obj: Mapping[str, Json], field: str) -> str | None:
    value = obj.get(field)
    return None if value is None else sandbox_path(value, field)


def _env(value: Json) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _invalid("env", "must be an object of strings")
    out = []
    for key, item in value.items():
        if not _ENV_NAME_RE.fullmatch(key) or not isinstance(item, str) or "\0" in item:
            raise _invalid(f"env.{key}", "must be a name without '=' and a string value")
        out.append((key, item))
    return tuple(out)


def _user_text(value: Json) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid("user", "must be a string")
    parse_user(value)
    return value


def _hostname(value: Json) -> str:
    if not isinstance(value, str) or not _HOSTNAME_RE.fullmatch(value):
        raise _invalid("hostname", "must be a host name of at most 64 letters, digits, '.', '-'")
    return value


def _network(value: Json) -> Network:
    if value not in tuple(Network):
        raise _invalid("network", "must be 'none' or 'host'")
    return Network(str(value))


def _mounts(value: Json) -> tuple[BindSpec, ...]:
    if not isinstance(value, list):
        raise _invalid("mounts", "must be a list")
    out = []
    for i, item in enumerate(value):
        field = f"mounts[{i}]"
        if not isinstance(item, dict):
            raise _invalid(field, "must be an object")
        readonly = item.get("readonly", False)
        if not isinstance(readonly, bool):
            raise _invalid(f"{field}.readonly", "must be true or false")
        out.append(
            BindSpec(
                source=sandbox_path(item.get("source"), f"{field}.source"),
                destination=_mount_destination(item.get("destination"), f"{field}.destination"),
                readonly=readonly,
            )
        )
    return tuple(out)


def _mount_destination(value: Json, field: str) -> str:
    path = sandbox_path(value, field)
    if path == "/":
        raise _invalid(field, "must not be /")
    return path


def _tmpfs(value: Json) -> tuple[TmpfsSpec, ...]:
    if not isinstance(value, list):
        raise _invalid("tmpfs", "must be a list")
    out = []
    for i, item in enumerate(value):
        field = f"tmpfs[{i}]"
        if not isinstance(item, dict):
            raise _invalid(field, "must be an object")
        out.append(
            TmpfsSpec(
                destination=_mount_destination(item.get("destination"), f"{field}.destination"),
                size=_positive_int(item, "size"),
            )
        )
    return tuple(out)


def _rlimits(value: Json) -> tuple[Rlimit, ...]:
    if not isinstance(value, dict):
        raise _invalid("rlimits", "must be an object")
    out = []
    for name, item in value.items():
        field = f"rlimits.{name}"
        if name not in RLIMIT_NAMES:
            raise _invalid(field, f"is not one of {', '.join(sorted(RLIMIT_NAMES))}")
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)
        ):
            raise _invalid(field, "must be [soft, hard] non-negative integers")
        soft, hard = (int(v) for v in item if isinstance(v, int))
        if soft > hard:
            raise _invalid(field, "soft limit must not exceed the hard limit")
        out.append(Rlimit(name=name, soft=soft, hard=hard))
    return tuple(out)


def _stdin(value: Json) -> bytes:
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise _invalid("stdin", "must be 'none' or {'data': base64}")
    data = value["data"]
    assert isinstance(data, str)
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise _invalid("stdin.data", "is not valid base64") from None


def parse_size(text: str, *, field: str = "size") -> int:
    """``512m``/``2G``/``1024`` (binary units) to bytes.

    Raises:
        InvalidSpecError: not a size.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise _invalid(field, f"must be a positive size like 512m, not {text!r}")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def parse_user(text: str) -> tuple[str, str | None]:
    """Split ``user[:group]``; each part is a number or an account name.

    Raises:
        InvalidSpecError: empty or malformed parts.
    """
    user, sep, group = text.partition(":")
    for part in (user, group) if sep else (user,):
        if not (part.isdigit() or _NAME_RE.fullmatch(part)):
            raise _invalid("user", f"must be uid[:gid] or a name, not {text!r}")
    return user, group if sep else None


def _database(text: str) -> list[list[str]]:
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(text: str | None, *, passwd: str, group: str) -> Identity:
    """Resolve ``uid[:gid]`` or names against the rootfs's ``/etc/passwd`` and ``/etc/group``.

    A numeric uid absent from passwd is allowed (gid then defaults to the uid's, or 0), as
    Docker does; a name must exist.

    Raises:
        InvalidSpecError: an unknown name or a malformed database line.
    """
    if text is None:
        text = "0"
    user, group_part = parse_user(text)
    users = [row for row in _database(passwd) if len(row) >= 7]
    entry = next((row for row in users if row[0] == user or row[2] == user), None)
    if entry is None and not user.isdigit():
        raise _invalid("user", f"{user!r} is not in the rootfs's /etc/passwd")
    uid = int(user) if user.isdigit() else int(entry[2]) if entry else 0
    gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    home = entry[5] if entry else "/"
    groups = [row for row in _database(group) if len(row) >= 4 and row[2].isdigit()]
    if group_part is not None:
        match = next((row for row in groups if group_part in (row[0], row[2])), None)
        if match is None and not group_part.isdigit():
            raise _invalid("user", f"group {group_part!r} is not in the rootfs's /etc/group")
        gid = int(group_part) if group_part.isdigit() else int(match[2]) if match else 0
    name = entry[0] if entry else None
    extra = sorted({int(row[2]) for row in groups if name and name in row[3].split(",")} - {gid})
    return Identity(uid=uid, gid=gid, groups=tuple(extra), home=home or "/")


def command(args: Sequence[str], *, entrypoint: Sequence[str], cmd: Sequence[str]) -> list[str]:
    """The argv to run: the request's args, else the image's entrypoint + cmd.

    Raises:
        InvalidSpecError: neither gives a command.
    """
    argv = list(args) if args else [*entrypoint, *cmd]
    if not argv or not argv[0]:
        raise _invalid("args", "are empty and the image has no entrypoint or cmd")
    return argv


def merge_env(
    image_env: Sequence[str], request_env: Sequence[tuple[str, str]], *, home: str, hostname: str
) -> dict[str, str]:
    """The request's variables over the image's ``K=V`` list, with PATH, HOME, HOSTNAME."""
    env = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, "HOME": home}
    for item in image_env:
        key, sep, value = item.partition("=")
        if sep and key:
            env[key] = value
    env.update(request_env)
    return env
