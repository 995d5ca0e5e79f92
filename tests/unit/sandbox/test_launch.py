"""The launcher's small pure-ish parts that need no sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox import launch


def test_host_resolv_conf_is_read_again_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "resolv.conf"
    monkeypatch.setattr(launch, "HOST_RESOLV_CONF", path)
    cached = launch._HostResolvConf()
    assert cached.read() == ""  # no file: no name servers
    path.write_text("nameserver 10.0.0.1\n")
    assert cached.read() == "nameserver 10.0.0.1\n"
    # Same size, new content: the mtime tells (set apart explicitly: a coarse clock could
    # give both writes the same one).
    path.write_text("nameserver 10.0.0.2\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert cached.read() == "nameserver 10.0.0.2\n"
    # Replaced by rename, as resolvconf and NetworkManager do: a new inode.
    new = tmp_path / "resolv.conf.new"
    new.write_text("nameserver 10.0.0.3\n")
    new.replace(path)
    assert cached.read() == "nameserver 10.0.0.3\n"
    path.unlink()
    assert cached.read() == ""
