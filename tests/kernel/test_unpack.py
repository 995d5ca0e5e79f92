"""The unpacker on archives made by real tools (GNU tar, gzip, zstd, xz, bzip2) and on corrupt
ones: a busybox root in every compression, digests checked against the tools' own output,
and truncation, CRC errors, trailing garbage, digest mismatches and bombs rejected with the
staging directory left empty. Layers without parents need neither root nor namespaces; owners
are the test's own uid.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from runtimed.errors import InvalidArchiveError, LimitExceededError
from sandbox.archive import Compression, LayerResult, UnpackLimits
from sandbox.unpack import LayerHelper, apply_layer, copy_directory_layer
from tests.support import busybox, require
from tests.unit.sandbox.test_archive_headers import check_against_tarfile

pytestmark = pytest.mark.kernel

COMPRESSORS: dict[Compression, list[str]] = {
    Compression.NONE: ["cat"],
    Compression.GZIP: ["gzip", "-c", "-n"],
    Compression.ZSTD: ["zstd", "-q", "-c"],
    Compression.XZ: ["xz", "-1", "-c"],
    Compression.BZIP2: ["bzip2", "-c"],
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(compression: Compression, data: bytes) -> bytes:
    argv = COMPRESSORS[compression]
    require(shutil.which(argv[0]) is not None, f"{argv[0]} is not installed (scripts/setup)")
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A busybox root (/bin/busybox, every applet as a symlink, setuid), as GNU tar makes it."""
    require(shutil.which("tar") is not None, "GNU tar is not installed")
    root = tmp_path_factory.mktemp("busybox-root")
    (root / "bin").mkdir()
    (root / "etc").mkdir()
    shutil.copy2(busybox("amd64"), root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o4755)
    applets = subprocess.run(
        [root / "bin" / "busybox", "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "motd").write_text("hello\n")
    os.link(root / "etc" / "motd", root / "etc" / "motd.hardlink")
    owner = [f"--owner={os.getuid()}", f"--group={os.getgid()}", "--numeric-owner"]
    return subprocess.run(
        ["tar", "-C", root, *owner, "--sort=name", "-cf", "-", "."],
        capture_output=True,
        check=True,
    ).stdout


@pytest.fixture
def staging(tmp_path: Path) -> tuple[Path, Path]:
    layer, work = tmp_path / "staging" / "layer", tmp_path / "staging" / "work"
    layer.mkdir(parents=True)
    work.mkdir()
    return layer, work


def apply_bytes(
    tmp_path: Path,
    blob: bytes,
    layer: Path,
    limits: UnpackLimits | None = None,
    *,
    expected_diff_id: str | None = None,
    expected_digest: str | None = None,
    hash_compressed: bool = True,
) -> LayerResult:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        return apply_layer(
            fd,
            parents=(),
            dest=layer,
            limits=limits or UnpackLimits(),
            expected_diff_id=expected_diff_id,
            expected_digest=expected_digest,
            hash_compressed=hash_compressed,
        )
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_unpack_busybox_root_made_by_gnu_tar(
    tmp_path: Path, staging: tuple[Path, Path], busybox_tar: bytes, compression: Compression
) -> None:
    layer, _ = staging
    blob = compress(compression, busybox_tar)
    result = apply_bytes(
        tmp_path,
        blob,
        layer,
        expected_diff_id=sha256(busybox_tar),
        expected_digest=sha256(blob),
    )
    assert result.compression is compression
    assert result.diff_id == sha256(busybox_tar)
    assert result.compressed_digest == sha256(blob)
    assert result.warnings == ()
    box = (layer / "bin" / "busybox").lstat()
    assert stat.S_IMODE(box.st_mode) == 0o4755
    assert box.st_size == busybox("amd64").stat().st_size
    assert os.readlink(layer / "bin" / "sh") == "busybox"
    motd = (layer / "etc" / "motd").lstat()
    assert motd.st_nlink == 2
    assert motd.st_ino == (layer / "etc" / "motd.hardlink").lstat().st_ino
    assert (layer / "etc" / "motd").read_text() == "hello\n"
    assert (
        subprocess.run(
            [layer / "bin" / "busybox", "true"], capture_output=True, check=False
        ).returncode
        == 0
    )


def test_simple_headers_match_tarfile_on_gnu_tar_output(busybox_tar: bytes) -> None:
    assert check_against_tarfile(busybox_tar) > 100


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid = len(data), os.getuid(), os.getgid()
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


SMALL = _tar({"a": b"a" * 5000, "b": os.urandom(3000)})
MEMBERS_END = (512 + 5120) + (512 + 3072)  # headers + padded data; zeros follow


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


CORRUPT: dict[str, Callable[[], bytes]] = {
    "gzip-truncated": lambda: compress(Compression.GZIP, SMALL)[:-20],
    "gzip-bad-crc": lambda: _flip(compress(Compression.GZIP, SMALL), -6),
    "gzip-bad-length": lambda: _flip(compress(Compression.GZIP, SMALL), -2),
    "gzip-trailing-garbage": lambda: compress(Compression.GZIP, SMALL) + b"garbage",
    "gzip-trailing-zeros": lambda: compress(Compression.GZIP, SMALL) + bytes(8),
    "zstd-truncated": lambda: compress(Compression.ZSTD, SMALL)[:-10],
    "zstd-trailing-garbage": lambda: compress(Compression.ZSTD, SMALL) + b"\x00garbage",
    "zstd-corrupt": lambda: _flip(compress(Compression.ZSTD, SMALL), 20),
    "xz-truncated": lambda: compress(Compression.XZ, SMALL)[:-30],
    "xz-trailing-garbage": lambda: compress(Compression.XZ, SMALL) + b"garbage!",
    "bzip2-truncated": lambda: compress(Compression.BZIP2, SMALL)[:-10],
    "bzip2-corrupt": lambda: _flip(compress(Compression.BZIP2, SMALL), 40),
    "tar-truncated-in-data": lambda: SMALL[:3000],
    "tar-without-end-marker": lambda: SMALL[:MEMBERS_END],
    "tar-garbage-header": lambda: SMALL[:MEMBERS_END] + b"\x01" * 1024,
    "not-a-tar": lambda: os.urandom(4096),
    "empty": lambda: b"",
}


@pytest.mark.parametrize("case", CORRUPT)
def test_unpack_corrupt_input_is_invalid_and_leaves_nothing(
    tmp_path: Path, staging: tuple[Path, Path], case: str
) -> None:
    layer, _ = staging
    with pytest.raises(InvalidArchiveError) as raised:
        apply_bytes(tmp_path, CORRUPT[case](), layer)
    assert raised.value.details.get("blob") == "layer" or "entry" in raised.value.details
    assert os.listdir(layer) == []


def test_unpack_concatenated_gzip_members_are_one_stream(
    tmp_path: Path, staging: tuple[Path, Path]
) -> None:
    layer, _ = staging
    blob = compress(Compression.GZIP, SMALL[:4096]) + compress(Compression.GZIP, SMALL[4096:])
    result = apply_bytes(tmp_path, blob, layer, expected_diff_id=sha256(SMALL))
    assert result.compressed_digest == sha256(blob)
    assert (layer / "a").read_bytes() == b"a" * 5000


@pytest.mark.parametrize("which", ["diff_id", "digest"])
def test_unpack_digest_mismatch_is_invalid_and_leaves_nothing(
    tmp_path: Path, staging: tuple[Path, Path], which: str
) -> None:
    layer, _ = staging
    wrong = "sha256:" + "0" * 64
    blob = compress(Compression.GZIP, SMALL)
    diff_id, digest = (wrong, None) if which == "diff_id" else (None, wrong)
    with pytest.raises(InvalidArchiveError, match=f"{which} mismatch") as raised:
        apply_bytes(tmp_path, blob, layer, expected_diff_id=diff_id, expected_digest=digest)
    assert raised.value.details["expected"] == wrong
    assert os.listdir(layer) == []


@pytest.mark.parametrize("compression", [Compression.ZSTD, Compression.GZIP])
def test_unpack_without_hash_compressed_leaves_the_digest_to_the_writer(
    tmp_path: Path, staging: tuple[Path, Path], compression: Compression
) -> None:
    """The store hashes a blob as it writes it into staging: the helper does not hash the
    compressed bytes a second time (native zstd and Python's codecs alike) and reports no
    compressed digest, while the diff_id is still computed and checked."""
    layer, _ = staging
    blob = compress(compression, SMALL)
    result = apply_bytes(
        tmp_path, blob, layer, expected_diff_id=sha256(SMALL), hash_compressed=False
    )
    assert result.compressed_digest is None
    assert result.diff_id == sha256(SMALL)
    assert (layer / "a").read_bytes() == b"a" * 5000
    again = tmp_path / "again"
    again.mkdir()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(InvalidArchiveError, match="diff_id mismatch"):
        apply_bytes(tmp_path, blob, again, expected_diff_id=wrong, hash_compressed=False)
    assert os.listdir(again) == []


def test_unpack_plain_tar_is_hashed_even_without_hash_compressed(
    tmp_path: Path, staging: tuple[Path, Path]
) -> None:
    """An uncompressed stream's digest is its diff_id, which is always computed."""
    layer, _ = staging
    result = apply_bytes(tmp_path, SMALL, layer, hash_compressed=False)
    assert result.compressed_digest == result.diff_id == sha256(SMALL)


def test_layer_helper_started_before_its_source_is_written(
    tmp_path: Path, staging: tuple[Path, Path]
) -> None:
    """A helper started on an empty file reads only once it has its plan, so it unpacks what
    was written after it started; one that never gets a plan is killed and reaped on close."""
    layer, _ = staging
    blob = tmp_path / "blob"
    fd = os.open(blob, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with LayerHelper(fd) as helper:
            blob.write_bytes(compress(Compression.GZIP, SMALL))
            result = helper.apply(parents=(), dest=layer, expected_diff_id=sha256(SMALL))
        assert (layer / "a").read_bytes() == b"a" * 5000
        assert result.compressed_digest == sha256(blob.read_bytes())
        unused = LayerHelper(fd)
        assert process_state(unused.pid) not in ENDED  # waiting for its plan
        unused.close()
        assert process_state(unused.pid) in ENDED  # killed (its server reaps it)
    finally:
        os.close(fd)


ENDED: Final = ("Z", "X", None)
"""The states of an ended process: a zombie, dead while being reaped (X), gone."""


def process_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (after the command's closing parenthesis)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or before the read
        return None
    return stat_line.rpartition(")")[2].split()[0]


def _zero_bomb(size: int) -> bytes:
    """A gzip'd tar holding one file of ``size`` zero bytes, built without holding it."""
    header = tarfile.TarInfo("bomb")
    header.size = size
    gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [gz.compress(header.tobuf(format=tarfile.PAX_FORMAT))]
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        parts.append(gz.compress(chunk))
    parts.append(gz.compress(bytes(1024)))
    parts.append(gz.flush())
    return b"".join(parts)


@pytest.mark.slow
def test_unpack_decompression_bomb_stops_at_the_limit(
    tmp_path: Path, staging: tuple[Path, Path]
) -> None:
    layer, _ = staging
    bomb = _zero_bomb(64 << 20)
    assert len(bomb) < 1 << 20
    with pytest.raises(LimitExceededError):
        apply_bytes(tmp_path, bomb, layer, limits=UnpackLimits(max_bytes=16 << 20))
    assert os.listdir(layer) == []


def test_copy_directory_layer_copies_without_following_symlinks(
    tmp_path: Path, staging: tuple[Path, Path]
) -> None:
    layer, _ = staging
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret\n")
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (src / "etc" / "hosts").chmod(0o640)
    (src / "link").symlink_to(outside)
    (src / "abs").symlink_to("/etc")
    os.mkfifo(src / "fifo")
    os.setxattr(src / "etc" / "hosts", "user.kept", b"1")
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = copy_directory_layer(fd, layer)
    finally:
        os.close(fd)
    assert (layer / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"
    assert stat.S_IMODE((layer / "etc" / "hosts").stat().st_mode) == 0o640
    assert os.getxattr(layer / "etc" / "hosts", "user.kept") == b"1"
    assert os.readlink(layer / "link") == os.fspath(outside)
    assert os.readlink(layer / "abs") == "/etc"
    assert stat.S_ISFIFO((layer / "fifo").lstat().st_mode)
    assert not (layer / "secret").exists()
    assert result.compression is Compression.NONE
    assert result.diff_id == result.compressed_digest
