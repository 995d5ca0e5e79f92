from __future__ import annotations

import bz2
import gzip
import lzma

import pytest
from backports import zstd

from runtimed.errors import InvalidArchiveError, InvalidParamsError, Json
from sandbox.archive import (
    Compression,
    Entry,
    EntryKind,
    LayerResult,
    Member,
    UnpackLimits,
    UnpackPlan,
    filter_xattrs,
    parse_member_path,
    pax_xattrs,
    plan_entry,
    sniff_compression,
)

TAR_HEAD = b"bin/" + bytes(96)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (gzip.compress(TAR_HEAD), Compression.GZIP),
        (zstd.compress(TAR_HEAD), Compression.ZSTD),
        (lzma.compress(TAR_HEAD, format=lzma.FORMAT_XZ), Compression.XZ),
        (bz2.compress(TAR_HEAD), Compression.BZIP2),
        (TAR_HEAD, Compression.NONE),
        (b"BZx123", Compression.NONE),  # "BZh" needs its block-size digit
        (b"", Compression.NONE),
    ],
)
def test_sniff_compression_by_content(head: bytes, expected: Compression) -> None:
    assert sniff_compression(head[:6]) is expected


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("a/b", ("a", "b")),
        ("./a//b/", ("a", "b")),
        ("/etc/passwd", ("etc", "passwd")),  # leading / stripped like GNU tar and Docker
        (".", ()),
        ("./", ()),
        ("a/.wh.b", ("a", ".wh.b")),
        ("x" * 255, ("x" * 255,)),
    ],
)
def test_parse_member_path_normalises(name: str, parts: tuple[str, ...]) -> None:
    assert parse_member_path(name) == parts


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../etc/passwd", "'..'"),
        ("a/../../b", "'..'"),
        ("a/..", "'..'"),
        ("a\0b", "NUL"),
        ("x" * 256, "NAME_MAX"),
        ("a/" * 2048, "PATH_MAX"),
    ],
)
def test_parse_member_path_rejects(name: str, reason: str) -> None:
    with pytest.raises(InvalidArchiveError, match=reason):
        parse_member_path(name)


def _plan(**fields: object) -> Entry | None:
    return plan_entry(Member(**fields)).entry  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("member", "kind", "path"),
    [
        (Member(name="a/f", type="0"), EntryKind.FILE, ("a", "f")),
        (Member(name="a/f", type="\0"), EntryKind.FILE, ("a", "f")),
        (Member(name="d/", type="5"), EntryKind.DIRECTORY, ("d",)),
        (Member(name="./", type="5"), EntryKind.DIRECTORY, ()),
        (Member(name="l", type="2", linkname="/etc"), EntryKind.SYMLINK, ("l",)),
        (Member(name="h", type="1", linkname="a/f"), EntryKind.HARDLINK, ("h",)),
        (Member(name="dev/null", type="3", devmajor=1, devminor=3), EntryKind.CHAR_DEVICE, None),
        (Member(name="p", type="6"), EntryKind.FIFO, ("p",)),
        (Member(name="a/.wh.b", type="0"), EntryKind.WHITEOUT, ("a", "b")),
        (Member(name="a/b", type="3"), EntryKind.WHITEOUT, ("a", "b")),  # 0/0 = overlay whiteout
        (Member(name="a/.wh..wh..opq", type="0"), EntryKind.OPAQUE, ("a",)),
        (Member(name=".wh..wh..opq", type="0"), EntryKind.OPAQUE, ()),
    ],
)
def test_plan_entry_kinds(member: Member, kind: EntryKind, path: tuple[str, ...] | None) -> None:
    entry = plan_entry(member).entry
    assert entry is not None
    assert entry.kind is kind
    if path is not None:
        assert entry.path == path


@pytest.mark.parametrize(
    "member",
    [
        Member(name="dev/sda", type="4", devmajor=8, devminor=0),
        Member(name="dev/mem", type="3", devmajor=1, devminor=1),
        Member(name="dev/kmsg", type="3", devmajor=1, devminor=11),
        Member(name="a/.wh..wh.plnk", type="0"),
        Member(name="vol", type="V"),
    ],
)
def test_plan_entry_skips_with_a_warning(member: Member) -> None:
    plan = plan_entry(member)
    assert plan.entry is None
    assert len(plan.warnings) == 1
    assert member.name in plan.warnings[0]


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (Member(name="h", type="1", linkname="../outside"), "'..'"),
        (Member(name="h", type="1", linkname="/"), "root"),
        (Member(name="a/.wh...", type="0"), "whiteout"),
        (Member(name="a/.wh.", type="0"), "whiteout"),
        (Member(name="s", type="2", linkname=""), "symlink"),
        (Member(name="f", type="0", uid=0xFFFFFFFF), "uid"),
        (Member(name="f", type="0", gid=-1), "gid"),
        (Member(name=".", type="0"), "root"),
        (Member(name="x/../../y", type="5"), "'..'"),
        (Member(name="f", type="0", mtime=float("nan")), "mtime"),
        (Member(name="f", type="0", mtime=1e30), "mtime"),
        (Member(name="f", type="0", mtime=-1e30), "mtime"),
    ],
)
def test_plan_entry_rejects(member: Member, reason: str) -> None:
    with pytest.raises(InvalidArchiveError, match=reason):
        plan_entry(member)


