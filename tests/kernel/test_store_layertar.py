"""Kernel (real file system, xattrs): a stored layer directory back to an OCI layer tar
(sandbox.layertar): deterministic bytes, hard links, the xattrs a layer may carry, flattening."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from sandbox import layertar
from sandbox.fstree import remove_path
from tests.support import require_root

pytestmark = [pytest.mark.kernel]


def _layer(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF tool")
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "alias")
    (root / "bin" / "sh").symlink_to("tool")
    os.setxattr(root / "bin" / "tool", "user.note", b"\xff\x00binary")
    os.setxattr(root / "bin" / "tool", "user.overlay.origin", b"x")
    return root


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar}


def test_store_layertar_is_deterministic_and_keeps_what_a_layer_carries(tmp_path: Path) -> None:
    require_root()
    layer = _layer(tmp_path / "layer")
    first, second = io.BytesIO(), io.BytesIO()
    digest = layertar.write_layer(layer, first)
    assert layertar.write_layer(layer, second) == digest
    assert first.getvalue() == second.getvalue()
    assert layertar.write_layer(layer) == digest  # hashing only gives the same diff ID
    members = _members(first.getvalue())
    assert list(members) == ["bin", "bin/alias", "bin/sh", "bin/tool"]
    alias, tool = members["bin/alias"], members["bin/tool"]
    assert alias.isreg()
    assert alias.size == len(b"\x7fELF tool")
    assert tool.islnk()
    assert tool.linkname == "bin/alias"
    assert stat.S_IMODE(alias.mode) == 0o4755
    assert members["bin/sh"].linkname == "tool"
    assert (alias.uname, alias.gname) == ("", "")
    xattrs = {k: v for k, v in alias.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    assert xattrs == {
        "SCHILY.xattr.user.note": b"\xff\x00binary".decode("utf-8", "surrogateescape")
    }


def test_store_layertar_flattens_like_overlayfs(tmp_path: Path) -> None:
    require_root()
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "a" / "deep", lower / "b", upper / "a", upper / "b"):
        d.mkdir(parents=True)
    (lower / "a" / "deep" / "x").write_text("x")
    (lower / "b" / "y").write_text("y")
    (lower / "gone").write_text("gone")
    (lower / "c").mkdir()
    os.mknod(upper / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))  # whiteout
    os.setxattr(upper / "b", layertar.OPAQUE_XATTR, b"y")  # opaque: lower b/y hidden
    (upper / "b" / "z").write_text("z")
    (upper / "c").write_text("now a file")  # a non-directory hides the lower directory
    out = io.BytesIO()
    layertar.write_merged([lower, upper], out)
    assert sorted(_members(out.getvalue())) == ["a", "a/deep", "a/deep/x", "b", "b/z", "c"]
    single = io.BytesIO()
    layertar.write_layer(upper, single)
    assert {"gone", ".wh.gone", "b/.wh..wh..opq"} & set(_members(single.getvalue())) == {
        ".wh.gone",
        "b/.wh..wh..opq",
    }


@pytest.mark.slow
def test_store_layertar_walks_trees_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    require_root()
    layer = tmp_path / "deep"
    layer.mkdir()
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1200):  # a hostile layer may nest this deep
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    try:
        out = io.BytesIO()
        layertar.write_layer(layer, out)
        names = list(_members(out.getvalue()))
        assert len(names) == 1201
        assert names[-1] == "d/" * 1200 + "leaf"
        flat = io.BytesIO()
        layertar.write_merged([layer], flat)
        assert list(_members(flat.getvalue())) == names
    finally:
        # pytest's own temp-dir cleanup recurses and fails on a tree this deep (an unraisable
        # error at exit, sessions later): remove it here, at any depth.
        remove_path(layer)
