"""The runner's wire format: plan tokens in the order runner.c reads them, and status lines."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtimed.errors import Json, SandboxError
from sandbox.plan import Plan
from sandbox.spec import Identity
from sandbox.wire import (
    COMMAND_MAGIC,
    SHAPE_MAGIC,
    ExecFailed,
    Exited,
    Finished,
    Started,
    StepFailed,
    encode_plan,
    encode_shape,
    join_cgroups,
    parse_status,
)
from tests.unit.sandbox.plans import sample_plan


def _plan(**request: Json) -> Plan:
    return sample_plan(
        argv=["sh", "-c", "echo hi"],
        env={"PATH": "/bin", "A": "x=y"},
        identity=Identity(uid=1000, gid=1001, groups=(10, 20)),
        **request,
    )


def _tokens(data: bytes) -> list[str]:
    assert data.endswith(b"\0")
    return [t.decode() for t in data[:-1].split(b"\0")]


def _after(tokens: list[str], key: str, n: int) -> list[str]:
    i = tokens.index(key)
    return tokens[i + 1 : i + 1 + n]


def _in_order(tokens: list[str], keys: list[str]) -> bool:
    return [tokens.index(k) for k in keys] == sorted(tokens.index(k) for k in keys)


def test_wire_plan_halves_in_the_runners_order() -> None:
    plan = _plan(rlimits={"nofile": [10, 20]}, cwd="/work")
    encoded = encode_plan(plan, capabilities=0b101)
    shape, command = _tokens(encoded.shape), _tokens(encoded.command)
    assert (shape[0], shape[-1]) == (SHAPE_MAGIC, "end")
    assert (command[0], command[-1]) == (COMMAND_MAGIC, "end")
    assert _in_order(
        shape,
        [
            "overlay", "workspace", "scratch", "namespaces", "hostname", "loopback",
            "uid_map", "gid_map", "binfmt", "ops", "cgroups",
        ],
    )  # fmt: skip
    assert _in_order(
        command, ["cwd", "uid", "gid", "groups", "rlimits", "capabilities", "argv", "env"]
    )
    assert _after(shape, "overlay", 1) == [plan.root.options()]
    assert _after(shape, "scratch", 1) == ["0"]
    assert _after(shape, "namespaces", 6) == ["5", "mount", "pid", "uts", "ipc", "net"]
    assert _after(shape, "cgroups", 2) == ["1", "/sys/fs/cgroup/pids/runtimed/r1"]
    assert _after(shape, "ops", 1) == [str(len(plan.ops))]
    assert _after(command, "cwd", 1) == ["/work"]
    assert _after(command, "uid", 1) == ["1000"]
    assert _after(command, "groups", 3) == ["2", "10", "20"]
    assert _after(command, "rlimits", 4) == ["1", "nofile", "10", "20"]
    assert _after(command, "capabilities", 1) == ["5"]
    assert _after(command, "argv", 4) == ["3", "sh", "-c", "echo hi"]
    assert _after(command, "env", 3)[0] == "2"
    assert "A=x=y" in _after(command, "env", 3)


def test_wire_shapes_without_cgroups_name_the_sandbox() -> None:
    # A spare runner already sits in cgroups of its own: plans that differ in their cgroups
    # (and in what runs) build the same sandbox, plans that differ in the sandbox do not.
    plan = _plan()
    plan = dataclasses.replace(plan, accounting=(f"{plan.cgroups[0]}/pids.peak",))
    same = dataclasses.replace(
        plan, cgroups=("/elsewhere",), accounting=("/elsewhere/cpu.stat",), argv=("true",), uid=0
    )
    other = _plan(hostname="other")
    keys = [
        encode_shape(dataclasses.replace(p, cgroups=(), accounting=())) for p in (plan, same, other)
    ]
    assert keys[0] == keys[1] != keys[2]
    assert encode_shape(plan) != keys[0]  # with its cgroups
    assert encode_shape(plan) == encode_plan(plan, capabilities=0).shape
    assert _after(_tokens(keys[0]), "cgroups", 1) == ["0"]
    # A run's cgroups added to the shape encoded once equal the plan encoded with them.
    assert join_cgroups(keys[0], plan.cgroups, plan.accounting) == encode_shape(plan)
    assert _after(_tokens(encode_shape(plan)), "accounting", 2) == ["1", plan.accounting[0]]
    with pytest.raises(SandboxError, match="already names its cgroups"):
        join_cgroups(encode_shape(plan), ("/sys/fs/cgroup/other",), ())
    with pytest.raises(SandboxError, match="NUL"):
        join_cgroups(keys[0], ("/sys/fs/cgroup/a\0b",), ())


def test_wire_plan_ops_carry_their_fields() -> None:
    plan = _plan(
        mounts=[{"source": "/src", "destination": "/opt/src", "readonly": True}],
        tmpfs=[{"destination": "/scratch", "size": 4096}],
    )
    tokens = _tokens(encode_plan(plan, capabilities=0).shape)
    i = tokens.index("/opt/src")
    assert tokens[i - 2 : i + 2] == ["bind", "/src", "/opt/src", "1"]
    i = tokens.index("/scratch")
    assert tokens[i - 1 : i + 5] == ["tmpfs", "/scratch", str(0o1777), "4096", "0", "1"]
    i = tokens.index("/etc/hostname")
    assert tokens[i - 1 : i + 2] == ["file", "/etc/hostname", "sandbox\n"]
    i = tokens.index("/dev/ptmx")
    assert tokens[i - 2 : i + 1] == ["symlink", "pts/ptmx", "/dev/ptmx"]


def test_wire_plan_refuses_nul_bytes_and_out_of_range_numbers() -> None:
    with pytest.raises(SandboxError, match="NUL"):
        encode_plan(dataclasses.replace(_plan(), argv=("a\0b",)), capabilities=0)
    with pytest.raises(SandboxError, match="out of range"):
        encode_plan(_plan(), capabilities=1 << 64)


@given(st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b))
def test_wire_status_paths_survive_any_bytes(raw: bytes) -> None:
    line = f'{{"type":"started","pid":7,"exe":"{raw.hex()}"}}'.encode()
    started = parse_status(line)
    assert isinstance(started, Started)
    assert started.exe.encode("utf-8", "surrogateescape") == raw


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b'{"type":"error","syscall":"mount","errno":2,"path":"2f78","flags":4096,"op":3}',
            StepFailed(syscall="mount", errno=2, path="/x", flags=4096, op=3),
        ),
        (
            b'{"type":"error","syscall":"fork","errno":11,"path":null,"flags":null,"op":null}',
            StepFailed(syscall="fork", errno=11, path=None, flags=None, op=None),
        ),
        (b'{"type":"exec_error","errno":13}', ExecFailed(errno=13)),
        (b'{"type":"exited","code":3}', Exited(code=3, signal=None)),
        (b'{"type":"exited","signal":9}', Exited(code=None, signal=9)),
        (b'{"type":"finished","accounting":[]}', Finished(accounting=())),
        (
            b'{"type":"finished","accounting":["757361676520310a",null]}',
            Finished(accounting=("usage 1\n", None)),
        ),
    ],
)
def test_wire_status_lines(line: bytes, expected: object) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1]",
        b'{"type":"bogus"}',
        b'{"type":"started","pid":"7","exe":""}',
        b'{"type":"started","pid":7,"exe":"zz"}',
        b'{"type":"exec_error","errno":true}',
        b'{"type":"finished"}',
        b'{"type":"finished","accounting":[1]}',
        b'{"type":"finished","accounting":["zz"]}',
    ],
)
def test_wire_status_refuses_what_the_runner_never_writes(line: bytes) -> None:
    with pytest.raises(SandboxError, match="sandbox runner status"):
        parse_status(line)
