"""binfmt_misc entry codec: register lines and status text, both ways, within kernel limits."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from binfmt.entry import (
    MAX_REGISTER_LENGTH,
    BinfmtEntry,
    BinfmtFlag,
    BinfmtKind,
    format_flags,
    format_register_line,
    format_status,
    magic_matches,
    parse_flags,
    parse_register_line,
    parse_status,
)
from runtimed.errors import BinfmtEntryError

F, P, OPEN, C = (
    BinfmtFlag.FIX_BINARY,
    BinfmtFlag.PRESERVE_ARGV0,
    BinfmtFlag.OPEN_BINARY,
    BinfmtFlag.CREDENTIALS,
)
AARCH64_MAGIC = bytes.fromhex("7f454c460201010000000000000000000200b700")
AARCH64_MASK = bytes.fromhex("ffffffffffffff00fffffffffffffffffeffffff")
AARCH64 = BinfmtEntry(
    name="qemu-aarch64",
    magic=AARCH64_MAGIC,
    mask=AARCH64_MASK,
    interpreter="/usr/bin/qemu-aarch64-static",
    flags=frozenset({F, P}),
)
AARCH64_LINE = (
    rb":qemu-aarch64:M:0:\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    rb":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    rb":/usr/bin/qemu-aarch64-static:PF"
)
AARCH64_STATUS = (
    "enabled\n"
    "interpreter /usr/bin/qemu-aarch64-static\n"
    "flags: PF\n"
    "offset 0\n"
    "magic 7f454c460201010000000000000000000200b700\n"
    "mask ffffffffffffff00fffffffffffffffffeffffff\n"
)


def test_entry_format_register_line_qemu_aarch64() -> None:
    assert format_register_line(AARCH64) == AARCH64_LINE


def test_entry_parse_register_line_of_debian_binfmt_d() -> None:
    # /usr/lib/binfmt.d/qemu-aarch64.conf of Debian 12's qemu-user-static
    line = (
        rb":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00"
        rb"\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff"
        rb"\xfe\xff\xff\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF" + b"\n"
    )
    entry = parse_register_line(line)
    assert entry.magic == AARCH64_MAGIC
    assert entry.mask == AARCH64_MASK
    assert entry.offset == 0
    assert entry.interpreter == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    assert entry.flags == {OPEN, P, F}
    assert entry.flags_text == "POF"


def test_entry_format_status_matches_kernel_text() -> None:
    assert format_status(AARCH64) == AARCH64_STATUS
    assert parse_status("qemu-aarch64", AARCH64_STATUS) == AARCH64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "disabled\ninterpreter /usr/bin/wine\nflags: \nextension .exe\n",
            BinfmtEntry(
                name="x",
                kind=BinfmtKind.EXTENSION,
                magic=b"exe",
                interpreter="/usr/bin/wine",
                enabled=False,
            ),
        ),
        (
            "enabled\ninterpreter /bin/i\nflags: OC\noffset 2\nmagic 4142\n",
            BinfmtEntry(
                name="x", offset=2, magic=b"AB", interpreter="/bin/i", flags=frozenset({C})
            ),
        ),
    ],
)
def test_entry_parse_status(text: str, expected: BinfmtEntry) -> None:
    assert parse_status("x", text) == expected
    assert format_status(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "enabled\n",
        "on\ninterpreter /x\nflags: \noffset 0\nmagic 41\n",
        "enabled\ninterp /x\nflags: \noffset 0\nmagic 41\n",
        "enabled\ninterpreter /x\nflags: Z\noffset 0\nmagic 41\n",
        "enabled\ninterpreter /x\nflags: \noffset x\nmagic 41\n",
        "enabled\ninterpreter /x\nflags: \noffset 0\nmagic 4\n",
        "enabled\ninterpreter /x\nflags: \noffset 0\nmagic 41\nmask 4142\n",
        "enabled\ninterpreter /x\nflags: \noffset 0\nmagic 41\nmask zz\n",
        "enabled\ninterpreter /x\nflags: \noffset 0\nmagic 41\nbogus 41\n",
        "enabled\ninterpreter /x\nflags: \noffset 0\n",
    ],
)
def test_entry_parse_status_rejects_malformed(text: str) -> None:
    with pytest.raises(BinfmtEntryError):
        parse_status("x", text)


def test_entry_credentials_flag_implies_open_binary() -> None:
    entry = BinfmtEntry(name="x", magic=b"A", interpreter="/i", flags=frozenset({C, F}))
    assert entry.flags == {OPEN, C, F}
    assert entry.flags_text == "OCF"
    assert parse_flags("C") == {OPEN, C}
    assert format_flags([F, P, C, OPEN]) == "POCF"


def test_entry_flags_compare_with_letters() -> None:
    assert "F" in AARCH64.flags
    assert "".join(sorted(AARCH64.flags)) == "FP"


def test_entry_parse_flags_rejects_unknown() -> None:
    with pytest.raises(BinfmtEntryError, match="'X'"):
        parse_flags("FX")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "."}, "name"),
        ({"name": ".."}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "register"}, "name"),
        ({"name": "status"}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "n" * 256}, "NAME_MAX"),
        ({"name": "é" * 128}, "NAME_MAX"),  # 256 bytes in UTF-8
        ({"magic": b""}, "empty"),
        ({"offset": -1}, "negative"),
        ({"offset": 250, "magic": b"1234567"}, "exceeds 256"),
        ({"magic": b"A" * 257}, "exceeds 256"),
        ({"mask": b"\xff\xff"}, "mask length 2"),
        ({"interpreter": ""}, "empty interpreter"),
        ({"interpreter": "/x\n"}, "control"),
        ({"kind": BinfmtKind.EXTENSION, "magic": b"a/b"}, "extension"),
        ({"kind": BinfmtKind.EXTENSION, "magic": b"exe", "offset": 1}, "no offset"),
        ({"kind": BinfmtKind.EXTENSION, "magic": b"exe", "mask": b"abc"}, "no offset"),
    ],
)
def test_entry_kernel_limits_enforced(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"name": "x", "magic": b"A", "interpreter": "/i"}
    with pytest.raises(BinfmtEntryError, match=message):
        BinfmtEntry(**{**base, **fields})  # type: ignore[arg-type]


def test_entry_offset_plus_magic_exactly_256_is_allowed() -> None:
    entry = BinfmtEntry(name="x", offset=250, magic=b"123456", interpreter="/i")
    assert parse_register_line(format_register_line(entry)) == entry


def test_entry_register_line_over_1920_bytes_is_refused() -> None:
    entry = BinfmtEntry(name="x", magic=b"\0" * 250, mask=b"\0" * 250, interpreter="/" + "i" * 100)
    with pytest.raises(BinfmtEntryError, match="1920"):
        format_register_line(entry)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b":a:M::A::/", "11..1920"),
        (b":x:M::A::/i:" + b"F" * 1910, "11..1920"),
        (b":x:Q::AB::/interp:", "neither M nor E"),
        (b":x:M:-1:AB::/interp:", "not a decimal"),
        (b":x:M:0x1:AB::/interp:", "not a decimal"),
        (b":x:M:::AB:/interp:", "empty magic"),
        (b":x:M::\\xZZ::/interp:", "bad \\\\x escape"),
        (b":x:M::\\x4:::/interp:", "bad \\\\x escape"),
        (b":x:M::AB:\\xff:/interp:", "mask length 1"),
        (b":x:M::AB::/interp", "ends inside a field"),
        (b":x:M::AB::/interp:FX", "only P, O, C, F"),
        (b":x:M::AB::/interp:F\n\n", "only P, O, C, F"),
        (b":x:M::A\0B::/interp:", "raw NUL"),
        (b"::M::AB::/interp:", "name"),
        (b":..:M::AB::/interp:", "name"),
        (b":x:M::AB:::", "empty interpreter"),
        (b":x:M:300:AB::/interp:", "exceeds 256"),
    ],
)
def test_entry_parse_register_line_refuses_what_the_kernel_refuses(
    line: bytes, message: str
) -> None:
    with pytest.raises(BinfmtEntryError, match=message):
        parse_register_line(line)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b"|weird:name|M|3|\\x41B|\\xffq|/opt/a:b/interp|F\n",
            BinfmtEntry(
                name="weird:name",
                offset=3,
                magic=b"AB",
                mask=b"\xffq",
                interpreter="/opt/a:b/interp",
                flags=frozenset({F}),
            ),
        ),
        (
            b":wine:E:ignored:exe:ignored:/usr/bin/wine:",
            BinfmtEntry(
                name="wine", kind=BinfmtKind.EXTENSION, magic=b"exe", interpreter="/usr/bin/wine"
            ),
        ),
        # string_unescape keeps a backslash before anything but x, with the next byte
        (b":x:M::\\\\x41::/i:", BinfmtEntry(name="x", magic=b"\\\\x41", interpreter="/i")),
        (b":x:M:+7:AB::/i:", BinfmtEntry(name="x", offset=7, magic=b"AB", interpreter="/i")),
    ],
)
def test_entry_parse_register_line_kernel_syntax(line: bytes, expected: BinfmtEntry) -> None:
    assert parse_register_line(line) == expected


def test_entry_delimiter_avoids_colons_in_name_and_interpreter() -> None:
    entry = BinfmtEntry(name="a:b", magic=b":|", interpreter="/x|y:z")
    line = format_register_line(entry)
    assert line.startswith(b"#a:b#M#")
    assert parse_register_line(line) == entry


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bytes.fromhex("7f454c460201010300000000000000000200b700"), True),  # OSABI GNU
        (bytes.fromhex("7f454c460201010000000000000000000300b700"), True),  # ET_DYN
        (bytes.fromhex("7f454c460201010000000000000000000200b7"), True),  # zero-padded
        (bytes.fromhex("7f454c4602010100000000000000000002"), False),  # ends before e_machine
        (bytes.fromhex("7f454c460201010000000000000000000200b800"), False),
        (bytes.fromhex("7f454c460101010000000000000000000200b700"), False),  # ELF32
        (b"", False),
    ],
)
def test_entry_matches_like_check_file(data: bytes, expected: bool) -> None:
    assert AARCH64.matches(data) is expected


def test_entry_matches_extension_and_zero_padding() -> None:
    wine = BinfmtEntry(
        name="wine", kind=BinfmtKind.EXTENSION, magic=b"exe", interpreter="/usr/bin/wine"
    )
    assert wine.matches(b"MZ", filename="/tmp/setup.exe")
    assert not wine.matches(b"MZ", filename="/tmp/setup.exe.txt")
    assert not wine.matches(b"MZ", filename="/tmp/exe")
    # the kernel's buffer is zero-filled past the end of a short file
    assert magic_matches(b"AB", offset=2, magic=b"\0\0", mask=None)
    assert not magic_matches(b"AB", offset=0, magic=b"AC", mask=None)
    assert magic_matches(b"AB", offset=0, magic=b"AC", mask=b"\xff\xfc")


# --- hypothesis round trips -------------------------------------------------------------------


@st.composite
def entries(draw: st.DrawFn) -> BinfmtEntry:
    name_chars = st.characters(
        exclude_categories=["Cs"], exclude_characters="/\0", min_codepoint=0x20
    )
    name = draw(st.text(name_chars, min_size=1, max_size=40).filter(lambda n: "\x7f" not in n))
    assume(name not in {".", "..", "register", "status"})
    interpreter = draw(
        st.text(name_chars, min_size=1, max_size=60).filter(lambda n: "\x7f" not in n)
    )
    flags = draw(st.frozensets(st.sampled_from(list(BinfmtFlag))))
    enabled = draw(st.booleans())
    if draw(st.booleans()):
        ext = draw(
            st.binary(min_size=1, max_size=10).filter(
                lambda b: not set(b) & set(b"/\x7f") and min(b) >= 0x20
            )
        )
        return BinfmtEntry(
            name=name,
            kind=BinfmtKind.EXTENSION,
            magic=ext,
            interpreter=interpreter,
            flags=flags,
            enabled=enabled,
        )
    magic = draw(st.binary(min_size=1, max_size=128))
    offset = draw(st.integers(min_value=0, max_value=256 - len(magic)))
    mask = draw(st.none() | st.binary(min_size=len(magic), max_size=len(magic)))
    return BinfmtEntry(
        name=name,
        offset=offset,
        magic=magic,
        mask=mask,
        interpreter=interpreter,
        flags=flags,
        enabled=enabled,
    )


@pytest.mark.slow
@given(entries())
def test_entry_register_line_round_trip(entry: BinfmtEntry) -> None:
    try:
        line = format_register_line(entry)
    except BinfmtEntryError:
        assume(False)
        raise
    assert len(line) <= MAX_REGISTER_LENGTH
    # a register line carries no enabled state: the kernel registers entries enabled
    assert parse_register_line(line) == BinfmtEntry(
        name=entry.name,
        kind=entry.kind,
        offset=entry.offset,
        magic=entry.magic,
        mask=entry.mask,
        interpreter=entry.interpreter,
        flags=entry.flags,
    )


@pytest.mark.slow
@given(entries())
def test_entry_status_round_trip(entry: BinfmtEntry) -> None:
    assert parse_status(entry.name, format_status(entry)) == entry


@given(st.binary(max_size=300))
def test_entry_parse_register_line_arbitrary_bytes_only_raise_entry_errors(line: bytes) -> None:
    try:
        entry = parse_register_line(line)
    except BinfmtEntryError:
        return
    assert parse_register_line(format_register_line(entry)) == entry
