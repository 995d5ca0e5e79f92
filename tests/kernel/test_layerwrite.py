"""The native writer of plain members (``sandbox.layerwrite``) on archives made by GNU tar: what
it takes and where it hands back to the Python writer (a hardlink, a long name, a path that
exists, a parent that does not, the budgets), parents resolved inside the root, the records it
reports, a failure once a member is begun; the directory times set at a layer's end
(``set_dir_times``); and through ``unpack_stream``, trees identical to
GNU tar's own extraction across chunk boundaries, whiteouts and opaque markers that keep what
the same layer wrote natively, and a later member replacing one written natively. Owners are
the test's own uid (``tests/root/test_unpack_root.py`` has the root case).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import resource
import shutil
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtimed.errors import InvalidArchiveError, KernelError, LimitExceededError
from sandbox.archive import Compression, UnpackLimits
from sandbox.layerstream import CHUNK
from sandbox.layerwrite import PlainWriter, Written, set_dir_times
from sandbox.unpack import unpack_stream
from tests.kernel.test_unpack import compress
from tests.support import require

pytestmark = pytest.mark.kernel

MTIME = 1_600_000_000
LONG = "l" * 120  # beyond the 100 bytes of a ustar name: a GNU long-name record
TreeState = dict[str, tuple[int, int, int, int, str]]


def gnu_tar(root: Path, *names: str) -> bytes:
    require(shutil.which("tar") is not None, "GNU tar is not installed")
    owner = [f"--owner={os.getuid()}", f"--group={os.getgid()}", "--numeric-owner"]
    return subprocess.run(
        ["tar", "-C", root, *owner, "--sort=name", "--format=gnu", "-cf", "-", *names],
        capture_output=True,
        check=True,
    ).stdout


def set_times(root: Path) -> None:
    """Distinct whole-second mtimes on everything below ``root``, deepest first."""
    paths = sorted(root.rglob("*"), key=lambda p: -len(p.parts))
    for i, path in enumerate(paths):
        os.utime(path, (MTIME + i, MTIME + i), follow_symlinks=False)


def plain_tree(root: Path) -> None:
    """a/, a/b/, files of sizes around a block, a setuid file, a symlink, then a hardlink and a
    long name (which the native writer leaves to Python)."""
    (root / "a" / "b").mkdir(parents=True)
    for size in (0, 1, 511, 512, 513, 70_000):
        (root / "a" / "b" / f"f{size}").write_bytes(os.urandom(size))
    (root / "a" / "b" / "f1").chmod(0o4755)
    (root / "a" / "link").symlink_to("b/f1")
    (root / "a" / "zz-hard").hardlink_to(root / "a" / "b" / "f0")
    (root / "a" / LONG).write_bytes(b"long")
    (root / "a" / "b").chmod(0o750)
    set_times(root)


def headers(tar: bytes) -> Iterator[tuple[int, tarfile.TarInfo]]:
    """(offset of its first header, member) for each member, as tarfile reads them."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for info in archive:
            yield info.offset, info


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes beyond ``size`` bytes fail with EFBIG (SIGXFSZ ignored) in this process."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


def run(root: Path, tar: bytes, **budget: int) -> Written:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        window = memoryview(bytearray(tar))
        return PlainWriter(fd).run(
            window,
            max_entries=budget.get("max_entries", 1 << 30),
            max_bytes=budget.get("max_bytes", 1 << 40),
        )
    finally:
        os.close(fd)


def state(root: Path) -> TreeState:
    """Every path below ``root``: (mode, uid, gid, mtime, content digest or link target)."""
    seen: TreeState = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest() + f"/{st.st_nlink}"
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(path)
        else:
            what = ""
        rel = os.fspath(path.relative_to(root))
        seen[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, what)
    return seen


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    root.mkdir()
    plain_tree(root)
    return root