def test_plan_entry_keeps_setuid_and_capabilities() -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
    plan = plan_entry(
        Member(
            name="bin/ping",
            type="0",
            mode=0o104755,
            xattrs={
                "security.capability": cap,
                "trusted.overlay.opaque": b"y",
                "user.overlay.redirect": b"/etc",
                "security.selinux": b"x",
                "user.mime": b"text",
            },
        )
    )
    assert plan.entry is not None
    assert plan.entry.mode == 0o4755
    assert plan.entry.xattrs == (("security.capability", cap), ("user.mime", b"text"))
    assert len(plan.warnings) == 3


def test_filter_xattrs_drops_every_overlay_and_trusted_key() -> None:
    kept, warnings = filter_xattrs(
        "f",
        {
            "trusted.overlay.opaque": b"y",
            "user.overlay.opaque": b"y",
            "trusted.x": b"",
            "user.a\0b": b"",
        },
    )
    assert kept == ()
    assert len(warnings) == 4


def test_pax_xattrs_recovers_binary_values() -> None:
    raw = b"\x00\xff\x80"
    pax = {"SCHILY.xattr.security.capability": raw.decode("utf-8", "surrogateescape"), "path": "x"}
    assert pax_xattrs(pax) == {"security.capability": raw}


def test_plan_entry_mtime_in_nanoseconds() -> None:
    entry = _plan(name="f", type="0", mtime=1.5)
    assert entry is not None
    assert entry.mtime_ns == 1_500_000_000


def test_limits_json_round_trip() -> None:
    limits = UnpackLimits(max_bytes=10, max_entries=3, max_warnings=2)
    assert UnpackLimits.from_json(limits.to_json()) == limits


@pytest.mark.parametrize(
    "obj", [None, {"max_bytes": -1, "max_entries": 1, "max_warnings": 1}, {"max_bytes": True}]
)
def test_limits_from_json_names_the_bad_field(obj: object) -> None:
    with pytest.raises(InvalidParamsError):
        UnpackLimits.from_json(obj)  # type: ignore[arg-type]


def test_layer_result_json_round_trip() -> None:
    result = LayerResult(
        diff_id="sha256:" + "a" * 64,
        compressed_digest="sha256:" + "b" * 64,
        compression=Compression.ZSTD,
        size=3,
        entries=2,
        warnings=("x",),
    )
    assert LayerResult.from_json(result.to_json()) == result


def test_unpack_plan_json_round_trip() -> None:
    plan = UnpackPlan(
        name="blob",
        source_fd=5,
        parents=("/s/l1", "/s/l2"),
        dest="/s/new",
        work="/s/work",
        limits=UnpackLimits(max_entries=7),
        expected_diff_id="sha256:" + "c" * 64,
        hash_compressed=False,
    )
    assert UnpackPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    ("change", "parameter"),
    [
        ({"source_fd": -1}, "source_fd"),
        ({"source_fd": True}, "source_fd"),
        ({"parents": "/s/l1"}, "parents"),
        ({"dest": ""}, "dest"),
        ({"work": None}, "work"),  # parents need a work directory
        ({"limits": {}}, "limits.max_bytes"),
        ({"hash_compressed": "no"}, "hash_compressed"),
        # A digest cannot be checked without hashing.
        ({"expected_digest": "sha256:" + "a" * 64, "hash_compressed": False}, "expected_digest"),
    ],
)
def test_unpack_plan_from_json_names_the_bad_field(change: dict[str, Json], parameter: str) -> None:
    obj: dict[str, Json] = {
        "name": "blob",
        "source_fd": 3,
        "parents": ["/s/l1"],
        "dest": "/s/new",
        "work": "/s/work",
        "limits": UnpackLimits().to_json(),
        **change,
    }
    with pytest.raises(InvalidParamsError) as raised:
        UnpackPlan.from_json(obj)
    assert raised.value.details["parameter"] == parameter
