"""ExecSpec validation and its pure helpers (users, command, environment, sizes)."""

from __future__ import annotations

import pytest

from runtimed.errors import InvalidSpecError, Json
from sandbox.spec import (
    DEFAULT_PATH,
    BindSpec,
    ExecSpec,
    Identity,
    Network,
    Rlimit,
    command,
    merge_env,
    parse_size,
    resolve_user,
)

PASSWD = "root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000::/home/build:/bin/sh\n# comment\n"
GROUP = "root:x:0:\nbuild:x:1000:\nwheel:x:10:build,other\ndisk:x:6:\n"


# Every field set, each in its canonical form (what to_json gives back).
FULL_REQUEST: dict[str, Json] = {
    "snapshot": "sha256:ab",
    "platform": "linux/arm64",
    "args": ["sh", "-c", "true"],
    "env": {"A": "1"},
    "cwd": "/work",
    "user": "build:wheel",
    "hostname": "b1",
    "network": "host",
    "mounts": [{"source": "/src", "destination": "/src", "readonly": True}],
    "tmpfs": [{"destination": "/tmp", "size": 1024}, {"destination": "/run"}],
    "rlimits": {"nofile": [64, 128]},
    "memory": 1 << 20,
    "pids": 10,
    "cpus": 0.5,
    "timeout": 3.0,
    "stdin": {"data": "aGk="},
    "commit": True,
    "hermetic": True,
}


def test_spec_from_json_full_request() -> None:
    spec = ExecSpec.from_json({**FULL_REQUEST, "cwd": "/work//x/", "timeout": 3})
    assert spec.cwd == "/work/x"
    assert spec.network is Network.HOST
    assert spec.mounts == (BindSpec(source="/src", destination="/src", readonly=True),)
    assert spec.rlimits == (Rlimit(name="nofile", soft=64, hard=128),)
    assert spec.stdin == b"hi"
    assert spec.timeout == 3.0


def test_spec_from_json_defaults() -> None:
    spec = ExecSpec.from_json({"snapshot": "s"})
    assert spec.network is Network.NONE
    assert spec.hostname == "sandbox"
    assert spec.stdin is None
    assert not spec.commit


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ([], "request"),
        ({}, "snapshot"),
        ({"snapshot": "s", "bogus": 1}, "bogus"),
        ({"snapshot": 3}, "snapshot"),
        ({"snapshot": "s", "args": ["a\0b"]}, "args"),
        ({"snapshot": "s", "env": {"A=B": "x"}}, "env.A=B"),
        ({"snapshot": "s", "cwd": "relative"}, "cwd"),
        ({"snapshot": "s", "cwd": "/a/../etc"}, "cwd"),
        ({"snapshot": "s", "user": "a b"}, "user"),
        ({"snapshot": "s", "hostname": "-bad"}, "hostname"),
        ({"snapshot": "s", "hostname": "x" * 65}, "hostname"),
        ({"snapshot": "s", "network": "bridge"}, "network"),
        (
            {"snapshot": "s", "mounts": [{"source": "/a", "destination": "/"}]},
            "mounts[0].destination",
        ),
        ({"snapshot": "s", "mounts": [{"source": "a", "destination": "/a"}]}, "mounts[0].source"),
        (
            {"snapshot": "s", "mounts": [{"source": "/a", "destination": "/b", "readonly": 1}]},
            "mounts[0].readonly",
        ),
        ({"snapshot": "s", "tmpfs": [{"destination": "/t", "size": -1}]}, "size"),
        ({"snapshot": "s", "rlimits": {"bogus": [1, 1]}}, "rlimits.bogus"),
        ({"snapshot": "s", "rlimits": {"nofile": [2, 1]}}, "rlimits.nofile"),
        ({"snapshot": "s", "memory": 0}, "memory"),
        ({"snapshot": "s", "pids": True}, "pids"),
        ({"snapshot": "s", "timeout": -1}, "timeout"),
        ({"snapshot": "s", "stdin": {"data": "!!"}}, "stdin.data"),
        ({"snapshot": "s", "stdin": "data"}, "stdin"),
        ({"snapshot": "s", "commit": "yes"}, "commit"),
    ],
)
def test_spec_from_json_names_the_bad_field(request_: Json, field: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        ExecSpec.from_json(request_)
    assert info.value.details["field"] == field


@pytest.mark.parametrize(
    ("text", "identity"),
    [
        (None, Identity(uid=0, gid=0, home="/root")),
        ("build", Identity(uid=1000, gid=1000, groups=(10,), home="/home/build")),
        ("1000", Identity(uid=1000, gid=1000, groups=(10,), home="/home/build")),
        ("build:disk", Identity(uid=1000, gid=6, groups=(10,), home="/home/build")),
        ("4242", Identity(uid=4242, gid=0)),
        ("4242:77", Identity(uid=4242, gid=77)),
    ],
)
def test_spec_resolve_user(text: str | None, identity: Identity) -> None:
    assert resolve_user(text, passwd=PASSWD, group=GROUP) == identity


@pytest.mark.parametrize("text", ["nobody", "build:nogroup", ":1", "1:"])
def test_spec_resolve_user_refuses_unknown_names(text: str) -> None:
    with pytest.raises(InvalidSpecError, match="user"):
        resolve_user(text, passwd=PASSWD, group=GROUP)


@pytest.mark.parametrize(
    ("args", "entrypoint", "cmd", "argv"),
    [
        (["ls"], ["/init"], ["x"], ["ls"]),
        ([], ["/init"], ["x"], ["/init", "x"]),
        ([], [], ["sh"], ["sh"]),
    ],
)
def test_spec_command(
    args: list[str], entrypoint: list[str], cmd: list[str], argv: list[str]
) -> None:
    assert command(args, entrypoint=entrypoint, cmd=cmd) == argv


def test_spec_command_refuses_nothing_to_run() -> None:
    with pytest.raises(InvalidSpecError, match="args"):
        command([], entrypoint=[], cmd=[])


def test_spec_merge_env_request_wins() -> None:
    env = merge_env(["A=1", "B=2", "junk"], [("B", "3")], home="/root", hostname="h")
    assert env == {"PATH": DEFAULT_PATH, "HOSTNAME": "h", "HOME": "/root", "A": "1", "B": "3"}


@pytest.mark.parametrize(
    ("text", "size"), [("1024", 1024), ("4k", 4096), ("512m", 512 << 20), ("2GB", 2 << 30)]
)
def test_spec_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-1", "1x", "m"])
def test_spec_parse_size_refuses(text: str) -> None:
    with pytest.raises(InvalidSpecError):
        parse_size(text)


def test_spec_to_json_round_trips_through_from_json() -> None:
    spec = ExecSpec.from_json(FULL_REQUEST)
    assert ExecSpec.from_json(spec.to_json()) == spec
    assert spec.to_json() == {**FULL_REQUEST, "shm_size": spec.shm_size}
