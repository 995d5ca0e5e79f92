"""The merged view of layers read without mounting: whiteouts, opaque directories and symlinks
resolved in the root, checked against what overlayfs itself shows for the same layers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox.rootfs import LayeredRoot
from tests.support import require_root

pytestmark = pytest.mark.kernel


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    require_root()  # whiteouts are 0/0 character devices
    lower, middle, top = (tmp_path / name for name in ("lower", "middle", "top"))
    for path in ("bin", "etc/old", "usr/bin", "opt/keep"):
        (lower / path).mkdir(parents=True)
    (lower / "bin/tool").write_text("#!/bin/sh\n")
    (lower / "bin/tool").chmod(0o755)
    (lower / "bin/gone").write_text("x")
    (lower / "etc/old/file").write_text("old")
    (lower / "opt/keep/a").write_text("a")
    (lower / "usr/bin/real").write_text("real")
    (lower / "usr/bin/real").chmod(0o755)
    (middle / "bin").mkdir(parents=True)
    os.mknod(middle / "bin/gone", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    (middle / "etc").mkdir()
    (middle / "etc/old").mkdir()
    os.setxattr(middle / "etc/old", "user.overlay.opaque", b"y")
    (middle / "etc/old/new").write_text("new")
    (top / "bin").mkdir(parents=True)
    (top / "bin/link").symlink_to("/usr/bin/real")
    (top / "bin/escape").symlink_to("../../../../../etc/passwd")
    (top / "bin/loop").symlink_to("loop")
    return [lower, middle, top]


@pytest.mark.parametrize(
    ("path", "layer", "relative"),
    [
        ("/bin/tool", 0, "bin/tool"),
        ("/bin/gone", None, None),  # whited out in the middle layer
        ("/etc/old/file", None, None),  # hidden by the opaque directory above
        ("/etc/old/new", 1, "etc/old/new"),
        ("/opt/keep/a", 0, "opt/keep/a"),
        ("/bin/link", 0, "usr/bin/real"),  # absolute symlink, followed inside the root
        ("/bin/escape", None, None),  # '..' stops at the root: /etc/passwd is not in it
        ("/bin/loop", None, None),
        ("/bin/../usr/bin/real", 0, "usr/bin/real"),
        ("/etc/old/..", 1, "etc"),  # ends on '..': the topmost layer holding /etc
    ],
)
def test_rootfs_resolves_like_the_overlay(
    layers: list[Path], path: str, layer: int | None, relative: str | None
) -> None:
    found = LayeredRoot(layers).resolve(path)
    assert found == (None if layer is None or relative is None else layers[layer] / relative)


def test_rootfs_executables_and_text(layers: list[Path]) -> None:
    root = LayeredRoot(layers)
    assert root.is_executable("/bin/tool")
    assert root.is_executable("/bin/link")
    assert not root.is_executable("/etc/old/new")
    assert not root.is_executable("/bin/gone")
    assert root.read_text("/etc/old/new") == "new"
    assert root.read_text("/missing") == ""


def test_rootfs_agrees_with_a_real_overlay_mount(layers: list[Path], tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lowerdir = ":".join(str(p) for p in reversed(layers))
    script = (
        f"mount -t overlay overlay -o lowerdir={lowerdir},userxattr {mnt} && "
        f"cd {mnt} && ls bin etc/old && cat usr/bin/real"
    )
    shown = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0, shown.stderr
    names = set(shown.stdout.split())
    root = LayeredRoot(layers)
    for name in ("tool", "gone", "link", "new", "file"):
        in_overlay = name in names
        ours = any(root.resolve(f"{d}/{name}") is not None for d in ("/bin", "/etc/old"))
        if name == "link":
            ours = root.resolve("/bin/link") is not None
        assert in_overlay == ours, name
