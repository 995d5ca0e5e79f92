"""The fast header path against tarfile itself: for every member of archives in each tar
format, ``simple_member`` either declines or builds exactly the member tarfile builds
(``tests/kernel/test_unpack.py`` does the same on GNU tar's output)."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.unpack import _byte_sum, member_from_tarinfo, simple_member


def _archive(fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:

        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime, info.mode = kind, len(data), 1_700_000_000, 0o4755
            info.uid, info.gid, info.uname, info.gname = 1000, 100, "user", "group"
            for key, value in kw.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("dir/", tarfile.DIRTYPE)
        add("dir/file", data=b"x" * 700)
        add("dir/empty")
        add("link", tarfile.SYMTYPE, linkname="/etc/passwd")
        add("hard", tarfile.LNKTYPE, linkname="dir/file")
        add("null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)
        add("fifo", tarfile.FIFOTYPE)
        add("a" * 90 + "/" + "b" * 90)  # ustar splits it into prefix + name
        add("d/" * 60 + "e")
        add("caf\u00e9")
        if fmt != tarfile.USTAR_FORMAT:
            add("c" * 150)  # GNU long name or PAX path
            add("big-uid", uid=2**40)  # base-256 in GNU, PAX record in PAX
    return out.getvalue()


def check_against_tarfile(data: bytes) -> int:
    """Compare every member; the number the fast path handled."""
    handled = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            fast = simple_member(data[member.offset : member.offset + 512])
            if fast is None:
                continue
            handled += 1
            assert fast == member_from_tarinfo(member), member.name
    return handled


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_simple_member_matches_tarfile(fmt: int) -> None:
    assert check_against_tarfile(_archive(fmt)) >= 8


@pytest.mark.parametrize(
    "block",
    [
        bytes(512),
        b"x" * 512,
        # A valid header with one byte of its name changed: the checksum no longer matches.
        bytes([0x41]) + _archive(tarfile.USTAR_FORMAT)[1:512],
    ],
)
def test_simple_member_declines_what_tarfile_must_judge(block: bytes) -> None:
    assert simple_member(block) is None


def test_simple_member_declines_extended_headers() -> None:
    data = _archive(tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        long = next(m for m in tar.getmembers() if m.name == "c" * 150)
    assert data[long.offset + 156 : long.offset + 157] == tarfile.XHDTYPE
    assert simple_member(data[long.offset : long.offset + 512]) is None


@given(st.binary(min_size=512, max_size=512))
def test_byte_sum_is_the_sum_of_the_block(block: bytes) -> None:
    assert _byte_sum(block) == sum(block)


# Numeric fields of a ustar header: (offset, width) of mode, uid, gid, size, mtime, devmajor
# and devminor.
_FILE_HEADER = _archive(tarfile.USTAR_FORMAT)[512:1024]  # "dir/file"
_NUMERIC_FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]


@st.composite
def _numeric_field(draw: st.DrawFn) -> tuple[int, bytes]:
    """A field as writers pad them (spaces, octal digits, NUL or space, NUL fill), with
    what may follow a NUL (more digits) and the odd byte tarfile refuses or reads."""
    offset, width = draw(st.sampled_from(_NUMERIC_FIELDS))
    text = b"".join(
        [
            b" " * draw(st.integers(0, 2)),
            draw(st.binary(max_size=width).map(lambda b: bytes(48 + x % 8 for x in b))),
            draw(st.sampled_from([b"", b"\0", b" ", b"\0 ", b" \0"])),
            draw(st.sampled_from([b"", b"1", b"7\0", b"\0", b"8", b"\x80", b"_1", b"\t"])),
        ]
    )
    return offset, text[:width].ljust(width, b"\0")


@given(_numeric_field())
def test_simple_member_numbers_match_tarfile_or_decline(field: tuple[int, bytes]) -> None:
    offset, value = field
    block = bytearray(_FILE_HEADER)
    block[offset : offset + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    fast = simple_member(bytes(block))
    try:
        info = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        assert fast is None
        return
    if fast is not None:
        assert fast == member_from_tarinfo(info)
