"""A bounded loopback load test: 50 concurrent Execs through the real daemon, every result
checked, and the daemon's open descriptors, children and memory back at their idle level."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import psutil
import pytest
import trio

from runtimed.client import open_client
from tests.e2e.test_daemon import start_daemon
from tests.e2e.test_daemon_exec import busybox_spec, import_tar, rootfs_tar

pytestmark = pytest.mark.slow

CONCURRENT: Final = 50
LOAD_TIMEOUT: Final = 90.0
SETTLE_STEPS: Final = 100
SETTLE_STEP: Final = 0.05
STEADY_STEPS: Final = 4
RSS_SLACK: Final = 16 * 1024 * 1024
"""Bytes the allocator may keep after the load (arenas are not returned at once)."""


def idle_level(proc: psutil.Process) -> tuple[list[str], int, int]:
    return sorted(open_files(proc.pid)), len(proc.children(recursive=True)), proc.memory_info().rss


async def settled_level(proc: psutil.Process) -> tuple[list[str], int, int]:
    """The idle level once the last run's runner is reaped and the next spares started: the
    same children for a few steps in a row."""
    level = idle_level(proc)
    steady = 0
    for _ in range(SETTLE_STEPS):
        await trio.sleep(SETTLE_STEP)
        now = idle_level(proc)
        steady = steady + 1 if now[1] == level[1] else 0
        level = now
        if steady == STEADY_STEPS:
            break
    return level


def open_files(pid: int) -> list[str]:
    """What each descriptor of ``pid`` points at; one closed while we list is not open.

    Pipes are counted, not named: the spare runners the daemon keeps ready (and the pipes to
    them) change with every exec."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        targets.append("pipe" if target.startswith("pipe:") else target)
    return targets


def store_connection(target: str) -> bool:
    # sandbox.store keeps a few idle SQLite connections pooled for the next calls; those are
    # the only descriptors allowed to stay.
    return Path(target).name in ("meta.db", "meta.db-wal", "meta.db-shm")


async def test_daemon_load_50_concurrent_execs(tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path, "amd64")
    running = start_daemon(tmp_path, config="emulators = []\n[limits]\nconcurrent_execs = 64\n")
    try:
        await trio.to_thread.run_sync(running.wait_ready)
        snapshot = await trio.to_thread.run_sync(import_tar, running.client(), tar)
        daemon = psutil.Process(running.proc.pid)
        async with open_client(running.path) as client:  # warm up: threads, caches, helper
            await client.exec(busybox_spec(snapshot, "true"))
        fds, children, rss = await settled_level(daemon)

        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            async with open_client(running.path) as client:
                outcome = await client.exec(busybox_spec(snapshot, "echo", f"run {i}"))
                assert outcome.result["exit_code"] == 0
                results[i] = outcome.stdout

        with trio.fail_after(LOAD_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(CONCURRENT):
                    nursery.start_soon(one, i)
        assert results == {i: f"run {i}\n".encode() for i in range(CONCURRENT)}

        def leftovers() -> tuple[list[str], int]:
            after_fds, after_children, _ = idle_level(daemon)
            extra = list(after_fds)
            for target in fds:
                if target in extra:
                    extra.remove(target)
            return [t for t in extra if not store_connection(t)], after_children

        # The daemon closes a connection when it reads the client's EOF, a moment after the
        # client closed it: give it a bounded while to get there.
        for _ in range(SETTLE_STEPS):
            if leftovers() == ([], children):
                break
            await trio.sleep(SETTLE_STEP)
        assert leftovers() == ([], children)
        after_rss = idle_level(daemon)[2]
        assert after_rss <= rss + RSS_SLACK, (rss, after_rss)
    finally:
        assert await trio.to_thread.run_sync(running.stop) == 0
