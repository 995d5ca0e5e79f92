"""``runtimectl run`` end to end over a real store (``--embedded``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.kernel.test_sandbox import make_busybox_root
from tests.support import require_root, runtimectl, tool

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_sandbox_cli_run_streams_exits_reports_and_commits(tmp_path: Path) -> None:
    require_root()
    state = tmp_path / "state"
    root = make_busybox_root(tmp_path / "root")
    imported = runtimectl("snapshot", "import", "--embedded", "--state-dir", state, root, "--json")
    assert imported.returncode == 0, imported.stderr
    snapshot = json.loads(imported.stdout)["id"]
    common = ("--embedded", "--state-dir", state, "--snapshot", snapshot)

    run = runtimectl(
        "run", *common, "-v", "-e", "X=1", "--", "sh", "-c", "echo $X; echo e >&2; exit 3"
    )
    assert run.returncode == 3
    assert run.stdout == "1\n"
    assert run.stderr.startswith("e\n")
    assert "linux/amd64: native, confirmed" in run.stderr

    report = tmp_path / "report.json"
    killed = runtimectl("run", *common, "--report", report, "--", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 137
    result = json.loads(report.read_text())
    assert result["signal_name"] == "SIGKILL"
    assert result["report"]["mode"] == "native"

    committed = runtimectl("run", *common, "--commit", "--report", "-", "--", "touch", "/made")
    assert committed.returncode == 0, committed.stderr
    child = json.loads(committed.stderr)["snapshot"]
    check = runtimectl("run", *common[:-1], child, "--", "ls", "/made")
    assert check.returncode == 0, check.stderr
    assert not list((state / "runs").iterdir())

    # The reader of runtimectl's stdout goes away: the command is stopped, no traceback.
    piped = subprocess.run(
        [
            "sh",
            "-c",
            '"$0" "$@" | head -n 2',
            str(tool("runtimectl")),
            "run",
            *map(str, common),
            "--",
            "sh",
            "-c",
            "while :; do echo y; done",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.stdout == "y\ny\n"
    assert "Traceback" not in piped.stderr

    refused = runtimectl("run", *common, "--platform", "windows/amd64", "--", "true")
    assert refused.returncode == 6
    assert "only Linux" in refused.stderr