def test_layerwrite_takes_plain_members_up_to_a_hardlink(tmp_path: Path, source: Path) -> None:
    tar = gnu_tar(source, "a")
    out = tmp_path / "out"
    out.mkdir()
    written = run(out, tar)
    members = list(headers(tar))
    names = [info.name for _, info in members]
    stop = names.index("a/zz-hard") - 1  # sorted: LONG, then zz-hard; LONG is a long name
    assert names[stop] == f"a/{LONG}"
    assert written.err == 0
    assert written.consumed == members[stop][0]
    assert written.entries == stop
    assert written.created.split(b"\0")[:-1] == [n.encode() for n in names[:stop]]
    assert written.dirs == ((b"a", members[0][1].mtime), (b"a/b", members[1][1].mtime))
    assert written.file_bytes == sum(info.size for _, info in members[:stop] if info.isfile())
    for rel in names[:stop]:
        want, got = (source / rel).lstat(), (out / rel).lstat()
        assert (got.st_mode, got.st_uid, got.st_gid) == (want.st_mode, want.st_uid, want.st_gid)
        if not stat.S_ISDIR(want.st_mode):  # a directory's time is the caller's to set
            assert got.st_mtime_ns == want.st_mtime_ns, rel
    assert (out / "a/b/f1").lstat().st_mode & 0o7777 == 0o4755
    assert os.readlink(out / "a/link") == "b/f1"
    assert (out / "a/b/f70000").read_bytes() == (source / "a/b/f70000").read_bytes()
    assert not (out / "a/zz-hard").exists()


def test_layerwrite_hands_back_a_path_that_exists(tmp_path: Path, source: Path) -> None:
    tar = gnu_tar(source, "a/b/f513", "a/b/f0")
    out = tmp_path / "out"
    (out / "a/b").mkdir(parents=True)
    (out / "a/b/f513").write_bytes(b"kept")
    written = run(out, tar)
    assert (written.consumed, written.entries, written.created) == (0, 0, b"")
    assert (out / "a/b/f513").read_bytes() == b"kept"
    assert not (out / "a/b/f0").exists()


def test_layerwrite_hands_back_a_missing_parent(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    written = run(out, gnu_tar(source, "a/b/f1"))
    assert (written.consumed, written.entries) == (0, 0)
    assert list(out.iterdir()) == []


def test_layerwrite_resolves_parents_inside_the_root(tmp_path: Path, source: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "a").mkdir(parents=True)
    out = tmp_path / "out"
    out.mkdir()
    # Both lead to tmp_path/outside if followed from the host's root.
    (out / "abs").symlink_to(outside)
    (out / "rel").symlink_to("../../../../../../../../../.." + os.fspath(outside))
    staged = tmp_path / "staged"
    for top in ("abs", "rel"):
        (staged / top / "a").mkdir(parents=True)
        (staged / top / "a" / "f").write_bytes(top.encode())
    tar = gnu_tar(staged, "abs/a", "rel/a")
    inside = out / os.fspath(outside).lstrip("/")  # where both lead when resolved in the root
    (inside / "a").mkdir(parents=True)
    written = run(out, tar[512:])  # from abs/a/f, after the directory abs/a
    assert (written.err, written.entries) == (0, 1)  # then rel/a/, which exists: handed back
    assert list((outside / "a").iterdir()) == []
    assert (inside / "a" / "f").read_bytes() == b"abs"


def test_layerwrite_budgets_stop_before_the_member_beyond(tmp_path: Path, source: Path) -> None:
    tar = gnu_tar(source, "a/b")
    by_entries = tmp_path / "by-entries"
    (by_entries / "a").mkdir(parents=True)
    assert run(by_entries, tar, max_entries=2).entries == 2
    by_bytes = tmp_path / "by-bytes"
    (by_bytes / "a").mkdir(parents=True)
    written = run(by_bytes, tar, max_bytes=70_000 - 1)
    assert b"a/b/f70000" not in written.created
    assert not (by_bytes / "a/b/f70000").exists()
    assert written.entries == len(list(headers(tar))) - 1


def test_layerwrite_failure_once_begun_names_the_member(tmp_path: Path, source: Path) -> None:
    tar = gnu_tar(source, "a/b/f513", "a/b/f70000", "a/b/f1")
    out = tmp_path / "out"
    (out / "a/b").mkdir(parents=True)
    with file_size_limit(4096):
        written = run(out, tar)
    offsets = {info.name: offset for offset, info in headers(tar)}
    assert written.err == errno.EFBIG
    assert written.consumed == offsets["a/b/f70000"]
    assert written.created == b"a/b/f513\0"
    assert not (out / "a/b/f1").exists()


# --- through unpack_stream ------------------------------------------------------------------


def unpack(tmp_path: Path, blob: bytes, root: Path, limits: UnpackLimits | None = None) -> None:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    unpack_file(path, root, limits)


def unpack_file(path: Path, root: Path, limits: UnpackLimits | None = None) -> None:
    fd = os.open(path, os.O_RDONLY)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        unpack_stream(fd, root_fd, limits or UnpackLimits())
    finally:
        os.close(fd)
        os.close(root_fd)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Written]:
    """What each call of the native writer wrote (the calls go through)."""
    calls: list[Written] = []
    original = PlainWriter.run

    def recorded(self: PlainWriter, window: memoryview, **budget: int) -> Written:
        written = original(self, window, **budget)
        calls.append(written)
        return written

    monkeypatch.setattr(PlainWriter, "run", recorded)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.GZIP, Compression.NONE])
