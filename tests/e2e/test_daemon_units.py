"""The systemd units: systemd-analyze verify, and agreement with the daemon's defaults.

(Socket activation and READY=1 under systemd-socket-activate are proven in test_daemon.py.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Final

import pytest

from runtimed.config import Config
from tests.e2e.test_daemon import require_tool
from tests.support import REPO, tool

UNITS: Final = REPO / "systemd"


def settings(unit: Path) -> dict[str, str]:
    """Key=value lines of a unit (the last one wins, as systemd reads plain settings)."""
    found: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


@pytest.mark.slow
def test_daemon_units_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # verify checks that ExecStart exists: point it at the installed entry point.
    for name in ("runtimed.service", "runtimed.socket"):
        text = (UNITS / name).read_text()
        text = text.replace("ExecStart=/usr/bin/runtimed", f"ExecStart={tool('runtimed')}")
        (tmp_path / name).write_text(text)
    out = subprocess.run(
        [analyze, "verify", str(tmp_path / "runtimed.socket"), str(tmp_path / "runtimed.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_daemon_units_agree_with_the_daemon() -> None:
    service = settings(UNITS / "runtimed.service")
    socket = settings(UNITS / "runtimed.socket")
    defaults = Config()
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"] == "/usr/bin/runtimed"
    assert service["StateDirectory"] == defaults.state_dir.name
    assert socket["ListenStream"] == str(defaults.socket)
    assert socket["SocketMode"] == "0660"
    assert socket["SocketGroup"] == defaults.group
    # Settings that would break the daemon or its sandboxes must stay off.
    for forbidden in (
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "ProtectControlGroups",
        "ProtectKernelTunables",
        "PrivateDevices",
        "SystemCallArchitectures",
    ):
        assert forbidden not in service


@pytest.mark.slow
def test_daemon_units_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    sysusers = require_tool("systemd-sysusers")
    tmpfiles = require_tool("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(UNITS / "sysusers.d" / "runtimed.conf")],
        capture_output=True,
        check=True,
        timeout=60,
    )
    groups = (tmp_path / "etc" / "group").read_text()
    assert any(line.startswith(f"{Config().group}:") for line in groups.splitlines())
    subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create", str(UNITS / "tmpfiles.d" / "runtimed.conf")],
        capture_output=True,
        check=True,
        timeout=60,
    )
    state = tmp_path / Config().state_dir.relative_to("/")
    assert state.stat().st_mode & 0o777 == 0o700
