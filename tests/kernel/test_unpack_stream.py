"""LayerStream on real fds: every format decodes to the last byte at chunk boundaries, where a
decoder may hold output with its input all consumed (long matches of zeros), and concatenated
members hash as one stream. Python's own compressors make the inputs."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from backports import zstd

from sandbox.archive import Compression, UnpackLimits
from sandbox.fstree import remove_path
from sandbox.layerstream import CHUNK, LayerStream

pytestmark = pytest.mark.kernel

COMPRESS: dict[Compression, Callable[[bytes], bytes]] = {
    Compression.NONE: lambda b: b,
    Compression.GZIP: lambda b: gzip.compress(b, 9),
    Compression.ZSTD: zstd.compress,
    Compression.XZ: lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
    Compression.BZIP2: bz2.compress,
}
SIZES = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]


def stream_of(tmp_path: Path, blob: bytes) -> tuple[LayerStream, int]:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    return LayerStream(fd, UnpackLimits()), fd


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("size", SIZES)
def test_layer_stream_decodes_to_the_last_byte(
    tmp_path: Path, compression: Compression, size: int
) -> None:
    data = bytes(size // 2) + b"x" * (size - size // 2)
    blob = COMPRESS[compression](data)
    stream, fd = stream_of(tmp_path, blob)
    try:
        assert stream.compression is compression
        assert stream.read(-1) == data
        stream.finish()
    finally:
        stream.close()
        os.close(fd)
    assert stream.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert stream.compressed_digest == "sha256:" + hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("compression", [c for c in COMPRESS if c is not Compression.NONE])
def test_layer_stream_concatenated_members_are_one_stream(
    tmp_path: Path, compression: Compression
) -> None:
    parts = [b"a" * 1000, b"", b"b" * CHUNK]
    stream, fd = stream_of(tmp_path, b"".join(COMPRESS[compression](p) for p in parts))
    try:
        assert stream.read(-1) == b"".join(parts)
        stream.finish()
    finally:
        stream.close()
        os.close(fd)


@pytest.mark.slow
def test_remove_path_removes_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        os.mkdir("deep", dir_fd=fd)
        here = os.open("deep", os.O_RDONLY, dir_fd=fd)
        for i in range(1100):
            os.mkdir("d", dir_fd=here)
            os.symlink("/etc", f"s{i}", dir_fd=here)
            nxt = os.open("d", os.O_RDONLY, dir_fd=here)
            os.close(here)
            here = nxt
        os.close(here)
    finally:
        os.close(fd)
    (tmp_path / "keep").write_text("x")
    remove_path(top)
    remove_path(top)  # already gone: nothing to do
    assert os.listdir(tmp_path) == ["keep"]