def test_unpack_matches_gnu_tar_across_chunks(
    tmp_path: Path, source: Path, compression: Compression, spy: list[Written]
) -> None:
    many = source / "many"
    for i in range(60):
        (many / f"d{i % 7}").mkdir(parents=True, exist_ok=True)
        # Sizes that put member boundaries at odd places in the 2 MiB chunks.
        (many / f"d{i % 7}" / f"f{i}").write_bytes(os.urandom(i * 9_000 + i))
    (many / "big").write_bytes(os.urandom(CHUNK + 12_345))  # a member longer than a chunk
    set_times(source)
    tar = gnu_tar(source, ".")
    assert len(tar) > 3 * CHUNK
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    unpack(tmp_path, compress(compression, tar), ours)
    subprocess.run(["tar", "-C", theirs, "-xpf", "-"], input=tar, check=True)
    assert state(ours) == state(theirs)
    members = len(list(headers(tar)))
    assert sum(w.entries for w in spy) >= members - 12, "nearly every member is written natively"


def test_unpack_whiteouts_keep_what_the_layer_wrote_natively(
    tmp_path: Path, spy: list[Written]
) -> None:
    staged = tmp_path / "staged"
    for name in ("d/f", "d/.wh.f", "e/g", "e/.wh..wh..opq", ".wh.below"):
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(name.encode())
    tar = gnu_tar(staged, "d/f", "d/.wh.f", "e/g", "e/.wh..wh..opq", ".wh.below")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "e").mkdir()
    (root / "e" / "older").write_bytes(b"from below")
    (root / "below").write_bytes(b"from below")
    unpack(tmp_path, tar, root)
    assert b"".join(w.created for w in spy) == b"e/g\0"  # d/f is the first member: Python's
    assert (root / "d/f").read_bytes() == b"d/f"
    assert (root / "e/g").read_bytes() == b"e/g"
    assert sorted(p.name for p in root.iterdir()) == ["d", "e"]
    assert sorted(p.name for p in (root / "e").iterdir()) == ["g"]


def test_unpack_later_member_replaces_one_written_natively(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "f").write_bytes(b"first")
    first = gnu_tar(staged, "f")
    (staged / "f").write_bytes(b"second, longer")
    second = gnu_tar(staged, "f")
    root = tmp_path / "root"
    root.mkdir()
    unpack(tmp_path, first[: 2 * 512] + second, root)  # first's header and data, then second
    assert (root / "f").read_bytes() == b"second, longer"


def test_unpack_entry_limit_counts_native_members(tmp_path: Path, source: Path) -> None:
    tar = gnu_tar(source, "a/b")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(LimitExceededError) as raised:
        unpack(tmp_path, tar, root, UnpackLimits(max_entries=4))
    assert raised.value.details["limit"] == "max_entries"


