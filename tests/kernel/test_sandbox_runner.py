"""The native runner's own refusals, before it creates anything (no namespaces needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest
import trio

from runtimed.errors import SandboxError
from sandbox import cgroups, runner
from sandbox.wire import StepFailed, parse_status
from tests.support import require_root


def _spawn(
    plan: bytes, spawn: Callable[[Sequence[int]], tuple[int, int]] = runner.spawn
) -> tuple[int, list[bytes], bool]:
    """Run a runner on ``plan``: its exit status, its status lines, and whether the spawner
    forked it (its argv is the spawner's then: not exec'd anew)."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    plan_r, plan_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        pid, pidfd = spawn([null, null, null, status_w, plan_r, null])
    finally:
        for fd in (status_w, plan_r, null):
            os.close(fd)
    runner_process = psutil.Process(pid)
    assert runner_process.ppid() == os.getpid()  # ours to reap, however started
    argv = runner_process.cmdline()
    deadline = time.monotonic() + 5
    while not argv and time.monotonic() < deadline:  # a posix_spawn'd one may be mid-exec
        argv = runner_process.cmdline()
    forked = argv[1] == "spawner"
    os.write(plan_w, plan)
    os.close(plan_w)
    exited = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)  # the pidfd is the runner's
    os.close(pidfd)
    assert exited is not None
    assert (exited.si_pid, exited.si_code) == (pid, os.CLD_EXITED)
    with os.fdopen(status_r, "rb") as status:
        return exited.si_status, status.read().splitlines(), forked


def _forked_by(
    spawner: runner.Spawner, make: Sequence[Path] = ()
) -> Callable[[Sequence[int]], tuple[int, int]]:
    """``spawner.spawn`` for the synchronous helpers here."""
    return lambda fds: trio.run(spawner.spawn, fds, make)


@pytest.fixture
def spawner() -> Iterator[runner.Spawner]:
    started = runner.Spawner()
    try:
        yield started
    finally:
        started.close()
    assert not psutil.pid_exists(started.pid)  # reaped


@pytest.mark.parametrize(
    "plan",
    [
        b"",
        b"not-a-plan\0",
        b"runtimed-shape-1\0overlay\0",  # truncated
        b"runtimed-shape-1\0overlay\0x\0workspace\0/w\0scratch\0-1\0",  # negative
        b"runtimed-shape-1\0overlay\0x\0workspace\0/w\0scratch\x001\0namespaces\x001\0time\0",
    ],
)
def test_sandbox_runner_refuses_a_malformed_plan(plan: bytes) -> None:
    code, lines, forked = _spawn(plan)
    assert (code, forked) == (125, False)
    assert [parse_status(line) for line in lines] == [
        StepFailed(syscall="plan", errno=22, path=None, flags=None, op=None)
    ]


def test_sandbox_runner_is_only_started_by_its_parent() -> None:
    done = subprocess.run(
        [runner.runner_path(), "1"], capture_output=True, text=True, timeout=10, check=False
    )
    assert done.returncode == 2
    assert "started by runtimed" in done.stderr


def test_sandbox_runner_forked_by_the_spawner_is_the_same_runner(spawner: runner.Spawner) -> None:
    # A bad plan: the same refusal, on the same fds, from a runner that is our child.
    for _ in range(3):
        code, lines, forked = _spawn(b"not-a-plan\0", _forked_by(spawner))
        assert (code, forked) == (125, True)
        assert [parse_status(line) for line in lines] == [
            StepFailed(syscall="plan", errno=22, path=None, flags=None, op=None)
        ]


def test_sandbox_runner_spawner_survives_a_malformed_request(spawner: runner.Spawner) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        socket.send_fds(spawner._socket, [b"r"], [a.fileno(), b.fileno()])  # 2 fds, not 7
        spawner._socket.send(b"no fds at all")
    code, _, forked = _spawn(b"not-a-plan\0", _forked_by(spawner))
    assert (code, forked) == (125, True)


def test_sandbox_runner_without_its_spawner_is_posix_spawned(
    spawner: runner.Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    os.kill(spawner.pid, 9)
    for _ in range(3):
        code, _, forked = _spawn(b"not-a-plan\0", _forked_by(spawner))
        assert (code, forked) == (125, False)
    assert spawner.gone
    assert caplog.text.count("the runner spawner is gone") == 1  # said once, not per run


def _deferred_group() -> cgroups.RunCgroup:
    require_root()
    return cgroups.create(f"test-{uuid.uuid4().hex[:8]}", cgroups.detect(), defer=True)


@pytest.mark.parametrize("alive", [True, False])
def test_sandbox_runner_cgroups_are_made_first(spawner: runner.Spawner, alive: bool) -> None:
    # By the spawner, or, once it is gone, in Python before a posix_spawn.
    group = _deferred_group()
    assert group.dirs
    assert not any(d.exists() for d in group.dirs)  # named, not made
    if not alive:
        os.kill(spawner.pid, 9)
    try:
        code, _, forked = _spawn(b"not-a-plan\0", _forked_by(spawner, group.dirs))
        assert (code, forked) == (125, alive)
        assert all(d.is_dir() for d in group.dirs)
    finally:
        group.remove()


def test_sandbox_runner_spawner_leaves_no_cgroup_when_one_fails(spawner: runner.Spawner) -> None:
    group = _deferred_group()
    impossible = group.dirs[0] / "no" / "such" / "parent"
    with pytest.raises(SandboxError, match=f"create cgroup {impossible}: No such file") as info:
        _forked_by(spawner, [*group.dirs, impossible])([0, 1, 2, 0, 0, 0])
    assert info.value.details == {"path": str(impossible)}
    assert not any(d.exists() for d in group.dirs)  # made, then removed again


def test_sandbox_runner_spawner_refuses_more_cgroups_than_a_run_has(
    spawner: runner.Spawner,
) -> None:
    many = [Path(f"/sys/fs/cgroup/no-such-{i}") for i in range(17)]
    with pytest.raises(SandboxError, match="cannot start the sandbox runner: Argument list"):
        _forked_by(spawner, many)([0, 1, 2, 0, 0, 0])
    code, _, forked = _spawn(b"not-a-plan\0", _forked_by(spawner))  # and serves on
    assert (code, forked) == (125, True)


def test_sandbox_runner_spawner_takes_a_burst_beyond_its_queue(
    spawner: runner.Spawner, caplog: pytest.LogCaptureFixture
) -> None:
    # More requests at once than the socket's buffer holds (made small here): the sender
    # waits for room instead of blocking the trio thread, or taking the spawner for gone.
    spawner._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    started: list[tuple[int, int]] = []

    async def burst() -> None:
        async def one() -> None:
            started.append(await spawner.spawn([null] * 6))

        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)

    try:
        trio.run(burst)
    finally:
        os.close(null)
    codes = []
    for _, pidfd in started:
        exited = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        os.close(pidfd)
        assert exited is not None
        codes.append(exited.si_status)
    assert codes == [125] * 40  # each read an empty plan
    assert "spawner is gone" not in caplog.text
