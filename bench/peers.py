"""The peers the benches run side by side with runtimed, installed from Debian when missing:
a fresh machine has only what ``scripts/setup --test`` installed, and the benches are not
tests, so that script does not install their peers."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping


def ensure_tools(packages: Mapping[str, str]) -> None:
    """Install with apt-get the Debian package of each tool (tool name -> package) that is not
    on PATH.

    Raises:
        subprocess.CalledProcessError: apt-get failed.
    """
    missing = sorted({package for tool, package in packages.items() if not shutil.which(tool)})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Not checked: an index that fails (a mirror mid-sync, a foreign architecture's security
    # list) leaves the others usable, as scripts/setup does; the install says if it was not.
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )
