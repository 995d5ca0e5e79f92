"""Test support: capability checks that skip locally and fail in CI, fixture paths, and a
runner for commands inside a private user+mount namespace with its own binfmt_misc instance.

Never register handlers on the host's global binfmt_misc from a test: everything that touches
binfmt_misc runs through :func:`run_private_binfmt`.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, NoReturn

import psutil
import pytest

from sandbox import helperserver

MUST_WORK: Final = os.environ.get("RUNTIMED_TESTS_MUST_WORK") == "1"
CACHE: Final = Path(os.environ.get("RUNTIMED_TEST_CACHE", "/var/cache/runtimed-tests"))
REPO: Final = Path(__file__).resolve().parent.parent


def unavailable(reason: str) -> NoReturn:
    """Skip a test whose machine cannot run it; under RUNTIMED_TESTS_MUST_WORK=1 (CI), fail."""
    if MUST_WORK:
        pytest.fail(f"RUNTIMED_TESTS_MUST_WORK=1 but: {reason}", pytrace=False)
    pytest.skip(reason)


def our_children(*, recursive: bool = False) -> list[psutil.Process]:
    """This process's children (``recursive``: descendants) but for the layer helpers' fork
    server, which lasts (``sandbox.helperserver``), and the helpers it forked."""
    found = psutil.Process().children(recursive=recursive)
    server = helperserver.server_pid()
    if server is None:
        return found
    skip = {server, *(p.pid for p in psutil.Process(server).children(recursive=True))}
    return [p for p in found if p.pid not in skip]


def layer_helpers() -> list[psutil.Process]:
    """The layer helpers this process has running: live children of its fork server."""
    server = helperserver.server_pid()
    if server is None:
        return []
    helpers = psutil.Process(server).children()
    return [p for p in helpers if p.status() != psutil.STATUS_ZOMBIE]


def require(condition: bool, reason: str) -> None:
    if not condition:
        unavailable(reason)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root (real mounts, cgroups, binfmt_misc)")


@functools.cache
def private_binfmt_supported() -> str | None:
    """None when user namespaces with a private binfmt_misc instance work, else why not."""
    if shutil.which("unshare") is None:
        return "unshare(1) from util-linux is not installed"
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "--",
            "sh",
            "-c",
            'd=$(mktemp -d) && mount -t binfmt_misc none "$d" && test -w "$d/register"',
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return (
            "no private binfmt_misc instance in a user namespace (needs kernel >= 6.7 and "
            f"unprivileged user namespaces): {probe.stderr.strip() or probe.returncode}"
        )
    return None


def require_private_binfmt() -> None:
    reason = private_binfmt_supported()
    if reason is not None:
        unavailable(reason)


def busybox(debian_arch: str) -> Path:
    """The cached static busybox for a Debian architecture (fetched by the test set-up)."""
    path = CACHE / "busybox" / debian_arch / "busybox"
    require(
        path.is_file(),
        f"fixture {path} missing: run scripts/fetch-busybox (busybox-static:{debian_arch})",
    )
    return path


def tool(name: str) -> Path:
    """Path of the project's console script in the running interpreter's environment."""
    path = Path(sys.executable).parent / name
    require(path.exists(), f"{name} is not installed next to {sys.executable} (pip install -e .)")
    return path


def runtimectl(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``runtimectl ARGS`` with its output captured as text; check ``returncode`` yourself."""
    return subprocess.run(
        [str(tool("runtimectl")), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_private_binfmt(
    script: str,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run a shell ``script`` as root of a new user+mount namespace with a fresh binfmt_misc.

    The instance is mounted at a temporary directory whose path the script finds in ``$BM``.
    ``$PY`` is this interpreter and ``$RUNTIMECTL`` the project's CLI. Handlers registered
    there vanish with the namespace and never reach the host.
    """
    require_private_binfmt()
    wrapper = (
        'BM=$(mktemp -d) && mount -t binfmt_misc none "$BM" && export BM && '
        'trap \'umount "$BM"; rmdir "$BM"\' EXIT && sh -euc "$0" runtimed-test "$@"'
    )
    full_env = dict(os.environ)
    full_env.update({"PY": sys.executable, "RUNTIMECTL": str(tool("runtimectl"))})
    full_env.update(env or {})
    return subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "--",
            "sh",
            "-c",
            wrapper,
            script,
            *args,
        ],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