def test_unpack_failure_in_the_native_writer_names_the_member(tmp_path: Path, source: Path) -> None:
    tar = gnu_tar(source, "a/b/f513", "a/b/f70000")
    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    blob = tmp_path / "blob"
    blob.write_bytes(tar)  # before the limit: the archive is larger than it
    with file_size_limit(4096), pytest.raises(InvalidArchiveError) as raised:
        unpack_file(blob, root)
    assert raised.value.details == {"entry": "a/b/f70000", "errno": "EFBIG"}


@pytest.mark.parametrize("last", ["a/b/f1", "a/zz-hard"])
def test_unpack_cut_after_a_member_names_it(tmp_path: Path, source: Path, last: str) -> None:
    """Cut right after a member written natively (f1) or by Python (the hardlink, which ends
    the decoded bytes at hand): the archive is truncated after that member."""
    tar = gnu_tar(source, "a/b/f0", "a/b/f1", "a/zz-hard")
    ends = {info.name: info.offset_data + -(-info.size // 512) * 512 for _, info in headers(tar)}
    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    with pytest.raises(InvalidArchiveError, match="no end-of-archive marker") as raised:
        unpack(tmp_path, tar[: ends[last]], root)
    assert raised.value.details == {"blob": "layer", "entry": last}


def dir_times(root: Path, dirs: list[tuple[bytes, int]]) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        set_dir_times(fd, dirs)
    finally:
        os.close(fd)


def test_set_dir_times_in_order_the_root_included(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    # Before 1970 too: nanoseconds split as os.utime splits them (floor division).
    dir_times(root, [(b"a/b", MTIME * 10**9 + 7), (b"a", -1), (b"", MTIME * 10**9)])
    assert (root / "a" / "b").stat().st_mtime_ns == MTIME * 10**9 + 7
    assert (root / "a").stat().st_mtime_ns == -1
    assert root.stat().st_mtime_ns == MTIME * 10**9


def test_set_dir_times_skips_what_is_no_longer_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "kept").mkdir(parents=True)
    (root / "file").write_bytes(b"replaced a directory")
    (root / "link").symlink_to("file")
    dir_times(
        root,
        [(b"gone", 1), (b"file", 2), (b"file/below", 3), (b"link", 4), (b"kept", MTIME * 10**9)],
    )
    assert (root / "kept").stat().st_mtime_ns == MTIME * 10**9  # the ones after still set
    assert (root / "file").stat().st_mtime_ns != 2


def test_set_dir_times_resolves_in_the_root(tmp_path: Path) -> None:
    """A symlink to an absolute path or up out of the root resolves inside it, as the writers
    resolve parents: the directory outside keeps its time."""
    outside = tmp_path / "outside"
    outside.mkdir()
    before = outside.stat().st_mtime_ns
    root = tmp_path / "root"
    (root / "inside" / "outside").mkdir(parents=True)
    (root / "abs").symlink_to(outside)
    (root / "up").symlink_to("../outside")
    dir_times(root, [(b"abs", 1), (b"up", 2), (b"inside/../../outside", 3)])
    assert outside.stat().st_mtime_ns == before
    assert (root / "inside" / "outside").stat().st_mtime_ns != 1


def test_set_dir_times_names_the_directory_it_could_not_open(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    long = "d" * 5000  # beyond PATH_MAX: neither gone nor replaced, so not skipped
    with pytest.raises(KernelError) as caught:
        dir_times(root, [(long.encode(), 1)])
    assert caught.value.errno_name == "ENAMETOOLONG"
    assert caught.value.details["syscall"] == "openat2"
    assert caught.value.details["path"] == long


def test_set_dir_times_never_skips_the_root(tmp_path: Path) -> None:
    """ENOTDIR for a path below the root is a directory replaced by a later member (skipped);
    for the root itself it is an error."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    fd = os.open(not_a_dir, os.O_RDONLY)
    try:
        with pytest.raises(KernelError) as caught:
            set_dir_times(fd, [(b"", 1)])
    finally:
        os.close(fd)
    assert caught.value.errno_name == "ENOTDIR"
    assert caught.value.details["path"] == "."
