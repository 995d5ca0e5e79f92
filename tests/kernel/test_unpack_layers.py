"""Layers applied over parents, checked through a real overlay mount of the result.

Three layers made by GNU tar from directories (OCI whiteouts are plain empty files there):
a usrmerge base (``lib -> usr/lib``), a layer that writes ``lib/x.so`` through that symlink and
whites out a file, a directory (opaque) and a subtree, and a layer that recreates the subtree.
The unpacker runs as root of a user namespace (``unshare --user --map-root-user``), which is
the case ``userxattr`` exists for; ``tests/root/test_unpack_root.py`` runs the same layers as
real root. The merged view is listed from an overlay mounted with ``userxattr`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, busybox, require

pytestmark = pytest.mark.kernel

# What `find -printf '%y %P\n'` shows in the merged view of the three layers.
EXPECTED_MERGED = {
    "l bin",
    "l lib",
    "d usr",
    "d usr/bin",
    "f usr/bin/busybox",
    "l usr/bin/sh",
    "d usr/lib",
    "f usr/lib/keep.so",
    "f usr/lib/x.so",
    "d etc",
    "f etc/motd",
    "d etc/conf.d",
    "f etc/conf.d/c",
    "d var",
    "d var/cache",
    "f var/cache/new",
}


def _tar(src: Path, blob: Path, *names: str) -> Path:
    subprocess.run(
        ["tar", "-C", src, "--owner=0", "--group=0", "--numeric-owner", "-czf", blob, *names],
        check=True,
    )
    return blob


def build_layer_blobs(tmp: Path) -> list[Path]:
    """The three layer tarballs (gzip), lowest first."""
    require(shutil.which("tar") is not None, "GNU tar is not installed")
    base = tmp / "src1"
    for d in ("usr/bin", "usr/lib", "etc/conf.d", "var/cache/y"):
        (base / d).mkdir(parents=True)
    shutil.copy2(busybox("amd64"), base / "usr/bin/busybox")
    (base / "usr/bin/sh").symlink_to("busybox")
    (base / "bin").symlink_to("usr/bin")
    (base / "lib").symlink_to("usr/lib")
    for name in ("usr/lib/libold.so", "usr/lib/keep.so", "etc/conf.d/a", "etc/conf.d/b"):
        (base / name).write_text(name)
    (base / "etc/motd").write_text("layer1\n")
    (base / "var/cache/x").write_text("x")
    (base / "var/cache/y/z").write_text("z")

    top = tmp / "src2"
    for d in ("lib", "usr/lib", "etc/conf.d", "var"):
        (top / d).mkdir(parents=True)
    (top / "lib/x.so").write_text("x.so")  # through layer 1's lib -> usr/lib
    (top / "usr/lib/.wh.libold.so").touch()
    (top / "etc/conf.d/.wh..wh..opq").touch()
    (top / "etc/conf.d/c").write_text("c")
    (top / "etc/motd").write_text("layer2\n")
    (top / "var/.wh.cache").touch()

    third = tmp / "src3"
    (third / "var/cache").mkdir(parents=True)
    (third / "var/cache/new").write_text("new")
    return [
        _tar(base, tmp / "l1.tgz", "."),
        # Member names only (no `lib/` directory entry): the usrmerge case.
        _tar(top, tmp / "l2.tgz", "lib/x.so", "usr/lib", "etc", "var"),
        _tar(third, tmp / "l3.tgz", "var"),
    ]


APPLY_ALL = """
import json, os, sys
from pathlib import Path
from sandbox.unpack import apply_layer
blobs, layers, work = [Path(p) for p in json.loads(sys.argv[1])], [], Path(sys.argv[2])
for i, blob in enumerate(blobs):
    dest = work.parent / f"layer{i}"
    dest.mkdir()
    fd = os.open(blob, os.O_RDONLY)
    apply_layer(fd, parents=layers, dest=dest, work=work)
    os.close(fd)
    layers.append(dest)
print(json.dumps([os.fspath(p) for p in layers]))
"""

LIST_MERGED = (
    'm=$(mktemp -d) && mount -t overlay overlay -o "userxattr,lowerdir=$1" "$m" && '
    'cd "$m" && find . -mindepth 1 -printf \'%y %P\\n\' && cat etc/motd; cd /; umount "$m"'
)


def list_merged(
    unshare: list[str], layers: list[Path], script: str = LIST_MERGED
) -> tuple[set[str], str]:
    """Mount ``layers`` as one overlay in a mount namespace made by ``unshare`` and run
    ``script`` there: the entries it lists and its last line (the motd)."""
    lowerdir = ":".join(os.fspath(p) for p in reversed(layers))
    listing = subprocess.run(
        [*unshare, "sh", "-c", script, "sh", lowerdir],
        capture_output=True,
        text=True,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    return set(lines[:-1]), lines[-1]


def check_merged_view(unshare: list[str], layers: list[Path]) -> None:
    """The overlay of the three layers shows :data:`EXPECTED_MERGED` and layer 2's motd."""
    entries, motd = list_merged(unshare, layers)
    assert entries == EXPECTED_MERGED
    assert motd == "layer2"


def check_layer_dirs(layers: list[Path]) -> None:
    """What the upper layers hold: overlay whiteouts, no shadowing ``lib`` directory."""
    second = layers[1]
    assert not os.path.lexists(second / "lib"), "a real lib/ would shadow lib -> usr/lib"
    assert (second / "usr/lib/x.so").read_text() == "x.so"
    whiteout = (second / "usr/lib/libold.so").lstat()
    assert (os.major(whiteout.st_rdev), os.minor(whiteout.st_rdev)) == (0, 0)
    assert os.path.lexists(second / "var/cache")
    for layer in layers:
        for dirpath, _, filenames in os.walk(layer):
            for name in filenames:
                assert not name.startswith(".wh."), "OCI whiteouts must not reach a layer dir"
            keys = os.listxattr(dirpath, follow_symlinks=False)
            assert set(keys) <= {"user.overlay.opaque"}, f"{dirpath}: {keys}"


@pytest.mark.slow
def test_unpack_layers_over_parents_in_a_user_namespace(tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], check=False)
    require(probe.returncode == 0, "user namespaces with mount namespaces are not available")
    blobs = build_layer_blobs(tmp_path)
    work = tmp_path / "store" / "work"
    work.mkdir(parents=True)
    userns = ["unshare", "--user", "--map-root-user"]
    env = {**os.environ, "PYTHONPATH": os.fspath(REPO)}
    done = subprocess.run(
        [
            *userns,
            sys.executable,
            "-c",
            APPLY_ALL,
            json.dumps([os.fspath(b) for b in blobs]),
            os.fspath(work),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    layers = [Path(p) for p in json.loads(done.stdout)]
    check_layer_dirs(layers)
    check_merged_view([*userns, "--mount"], layers)
