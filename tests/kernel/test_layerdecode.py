"""The native zstd stage (``sandbox.layerdecode`` through ``LayerStream``) on streams made by
the real ``zstd`` tool: frames read to their end and their checksums checked, concatenated
frames as one stream, corrupt, truncated and trailing bytes (garbage, a cut magic, a skippable
frame that ``zstd -d`` itself accepts) rejected naming the blob, digests checked, limits
enforced, read errors reported, and the ring neither leaking nor reusing a chunk early; frames
with windows up to 8 MiB decoded straight into the ring with matches reaching back across its
wrap, larger ones through libzstd's own window, both kinds in one stream.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runtimed.errors import InternalError, InvalidArchiveError, KernelError, LimitExceededError
from sandbox.archive import Compression, UnpackLimits
from sandbox.layerdecode import BLOCK_MAX, ZstdDecoder, new_buffer
from sandbox.layerstream import CHUNK, LayerStream
from sandbox.unpack import unpack_stream
from tests.kernel.test_unpack import SMALL
from tests.support import require

pytestmark = pytest.mark.kernel

# RFC 8878 3.1.2: magic 0x184D2A50-0x184D2A5F, little-endian, then a 4-byte frame size.
SKIPPABLE = struct.pack("<II", 0x184D2A50, 4) + b"skip"
LIMITS = UnpackLimits()


def zstd(data: bytes, *args: str) -> bytes:
    require(shutil.which("zstd") is not None, "zstd is not installed (scripts/setup)")
    return subprocess.run(
        ["zstd", "-q", "-c", *args], input=data, capture_output=True, check=True
    ).stdout


def unzstd(blob: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["zstd", "-q", "-d", "-c"], input=blob, capture_output=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_all(
    tmp_path: Path, blob: bytes, limits: UnpackLimits = LIMITS
) -> tuple[bytes, LayerStream]:
    path = tmp_path / "blob"
    path.write_bytes(blob)
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = LayerStream(fd, limits, name="blob-x")
        try:
            assert stream.compression is Compression.ZSTD
            data = stream.read(-1)
            stream.finish()
        finally:
            stream.close()
    finally:
        os.close(fd)
    return data, stream


def test_layerdecode_frames_of_the_tool_are_one_stream(tmp_path: Path) -> None:
    parts = [os.urandom(3000), b"", b"z" * (CHUNK + 5), os.urandom(CHUNK // 3)]
    blob = b"".join(zstd(p) for p in parts)
    data, stream = read_all(tmp_path, blob)
    assert data == b"".join(parts)
    assert stream.diff_id == sha256(data)
    assert stream.compressed_digest == sha256(blob)


def test_layerdecode_views_stay_intact_while_the_ring_is_reused(tmp_path: Path) -> None:
    # Random data, more than the ring holds, read in pieces that straddle chunks, by a reader
    # that first lets the decoder run as far ahead as it may (the queues would take more
    # chunks than the ring has room for): a region decoded over a chunk not given back yet
    # would show up as wrong bytes.
    data = os.urandom(14 * CHUNK + 123)
    path = tmp_path / "blob"
    path.write_bytes(zstd(data, "-1"))
    fd = os.open(path, os.O_RDONLY)
    got = bytearray()
    try:
        stream = LayerStream(fd, LIMITS)
        try:
            time.sleep(0.5)
            while piece := stream.read_some(CHUNK // 3):
                got += piece
                got += stream.read(700)
                assert stream.peek(CHUNK // 2) == data[len(got) : len(got) + CHUNK // 2]
            stream.finish()
        finally:
            stream.close()
    finally:
        os.close(fd)
    assert got == data
    assert stream.diff_id == sha256(data)


def _flip(blob: bytes, index: int) -> bytes:
    return blob[:index] + bytes([blob[index] ^ 0xFF]) + blob[index + 1 :]


BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "corrupt-block": (lambda: _flip(zstd(SMALL), 20), "corrupt data"),
    "bad-checksum": (lambda: _flip(zstd(SMALL), -1), "corrupt data"),
    "truncated": (lambda: zstd(SMALL)[:-10], "truncated"),
    "truncated-in-header": (lambda: zstd(SMALL)[:5], "truncated"),
    "trailing-garbage": (lambda: zstd(SMALL) + b"garbage!", "trailing garbage"),
    "trailing-cut-magic": (lambda: zstd(SMALL) + b"\x28\xb5", "trailing garbage"),
    "trailing-zeros": (lambda: zstd(SMALL) + bytes(16), "trailing garbage"),
    # zstd -d skips it (checked below); a layer is a tar in zstd frames, nothing else.
    "skippable-frame": (lambda: zstd(SMALL) + SKIPPABLE, "trailing garbage"),
    "skippable-between": (
        lambda: zstd(SMALL[:4096]) + SKIPPABLE + zstd(SMALL[4096:]),
        "trailing garbage",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_layerdecode_bad_streams_are_invalid_naming_the_blob(tmp_path: Path, case: str) -> None:
    make, reason = BAD[case]
    with pytest.raises(InvalidArchiveError, match=reason) as raised:
        read_all(tmp_path, make())
    assert raised.value.details["blob"] == "blob-x"
    assert raised.value.details["compression"] == "zstd"


def test_layerdecode_skippable_frame_is_one_the_tool_accepts() -> None:
    decoded = unzstd(BAD["skippable-frame"][0]())
    assert decoded.returncode == 0
    assert decoded.stdout == SMALL


def test_layerdecode_limit_stops_the_stream(tmp_path: Path) -> None:
    blob = zstd(bytes(5 * CHUNK))
    with pytest.raises(LimitExceededError) as raised:
        read_all(tmp_path, blob, UnpackLimits(max_bytes=2 * CHUNK))
    assert raised.value.details == {"blob": "blob-x", "limit": "max_bytes"}


@pytest.mark.parametrize("which", ["diff_id", "digest"])
def test_layerdecode_digest_mismatch_is_invalid(tmp_path: Path, which: str) -> None:
    blob = zstd(SMALL)
    (tmp_path / "blob").write_bytes(blob)
    (tmp_path / "root").mkdir()
    wrong = "sha256:" + "0" * 64
    expected = {"expected_diff_id": sha256(SMALL), "expected_digest": sha256(blob)}
    expected[f"expected_{which}"] = wrong
    fd = os.open(tmp_path / "blob", os.O_RDONLY)
    root = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(InvalidArchiveError, match=f"{which} mismatch"):
            unpack_stream(
                fd,
                root,
                UnpackLimits(),
                expected_diff_id=expected["expected_diff_id"],
                expected_digest=expected["expected_digest"],
            )
    finally:
        os.close(fd)
        os.close(root)


def test_layerdecode_read_error_is_a_kernel_error(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # read(2) fails with EISDIR
    decoder = ZstdDecoder(
        fd, zstd(b"")[:4], hash_compressed=True, invalid=InvalidArchiveError, history_max=0
    )
    try:
        with pytest.raises(KernelError) as raised:
            decoder.read_into(new_buffer(BLOCK_MAX), 0, BLOCK_MAX)
        assert raised.value.details["errno"] == "EISDIR"
    finally:
        decoder.close()
        os.close(fd)


def test_layerdecode_close_stops_a_decoder_waiting_for_buffers(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(zstd(bytes(20 * CHUNK)))
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = LayerStream(fd, LIMITS)
        assert len(stream.read_some(10)) == 10  # the pool is drained behind this chunk
        stream.close()
        for thread in stream._threads:
            thread.join(timeout=5)
            assert not thread.is_alive()
    finally:
        os.close(fd)


def test_layerdecode_matches_reach_back_across_the_ring(tmp_path: Path) -> None:
    """Random blocks repeated 3 MiB apart: every match refers back 3 MiB, into earlier
    regions and, past the ring's size, across its wrap; frames of both kinds in one stream."""
    block = os.urandom((3 << 20) + 777)
    data = block * 9 + os.urandom(5 << 20) + block * 3
    frames = [zstd(data, "-3", "--long=23"), zstd(data, "-3", "--long=24"), zstd(data, "-1")]
    path = tmp_path / "blob"
    path.write_bytes(b"".join(frames))
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = LayerStream(fd, UnpackLimits(max_bytes=1 << 30))
        try:
            stream.finish()
        finally:
            stream.close()
    finally:
        os.close(fd)
    assert stream.diff_id == sha256(data * 3)


def test_layerdecode_refuses_a_region_shorter_than_a_block(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(zstd(SMALL))
    fd = os.open(path, os.O_RDONLY)
    head = os.read(fd, 4)
    decoder = ZstdDecoder(
        fd, head, hash_compressed=False, invalid=InvalidArchiveError, history_max=0
    )
    try:
        with pytest.raises(InternalError):
            decoder.read_into(new_buffer(BLOCK_MAX), 1, BLOCK_MAX)  # beyond the ring's end
        with pytest.raises(InternalError):
            decoder.read_into(new_buffer(BLOCK_MAX), 0, BLOCK_MAX - 1)
    finally:
        decoder.close()
        os.close(fd)
