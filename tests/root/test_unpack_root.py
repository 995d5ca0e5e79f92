"""The unpacker as the daemon runs it, real root: owners, device nodes, file capabilities, the
multi-layer case with overlay mounts in the initial user namespace, and hostile later layers
(a directory replaced by a symlink, whiteouts through a lower symlink) that must not reach
outside the staging directory.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from runtimed.errors import InvalidArchiveError
from sandbox.unpack import apply_layer, copy_directory_layer
from tests.kernel.test_unpack_hostile import Member, make_tar, snapshot
from tests.kernel.test_unpack_layers import (
    LIST_MERGED,
    build_layer_blobs,
    check_layer_dirs,
    check_merged_view,
    list_merged,
)
from tests.support import require_root

pytestmark = pytest.mark.root

# struct vfs_cap_data revision 2 (<linux/capability.h>) granting cap_net_raw (13) permitted.
CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def apply(blob: Path, dest: Path, parents: list[Path], work: Path) -> None:
    fd = os.open(blob, os.O_RDONLY)
    try:
        apply_layer(fd, parents=parents, dest=dest, work=work)
    finally:
        os.close(fd)


def apply_all(tmp: Path, blobs: list[Path]) -> list[Path]:
    work = tmp / "store" / "work"
    work.mkdir(parents=True)
    layers: list[Path] = []
    for i, blob in enumerate(blobs):
        dest = tmp / "store" / f"layer{i}"
        dest.mkdir()
        apply(blob, dest, list(layers), work)
        layers.append(dest)
    return layers


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, **fields: object
) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if data is not None:
        info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


@pytest.mark.slow
def test_unpack_layers_over_parents_as_root(tmp_path: Path) -> None:
    require_root()
    layers = apply_all(tmp_path, build_layer_blobs(tmp_path))
    check_layer_dirs(layers)
    check_merged_view(["unshare", "--mount"], layers)


def test_unpack_owners_devices_setuid_and_capabilities(tmp_path: Path) -> None:
    require_root()
    blob = tmp_path / "root.tar"
    blob.write_bytes(
        make_tar(
            [
                member("dev", tarfile.DIRTYPE),
                member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
                member("dev/tty", tarfile.CHRTYPE, devmajor=5, devminor=0, mode=0o666),
                member("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
                member("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1),
                member(
                    "home",
                    tarfile.DIRTYPE,
                    uid=1000,
                    gid=1000,
                    mode=0o700,
                    pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"},
                ),
                member("home/f", data=b"x", uid=1000, gid=100, mode=0o2640),
                member("bin", tarfile.DIRTYPE),
                member(
                    "bin/ping",
                    data=b"\x7fELF",
                    mode=0o4755,
                    pax_headers={
                        "SCHILY.xattr.security.capability": CAP_NET_RAW.decode(
                            "utf-8", "surrogateescape"
                        )
                    },
                ),
                member("bin/l", tarfile.SYMTYPE, linkname="ping", uid=7, gid=8),
            ]
        )
    )
    dest = tmp_path / "layer"
    dest.mkdir()
    fd = os.open(blob, os.O_RDONLY)
    try:
        result = apply_layer(fd, parents=(), dest=dest)
    finally:
        os.close(fd)
    null = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISCHR((dest / "dev/tty").lstat().st_mode)
    assert not os.path.lexists(dest / "dev/sda")
    assert not os.path.lexists(dest / "dev/mem")
    assert len([w for w in result.warnings if "skipped" in w]) == 2
    home = (dest / "home").lstat()
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o700)
    assert os.listxattr(dest / "home") == []
    f = (dest / "home/f").lstat()
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 100, 0o2640)
    ping = (dest / "bin/ping").lstat()
    assert stat.S_IMODE(ping.st_mode) == 0o4755
    assert os.getxattr(dest / "bin/ping", "security.capability") == CAP_NET_RAW
    link = (dest / "bin/l").lstat()
    assert (link.st_uid, link.st_gid) == (7, 8)


@pytest.mark.slow
@pytest.mark.parametrize(
    "second",
    [
        # A directory of the lower layer replaced by a symlink to the victim, then written.
        lambda v: [member("d", tarfile.SYMTYPE, linkname=v), member("d/pwned", data=b"x")],
        # A whiteout reached through a lower layer's symlink to the victim.
        lambda v: [member("s/.wh.secret", data=b"")],
        # An opaque marker through the same symlink.
        lambda v: [member("s/.wh..wh..opq", data=b"")],
        # A hardlink to the victim through the lower symlink.
        lambda v: [member("h", tarfile.LNKTYPE, linkname="s/secret")],
    ],
    ids=["dir-replaced-by-symlink", "whiteout-via-symlink", "opaque-via-symlink", "hardlink"],
)
def test_unpack_hostile_later_layer_stays_inside(
    tmp_path: Path, second: Callable[[str], list[Member]]
) -> None:
    require_root()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("secret\n")
    v = os.fspath(victim)
    first = tmp_path / "l1.tar"
    first.write_bytes(
        make_tar(
            [
                member("d", tarfile.DIRTYPE),
                member("d/f", data=b"f"),
                member("s", tarfile.SYMTYPE, linkname=v),
            ]
        )
    )
    top = tmp_path / "l2.tar"
    top.write_bytes(make_tar(second(v)))
    store = tmp_path / "store"
    before = snapshot(tmp_path, store)
    try:
        apply_all(tmp_path, [first, top])
    except InvalidArchiveError:
        assert os.listdir(store / "layer1") == []
    assert snapshot(tmp_path, store) == before


@pytest.mark.slow
def test_unpack_whiteouts_never_remove_what_the_same_layer_created(tmp_path: Path) -> None:
    require_root()
    first, second = tmp_path / "l1.tar", tmp_path / "l2.tar"
    first.write_bytes(
        make_tar(
            [member("d", tarfile.DIRTYPE), member("d/old", data=b"old"), member("x", data=b"1")]
        )
    )
    second.write_bytes(
        make_tar(
            [
                member("d/new", data=b"new"),
                member("d/.wh..wh..opq", data=b""),
                member("y", data=b"y"),
                member(".wh.y", data=b""),
                member(".wh.x", data=b""),
            ]
        )
    )
    layers = apply_all(tmp_path, [first, second])
    entries, _ = list_merged(
        ["unshare", "--mount"], layers, LIST_MERGED.replace("cat etc/motd", "echo")
    )
    assert entries == {"d d", "f d/new", "f y"}


@pytest.mark.slow
def test_unpack_failure_over_parents_leaves_layer_and_work_empty(tmp_path: Path) -> None:
    require_root()
    first, second = tmp_path / "l1.tar", tmp_path / "l2.tar"
    first.write_bytes(make_tar([member("d", tarfile.DIRTYPE), member("d/f", data=b"f")]))
    second.write_bytes(make_tar([member("d/g", data=b"g"), member("e", data=b"e")])[:1500])
    with pytest.raises(InvalidArchiveError, match=r"truncated|unexpected end"):
        apply_all(tmp_path, [first, second])
    store = tmp_path / "store"
    assert os.listdir(store / "layer1") == []
    assert os.listdir(store / "work") == []
    assert os.fspath(store) not in Path("/proc/self/mountinfo").read_text()


def test_copy_directory_layer_filters_devices_and_keeps_links_and_capabilities(
    tmp_path: Path,
) -> None:
    require_root()
    src = tmp_path / "src"
    (src / "dev").mkdir(parents=True)
    os.mknod(src / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "dev/sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    (src / "ping").write_bytes(b"\x7fELF")
    os.chown(src / "ping", 0, 0)
    os.chmod(src / "ping", 0o4755)
    os.setxattr(src / "ping", "security.capability", CAP_NET_RAW)
    os.link(src / "ping", src / "ping6")
    dest = tmp_path / "layer"
    dest.mkdir()
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = copy_directory_layer(fd, dest)
    finally:
        os.close(fd)
    assert stat.S_ISCHR((dest / "dev/null").lstat().st_mode)
    assert not os.path.lexists(dest / "dev/sda")
    assert any("dev/sda" in w for w in result.warnings)
    ping = (dest / "ping").lstat()
    assert stat.S_IMODE(ping.st_mode) == 0o4755
    assert ping.st_ino == (dest / "ping6").lstat().st_ino
    assert os.getxattr(dest / "ping", "security.capability") == CAP_NET_RAW


def test_unpack_over_127_parents_with_long_store_paths(tmp_path: Path) -> None:
    require_root()
    parents = []
    for i in range(127):
        parent = tmp_path / "layers" / f"{i:064x}"
        parent.mkdir(parents=True)
        (parent / f"f{i}").write_text(str(i))
        parents.append(parent)
    blob = tmp_path / "top.tar"
    blob.write_bytes(make_tar([member(".wh.f5", data=b""), member("new", data=b"n")]))
    dest, work = tmp_path / "layers" / "top", tmp_path / "work"
    dest.mkdir()
    work.mkdir()
    apply(blob, dest, parents, work)
    whiteout = (dest / "f5").lstat()
    assert stat.S_ISCHR(whiteout.st_mode)
    assert whiteout.st_rdev == 0
    assert (dest / "new").read_text() == "n"
    assert sorted(os.listdir(dest)) == ["f5", "new"]
    assert os.listdir(work) == []
