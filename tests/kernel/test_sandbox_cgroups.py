"""Run cgroups on the real hierarchies: the v2 path (cgroup.kill) and the v1 path (freezer),
each killing a tree that includes a setsid'd grandchild, then removed without a trace."""

from __future__ import annotations

import dataclasses
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from runtimed.errors import SandboxError
from sandbox import cgroups
from tests.support import require, require_root

pytestmark = pytest.mark.kernel


def _hierarchies(version: int) -> cgroups.Hierarchies:
    require_root()
    found = cgroups.detect()
    if version == 2:
        require(found.unified is not None, "no cgroup2 mount")
        assert found.unified is not None
        return found
    require("freezer" in found.v1 and "pids" in found.v1, "no v1 freezer and pids hierarchies")
    return dataclasses.replace(found, unified=None, unified_controllers=frozenset())


@pytest.mark.slow
@pytest.mark.parametrize("version", [2, 1])
def test_cgroups_kill_reaches_setsid_grandchildren_and_remove_cleans_up(version: int) -> None:
    group = cgroups.RunCgroup(_hierarchies(version), f"runtimed-test-{uuid.uuid4().hex[:8]}")
    try:
        group.setup()
        group.limit(memory=64 << 20, pids=32, cpus=None)
        procs = " ".join(str(d / "cgroup.procs") for d in group.dirs)
        tree = subprocess.Popen(
            [
                "sh",
                "-c",
                f"for f in {procs}; do echo $$ > $f; done; "
                "setsid sleep 987661 & sleep 987662 & wait",
            ]
        )
        deadline = time.monotonic() + 5
        while len(group.pids()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(group.pids()) == 3  # sh, the setsid'd sleep, the plain sleep
        if version == 2:
            assert (group.dirs[0] / "cgroup.kill").exists()  # the v2 path, not the fallback
        group.kill()
        assert tree.wait(timeout=5) == -9
        deadline = time.monotonic() + 5
        while group.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert group.pids() == []
        usage, _ = group.accounting()
        assert usage.cpu_seconds is not None
        assert usage.peak_memory is not None
        assert usage.peak_memory > 0
    finally:
        dirs = list(group.dirs)
        group.remove()
    assert not any(d.exists() for d in dirs)


def test_cgroups_refuse_a_limit_nothing_can_enforce() -> None:
    found = _hierarchies(1)
    bare = dataclasses.replace(found, v1={}, unified=None, unified_controllers=frozenset())
    group = cgroups.RunCgroup(bare, "runtimed-test-none")
    group.setup()
    with pytest.raises(SandboxError, match="no cgroup memory controller"):
        group.limit(memory=1 << 20, pids=None, cpus=None)
    group.remove()


@pytest.mark.parametrize("version", [2, 1])
def test_cgroups_a_group_joined_before_its_limits_gets_them(version: int) -> None:
    # A spare's PID 1 joins its cgroups before the request that sets the limits: every
    # directory a limit needs exists from the start, so limit() never adds one it is not in.
    limitable = frozenset({"cpu", "pids"})
    group = cgroups.create(
        f"test-{uuid.uuid4().hex[:8]}", _hierarchies(version), limitable=limitable
    )
    try:
        sleeper = subprocess.Popen(["sleep", "987663"])
        try:
            for d in group.dirs:
                (d / "cgroup.procs").write_text(str(sleeper.pid))
            dirs = list(group.dirs)
            group.limit(memory=64 << 20, pids=7, cpus=0.5)
            assert group.dirs == dirs
            assert set(group.pids()) == {sleeper.pid}
            for d in dirs:
                assert str(sleeper.pid) in (d / "cgroup.procs").read_text().split()
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        group.remove()


def _fake_v2(tmp_path: Path, *, own_can_delegate: bool) -> cgroups.Hierarchies:
    """A cgroup2 tree of plain files: a subtree_control that is a directory refuses writes,
    as the kernel does for a cgroup with processes in it."""
    root = tmp_path / "cgroup2"
    own = root / "system.slice" / "builder.service"
    own.mkdir(parents=True)
    if not own_can_delegate:
        (own / "cgroup.subtree_control").mkdir()
    return cgroups.Hierarchies(
        unified=own,
        unified_controllers=frozenset({"memory", "pids", "cpu", "io"}),
        v1={},
        pure_v2=True,
        unified_root=root,
    )


def test_cgroups_v2_runs_below_our_cgroup_when_it_delegates(tmp_path: Path) -> None:
    h = _fake_v2(tmp_path, own_can_delegate=True)
    assert cgroups.v2_parent(h) == h.unified


def test_cgroups_v2_runs_go_to_a_shared_parent_without_delegation(tmp_path: Path) -> None:
    h = _fake_v2(tmp_path, own_can_delegate=False)
    assert h.unified_root is not None
    parent = cgroups.v2_parent(h)
    assert parent == h.unified_root / "runtimed"
    # the last controller enabled there (plain files keep only the last write)
    assert (parent / "cgroup.subtree_control").read_text() == "+pids"
