"""A corpus of hostile archives against the real unpacker (real helper, real openat2).

Each archive is built here with ``tarfile`` writing raw headers, then unpacked into a staging
directory that sits in a tree also holding sentinel files and a victim directory. Every case
must be rejected (InvalidArchiveError) or contained, and nothing outside staging may change:
the whole tree's (path, inode, mtime, mode, content hash) is compared before and after.

Owners are the test's own uid/gid, so no root is needed for a layer without parents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from runtimed.errors import InvalidArchiveError, LimitExceededError
from sandbox.archive import UnpackLimits
from sandbox.unpack import apply_layer

pytestmark = pytest.mark.kernel

Snapshot = dict[str, tuple[int, int, int, str]]


@dataclasses.dataclass(frozen=True)
class Tree:
    root: Path
    victim: Path
    layer: Path
    work: Path


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret").write_text("secret\n")
    (victim / "sub").mkdir()
    (victim / "sub" / "keep").write_text("keep\n")
    (tmp_path / "sentinel").write_text("sentinel\n")
    (tmp_path / "sentinel-link").symlink_to("victim/secret")
    staging = tmp_path / "staging"
    (staging / "layer").mkdir(parents=True)
    (staging / "work").mkdir()
    return Tree(root=tmp_path, victim=victim, layer=staging / "layer", work=staging / "work")


def snapshot(root: Path, skip: Path) -> Snapshot:
    """Everything under ``root`` except ``skip``: (inode, mtime, mode, content or link hash)."""
    seen: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip:
            dirnames.clear()
            continue
        for name in [*dirnames, *filenames]:
            path = here / name
            if path == skip:
                continue
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(path)
            else:
                digest = ""
            seen[os.fspath(path.relative_to(root))] = (
                st.st_ino,
                st.st_mtime_ns,
                st.st_mode,
                digest,
            )
    return seen


Member = tuple[tarfile.TarInfo, bytes | None]


def info(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.uid, ti.gid = os.getuid(), os.getgid()
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    ti.mtime = 1_700_000_000
    for key, value in fields.items():
        setattr(ti, key, value)
    return ti


def file(name: str, data: bytes = b"pwned\n", *, pax: dict[str, str] | None = None) -> Member:
    ti = info(name, pax_headers=pax or {})
    ti.size = len(data)
    return ti, data


def directory(name: str) -> Member:
    return info(name, tarfile.DIRTYPE), None


def symlink(name: str, target: str) -> Member:
    return info(name, tarfile.SYMTYPE, linkname=target), None


def hardlink(name: str, target: str) -> Member:
    return info(name, tarfile.LNKTYPE, linkname=target), None


def make_tar(members: list[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            tar.addfile(ti, None if data is None else io.BytesIO(data))
    return out.getvalue()


# Each case: the members (given the absolute victim path) and the expected outcome:
# "reject" (InvalidArchiveError), "limit" (LimitExceededError) or a check on the layer dir.
Check = Callable[[Path, str], None]


def _is_symlink(rel: str) -> Check:
    def check(layer: Path, victim: str) -> None:
        assert (layer / rel).is_symlink()

    return check


def _regular(rel: str, data: bytes = b"pwned\n") -> Check:
    def check(layer: Path, victim: str) -> None:
        st = (layer / rel).lstat()
        assert stat.S_ISREG(st.st_mode)
        assert (layer / rel).read_bytes() == data

    return check


def _absent(rel: str) -> Check:
    def check(layer: Path, victim: str) -> None:
        assert not os.path.lexists(layer / rel)

    return check


def _regular_below_victim(layer: Path, victim: str) -> None:
    """An absolute name lands at the same path below the layer (leading / stripped)."""
    assert (layer / victim.lstrip("/") / "pwned").read_bytes() == b"pwned\n"


def _contained(layer: Path, victim: str) -> None:
    """Success is allowed; the snapshot comparison is the check."""


CASES: dict[str, tuple[Callable[[str], list[Member]], str | Check]] = {
    "dotdot": (lambda v: [file("../victim/pwned")], "reject"),
    "dotdot-inside-name": (lambda v: [directory("a"), file("a/../../victim/pwned")], "reject"),
    "absolute-name-stripped": (lambda v: [file(v + "/pwned")], _regular_below_victim),
    "absolute-symlink-written-through": (
        lambda v: [symlink("evil", v), directory("evil"), file("evil/pwned")],
        _contained,
    ),
    "absolute-symlink-resolved-in-root": (
        lambda v: [directory(v), symlink("evil", v), file("evil/pwned")],
        _regular_below_victim,
    ),
    "relative-symlink-clamped-at-root": (
        lambda v: [directory(v), symlink("evil", "../../../../../../.." + v), file("evil/pwned")],
        _regular_below_victim,
    ),
    "relative-symlink-written-through": (
        lambda v: [symlink("evil", "../../../../../../.." + v), file("evil/pwned")],
        _contained,
    ),
    "symlink-to-existing-dir-outside": (
        lambda v: [symlink("etc", v + "/sub"), file("etc/keep", b"overwritten\n")],
        _contained,
    ),
    "symlink-chain": (
        lambda v: [
            *[symlink(f"l{i}", f"l{i + 1}") for i in range(45)],
            symlink("l45", "../" * 30 + v[1:]),
            file("l0/pwned"),
        ],
        _contained,
    ),
    "magic-link": (
        lambda v: [symlink("p", "/proc/self/root" + v), file("p/pwned")],
        _contained,
    ),
    "file-over-symlink-replaces-it": (
        lambda v: [symlink("f", v + "/secret"), file("f", b"replaced\n")],
        _regular("f", b"replaced\n"),
    ),
    "hardlink-dotdot": (lambda v: [hardlink("h", "../victim/secret")], "reject"),
    "hardlink-absolute-outside": (lambda v: [hardlink("h", v + "/secret")], "reject"),
    "hardlink-through-symlink-outside": (
        lambda v: [symlink("s", v), hardlink("h", "s/secret")],
        "reject",
    ),
    "hardlink-to-symlink-links-the-symlink": (
        lambda v: [symlink("s", v + "/secret"), hardlink("h", "s"), file("h", b"new\n")],
        _regular("h", b"new\n"),
    ),
    "hardlink-to-symlink-is-a-symlink": (
        lambda v: [symlink("s", v + "/secret"), hardlink("h", "s")],
        _is_symlink("h"),
    ),
    "hardlink-to-directory": (lambda v: [directory("d"), hardlink("h", "d")], "reject"),
    "dir-replaced-by-symlink": (
        lambda v: [directory("d"), file("d/f"), symlink("d", v), file("d/pwned")],
        _contained,
    ),
    # The writer keeps recently used directories open: a replaced one must not be written to.
    "dir-replaced-by-file-then-recreated": (
        lambda v: [
            directory("d"),
            directory("d/sub"),
            file("d/sub/x"),
            file("d", b"file\n"),
            directory("d"),
            file("d/sub/y"),
        ],
        _regular("d/sub/y"),
    ),
    "dir-replaced-by-symlink-then-written-through": (
        lambda v: [
            directory("d"),
            directory("d/sub"),
            symlink("d", "e"),
            directory("e"),
            directory("e/sub"),
            file("d/sub/y"),
        ],
        _regular("e/sub/y"),
    ),
    "whiteout-dotdot": (lambda v: [file("../.wh.victim")], "reject"),
    "whiteout-of-dotdot": (lambda v: [file("a/.wh..."), directory("a")], "reject"),
    "whiteout-through-symlink": (
        lambda v: [symlink("s", v), file("s/.wh.secret")],
        _contained,
    ),
    "opaque-through-symlink": (
        lambda v: [symlink("s", v), file("s/.wh..wh..opq")],
        _contained,
    ),
    "whiteout-absolute": (lambda v: [file(v + "/.wh.secret")], _contained),
    "nul-in-name": (
        lambda v: [file("a", pax={"path": "a\x00/../../victim/pwned"})],
        "reject",
    ),
    "name-beyond-path-max": (
        lambda v: [file("a", pax={"path": "d/" * 2100 + "f"})],
        "reject",
    ),
    "component-beyond-name-max": (lambda v: [file("x" * 300)], "reject"),
    "block-device-skipped": (
        lambda v: [(info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None)],
        _absent("sda"),
    ),
    "kmem-skipped": (
        lambda v: [(info("kmem", tarfile.CHRTYPE, devmajor=1, devminor=2), None)],
        _absent("kmem"),
    ),
    "overlay-xattrs-dropped": (
        lambda v: [
            file(
                "f",
                pax={
                    "SCHILY.xattr.trusted.overlay.redirect": "/etc",
                    "SCHILY.xattr.user.overlay.opaque": "y",
                },
            )
        ],
        _regular("f"),
    ),
    "non-utf8-name-kept-byte-exact": (
        lambda v: [file("caf\udce9")],
        _regular("caf\udce9"),  # os encodes the surrogate back to the byte 0xe9
    ),
    "mtime-not-a-number": (lambda v: [file("f", pax={"mtime": "nan"})], "reject"),
    "xattr-value-beyond-xattr-size-max": (
        lambda v: [file("f", pax={"SCHILY.xattr.user.big": "x" * 70_000})],
        "reject",
    ),
    # Deeper than Python's recursion limit: replacing and cleaning up must still work.
    "deep-tree-replaced-by-file": (
        lambda v: [file("a/" * 1100 + "f"), file("a", b"file\n")],
        _regular("a", b"file\n"),
    ),
    "deep-tree-then-rejected": (lambda v: [file("a/" * 1100 + "f"), file("../x")], "reject"),
    "too-many-entries": (lambda v: [file(f"f{i}", b"") for i in range(70)], "limit"),
    "too-many-bytes": (lambda v: [file("big", bytes(140_000))], "limit"),
}
LIMITS = UnpackLimits(max_bytes=128 * 1024, max_entries=64)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if "deep" in c else c for c in CASES]
)
def test_unpack_hostile_archive_is_rejected_or_contained(tree: Tree, case: str) -> None:
    build, expected = CASES[case]
    blob = tree.root / "blob.tar"
    blob.write_bytes(make_tar(build(os.fspath(tree.victim))))
    before = snapshot(tree.root, tree.layer.parent)
    fd = os.open(blob, os.O_RDONLY)
    try:
        if expected in ("reject", "limit"):
            error = InvalidArchiveError if expected == "reject" else LimitExceededError
            with pytest.raises(error):
                apply_layer(fd, parents=(), dest=tree.layer, work=tree.work, limits=LIMITS)
            assert os.listdir(tree.layer) == [], "a failed unpack leaves the layer empty"
        else:
            assert callable(expected)
            try:
                apply_layer(fd, parents=(), dest=tree.layer, work=tree.work, limits=LIMITS)
            except InvalidArchiveError:
                assert expected is _contained, "this case must succeed"
            else:
                expected(tree.layer, os.fspath(tree.victim))
    finally:
        os.close(fd)
    assert snapshot(tree.root, tree.layer.parent) == before
