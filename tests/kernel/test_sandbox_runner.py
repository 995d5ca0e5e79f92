"""The native runner's own refusals, before it creates anything (no namespaces needed)."""

from __future__ import annotations

import os
import subprocess

import pytest

from sandbox import runner
from sandbox.wire import StepFailed, parse_status


def _spawn(plan: bytes) -> tuple[int, list[bytes]]:
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    plan_r, plan_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        pid, pidfd = runner.spawn([null, null, null, status_w, plan_r, null])
    finally:
        for fd in (status_w, plan_r, null):
            os.close(fd)
    os.write(plan_w, plan)
    os.close(plan_w)
    os.close(pidfd)
    _, wait_status = os.waitpid(pid, 0)
    with os.fdopen(status_r, "rb") as status:
        return os.waitstatus_to_exitcode(wait_status), status.read().splitlines()


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
    code, lines = _spawn(plan)
    assert code == 125
    assert [parse_status(line) for line in lines] == [
        StepFailed(syscall="plan", errno=22, path=None, flags=None, op=None)
    ]


def test_sandbox_runner_is_only_started_by_its_parent() -> None:
    done = subprocess.run(
        [runner.runner_path(), "1"], capture_output=True, text=True, timeout=10, check=False
    )
    assert done.returncode == 2
    assert "started by runtimed" in done.stderr
