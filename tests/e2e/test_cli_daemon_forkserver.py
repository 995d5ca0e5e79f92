"""The daemon backend's warm fork server (``DaemonBackend.open_forkserver``): one that dies is
replaced, so the ``runtimectl run`` calls after it do not each start their own helper."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import psutil
import pytest
import trio

from runtimed.backend import DaemonBackend
from runtimed.config import Config
from runtimed.errors import SandboxError
from sandbox.launch import ForkServer

pytestmark = pytest.mark.slow

RESTART_TIMEOUT: Final = 30.0


def forkserver_pids() -> list[int]:
    children = psutil.Process(os.getpid()).children()
    return [p.pid for p in children if "--serve" in p.cmdline()]


def current(backend: DaemonBackend) -> ForkServer | None:
    return backend.forkserver


async def test_cli_daemon_forkserver_is_replaced_when_it_dies(tmp_path: Path) -> None:
    backend = DaemonBackend(lambda: Config(state_dir=tmp_path))
    async with backend.open_forkserver():
        first = backend.forkserver
        assert first is not None
        (pid,) = forkserver_pids()
        psutil.Process(pid).kill()
        # The next spawn finds it dead, and so does the backend.
        with pytest.raises(SandboxError, match="fork server is gone"):
            await first.spawn(b"{}", [])
        assert first.broken is not None
        assert backend._usable_forkserver() is None  # this exec starts its own helper
        # Bounded wait for the supervisor's new server (it starts a Python process); the
        # backend offers no event for it because execs never wait for it.
        with trio.fail_after(RESTART_TIMEOUT):
            while backend.forkserver in (None, first):  # noqa: ASYNC110
                await trio.sleep(0.05)
        replacement = backend.forkserver
        assert replacement is not None
        assert replacement.broken is None
        assert backend._usable_forkserver() is replacement
        (new_pid,) = forkserver_pids()
        assert new_pid != pid
    assert current(backend) is None
    assert forkserver_pids() == []
