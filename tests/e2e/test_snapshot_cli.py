"""E2E: ``runtimectl snapshot …`` as a user runs it with ``--embedded`` (a daemon in-process
for each command, over the same protocol as a running one), on a GNU tar tarball of a busybox
root."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from runtimed.errors import ExitArea
from tests.kernel.store_images import busybox_root, gnu_tar, tar_names
from tests.support import require_root, runtimectl

pytestmark = [pytest.mark.slow]


def _ctl(state: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return runtimectl("snapshot", *args, "--embedded", "--state-dir", state)


def test_snapshot_cli_import_ls_inspect_export_rm(tmp_path: Path) -> None:
    require_root()
    state = tmp_path / "state"
    tarball = gnu_tar(busybox_root(tmp_path / "root", "s390x"), tmp_path / "root.tar.xz", "-J")

    imported = _ctl(state, "import", tarball, "--json")
    assert imported.returncode == 0, imported.stderr
    info = json.loads(imported.stdout)
    assert (info["platform"], info["platform_source"]) == (
        "linux/s390x",
        "detected from /bin/busybox",
    )
    assert info["source"] == str(tarball)
    plain = _ctl(state, "import", tarball)
    assert plain.stdout.splitlines() == [
        info["id"],
        "platform: linux/s390x (detected from /bin/busybox)",
    ]
    # A directory reaches the daemon as an anonymous tar; runtimectl names its source.
    from_dir = _ctl(state, "import", tmp_path / "root", "--json")
    assert from_dir.returncode == 0, from_dir.stderr
    assert json.loads(from_dir.stdout)["source"] == str(tmp_path / "root")

    listed = _ctl(state, "ls")
    assert info["id"][7:19] in listed.stdout
    assert "linux/s390x" in listed.stdout
    inspected = _ctl(state, "inspect", info["id"][7:15])
    assert "detected from /bin/busybox" in inspected.stdout
    entries = info["layers"][0]["entries"]
    assert entries >= len({"bin", "bin/busybox", "bin/sh", "etc", "etc/motd"})
    assert f" {entries} entries " in inspected.stdout

    exported = _ctl(state, "export", info["id"], "--format", "tar", "-o", tmp_path / "out.tar")
    assert exported.returncode == 0, exported.stderr
    assert "bin/busybox" in tar_names(tmp_path / "out.tar")
    assert _ctl(state, "export", info["id"], "-o", tmp_path / "out.tar").returncode == int(
        ExitArea.USAGE
    )

    assert _ctl(state, "rm", info["id"]).returncode == 0
    missing = _ctl(state, "inspect", info["id"], "--json")
    assert missing.returncode == int(ExitArea.NOT_FOUND)
    assert json.loads(missing.stdout)["error"]["code"] == "snapshot.SnapshotNotFound"


def test_snapshot_cli_without_a_daemon_names_the_fix(tmp_path: Path) -> None:
    done = runtimectl("snapshot", "ls", "--socket", tmp_path / "none.sock", timeout=60)
    assert done.returncode == int(ExitArea.FAILURE)
    error, hint = done.stderr.splitlines()
    assert (
        error
        == f"runtimectl: error: connect to {tmp_path / 'none.sock'}: No such file or directory"
    )
    assert "start the daemon" in hint
    assert "--embedded" in hint
