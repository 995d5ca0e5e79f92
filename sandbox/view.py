"""IO: read-only overlayfs views of a snapshot at a host path, mounted by ``mount(8)``.

``runtimectl snapshot mount ID DIR`` shows a snapshot's merged tree the way ``buildah mount``
does: an overlay whose lower directories are the snapshot's layers, without an upper directory,
so the mount is read-only by construction and costs the same whatever the rootfs size.

Why ``mount(8)`` in a child process: the daemon never calls ``mount`` itself (STYLE.md §6: it is
multi-threaded and must keep its own mount table untouched), and the view has to appear in the
host's mount namespace, where a plain exec of util-linux's ``mount`` is the smallest, best
tested tool for it (a few milliseconds; it also reports the kernel's complaint in words).
``mount`` runs with the layers directory as its working directory and gets the layer names
relative to it: overlayfs resolves ``lowerdir`` against the caller's cwd, and the short names
keep the option string under the kernel's one-page limit for more layers.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from runtimed.errors import SnapshotError

# The mount options travel in one page (fs/namespace.c copy_mount_options).
MAX_OPTIONS: Final = 4095
MOUNT_TIMEOUT: Final = 30.0


def overlay_options(lower_names: Sequence[str]) -> str:
    """Options for a read-only overlay of ``lower_names`` (lowest first).

    ``userxattr``: stored layers mark opaque directories with ``user.overlay.opaque``
    (Documentation/filesystems/overlayfs.rst, "User xattr"). Without an upper directory
    overlayfs wants at least two lower directories, so the caller pads a single layer with an
    empty one.

    Raises:
        SnapshotError: too many layers for one mount option page.
    """
    options = "ro,userxattr,lowerdir=" + ":".join(reversed(lower_names))
    if len(options) > MAX_OPTIONS:
        raise SnapshotError(
            f"{len(lower_names)} layers do not fit in one overlay mount's options",
            details={"layers": len(lower_names)},
        )
    return options


def _run(argv: Sequence[str], *, cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=MOUNT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SnapshotError(f"{what}: {exc}") from exc
    if done.returncode != 0:
        raise SnapshotError(
            f"{what}: {done.stderr.strip() or f'exit status {done.returncode}'}",
            details={"argv": list(argv)},
            hint="mounting needs root (CAP_SYS_ADMIN) in the host's mount namespace",
        )


def mount_overlay(lower_names: Sequence[str], target: Path, *, cwd: Path) -> None:
    """Mount the read-only overlay of ``lower_names`` (relative to ``cwd``) on ``target``.

    Raises:
        SnapshotError: ``mount`` failed; the message carries its complaint.
    """
    _run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            overlay_options(lower_names),
            os.fspath(target),
        ],
        cwd=cwd,
        what=f"mount overlay on {target}",
    )


def umount(target: Path) -> None:
    """Raises: SnapshotError: ``umount`` failed (busy, not mounted)."""
    _run(["umount", os.fspath(target)], cwd=Path("/"), what=f"umount {target}")
