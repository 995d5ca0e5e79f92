"""ELF headers -> ElfInfo -> platform, on headers built byte by byte and on real binaries."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from binfmt.elf import (
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_LOONGARCH,
    EM_MIPS,
    EM_PPC64,
    EM_RISCV,
    EM_S390,
    EM_SPARC32PLUS,
    EM_X86_64,
    ElfInfo,
    elf_platform,
    parse_elf,
    parse_shebang,
)
from binfmt.platform import Platform
from runtimed.errors import ElfError, UnsupportedPlatformError
from tests.support import busybox
from tests.unit.binfmt.elfbuild import ET_DYN, elf_header, elf_with_interpreter, program_header

EF_ARM_EABI5 = 0x05000000
EF_ARM_HARD = 0x400
EF_ARM_SOFT = 0x200
EF_MIPS_ABI2 = 0x20


@pytest.mark.parametrize(
    ("machine", "bits", "order", "osabi", "flags", "expected"),
    [
        (EM_X86_64, 64, "little", 0, 0, "linux/amd64"),
        (EM_X86_64, 64, "little", 3, 0, "linux/amd64"),
        (EM_X86_64, 32, "little", 0, 0, "linux/amd64p32"),
        (EM_386, 32, "little", 0, 0, "linux/386"),
        (6, 32, "little", 0, 0, "linux/386"),  # EM_486
        (EM_AARCH64, 64, "little", 0, 0, "linux/arm64"),
        (EM_AARCH64, 64, "big", 0, 0, "linux/arm64be"),
        (EM_ARM, 32, "little", 0, EF_ARM_EABI5 | EF_ARM_HARD, "linux/arm/v7"),
        (EM_ARM, 32, "little", 0, EF_ARM_EABI5 | EF_ARM_SOFT, "linux/arm/v5"),
        (EM_ARM, 32, "little", 0, EF_ARM_HARD, "linux/arm/v5"),  # not EABI: no float flags
        (EM_ARM, 32, "big", 0, EF_ARM_EABI5, "linux/armbe/v5"),
        (EM_PPC64, 64, "little", 0, 2, "linux/ppc64le"),
        (EM_PPC64, 64, "big", 0, 1, "linux/ppc64"),
        (20, 32, "big", 0, 0, "linux/ppc"),
        (EM_S390, 64, "big", 0, 0, "linux/s390x"),
        (EM_S390, 32, "big", 0, 0, "linux/s390"),
        (EM_RISCV, 64, "little", 0, 0x5, "linux/riscv64"),
        (EM_RISCV, 32, "little", 0, 0, "linux/riscv"),
        (EM_MIPS, 32, "big", 0, 0x70001007, "linux/mips"),
        (EM_MIPS, 32, "little", 0, 0x70001007, "linux/mipsle"),
        (EM_MIPS, 32, "big", 0, 0x80000027, "linux/mips64p32"),
        (EM_MIPS, 32, "little", 0, EF_MIPS_ABI2, "linux/mips64p32le"),
        (EM_MIPS, 64, "big", 0, 0x80000007, "linux/mips64"),
        (EM_MIPS, 64, "little", 0, 0x80000007, "linux/mips64le"),
        (EM_LOONGARCH, 64, "little", 0, 0x43, "linux/loong64"),
        (2, 32, "big", 0, 0, "linux/sparc"),
        (EM_SPARC32PLUS, 32, "big", 0, 0, "linux/sparc/v8plus"),
        (43, 64, "big", 0, 0, "linux/sparc64"),
        (0x9026, 64, "little", 0, 0, "linux/alpha"),
        (15, 32, "big", 0, 0, "linux/hppa"),
        (4, 32, "big", 0, 0, "linux/m68k"),
        (42, 32, "little", 0, 0, "linux/sh4"),
        (42, 32, "big", 0, 0, "linux/sh4eb"),
        (189, 32, "big", 0, 0, "linux/microblaze"),
        (0xBAAB, 32, "little", 0, 0, "linux/microblazeel"),
        (92, 32, "big", 0, 0, "linux/or1k"),
        (94, 32, "little", 0, 0, "linux/xtensa"),
        (94, 32, "big", 0, 0, "linux/xtensaeb"),
        (164, 32, "little", 0, 0, "linux/hexagon"),
        (EM_X86_64, 64, "little", 9, 0, "freebsd/amd64"),
        (EM_AARCH64, 64, "little", 12, 0, "openbsd/arm64"),
    ],
)
def test_elf_platform_of_built_headers(
    machine: int,
    bits: Literal[32, 64],
    order: Literal["little", "big"],
    osabi: int,
    flags: int,
    expected: str,
) -> None:
    data = elf_header(machine=machine, bits=bits, order=order, osabi=osabi, flags=flags)
    info = parse_elf(data)
    assert (info.machine, info.elf_class, info.byte_order, info.osabi, info.flags) == (
        machine,
        bits,
        order,
        osabi,
        flags,
    )
    assert info.interpreter is None
    assert info.missing is None
    assert str(elf_platform(info)) == expected


@pytest.mark.parametrize(
    ("machine", "bits", "order"),
    [
        (EM_AARCH64, 32, "little"),
        (EM_386, 64, "little"),
        (EM_PPC64, 32, "big"),
        (0x1234, 64, "little"),
    ],
)
def test_elf_platform_unknown_combination_is_unsupported(
    machine: int, bits: Literal[32, 64], order: Literal["little", "big"]
) -> None:
    info = parse_elf(elf_header(machine=machine, bits=bits, order=order))
    with pytest.raises(UnsupportedPlatformError) as excinfo:
        elf_platform(info)
    assert excinfo.value.details["machine"] == machine


@pytest.mark.parametrize(
    ("bits", "order"), [(64, "little"), (32, "big"), (32, "little"), (64, "big")]
)
def test_elf_interpreter_read_from_pt_interp(
    bits: Literal[32, 64], order: Literal["little", "big"]
) -> None:
    image = elf_with_interpreter(b"/lib/ld-musl.so.1", bits=bits, order=order)
    info = parse_elf(image)
    assert info.interpreter == "/lib/ld-musl.so.1"
    assert info.type == ET_DYN
    assert info.missing is None


def test_elf_missing_ranges_are_asked_for_then_read() -> None:
    image = elf_with_interpreter(b"/lib64/ld.so", phoff=5000, interp_offset=9000)
    head = image[:4096]
    first = parse_elf(head)
    assert first.interpreter is None
    assert first.missing == (5000, 2 * 56)
    reads = {5000: image[5000 : 5000 + 112]}
    second = parse_elf(head, reads=reads)
    assert second.missing == (9000, len(b"/lib64/ld.so\0"))
    reads[9000] = image[9000:]
    third = parse_elf(head, reads=reads)
    assert third.missing is None
    assert third.interpreter == "/lib64/ld.so"


def test_elf_short_read_of_a_missing_range_is_truncation() -> None:
    image = elf_with_interpreter(b"/lib64/ld.so", phoff=5000)
    with pytest.raises(ElfError, match="truncated"):
        parse_elf(image[:64], reads={5000: image[5000:5050]})


def test_elf_interpreter_in_head_needs_no_reads() -> None:
    image = elf_with_interpreter(b"/x", interp_offset=300)
    assert parse_elf(image[:400]).interpreter == "/x"
    assert parse_elf(image[:301]).missing == (300, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (b"\x7fEL", "truncated"),
        (b"#!/bin/sh\n", "not an ELF file"),
        (b"MZ\x90\x00" + b"\0" * 60, "not an ELF file"),
        (b"\x7fELF\x02\x01\x01", "truncated ELF identification"),
        (elf_header(machine=EM_X86_64)[:40], "truncated ELF header: 40 of 64"),
        (elf_header(machine=EM_ARM, bits=32)[:51], "truncated ELF header: 51 of 52"),
        (b"\x7fELF\x03\x01\x01" + b"\0" * 61, "invalid ELF class 3"),
        (b"\x7fELF\x02\x00\x01" + b"\0" * 61, "invalid ELF byte order 0"),
        (elf_header(machine=EM_X86_64, phnum=1, phentsize=32), "invalid e_phentsize 32"),
        (elf_header(machine=EM_X86_64, phnum=0xFFFF), "PN_XNUM"),
    ],
)
def test_elf_rejects_non_elf_and_truncated(data: bytes, message: str) -> None:
    with pytest.raises(ElfError, match=message):
        parse_elf(data)


@pytest.mark.parametrize(
    ("filesz", "message"), [(0, "PT_INTERP of 0 bytes"), (5000, "PT_INTERP of 5000")]
)
def test_elf_rejects_absurd_pt_interp_size(filesz: int, message: str) -> None:
    header = elf_header(machine=EM_X86_64, phnum=1)
    phdr = program_header(p_type=3, offset=120, filesz=filesz)
    with pytest.raises(ElfError, match=message):
        parse_elf(header + phdr + b"\0" * 8000)


def test_elf_rejects_empty_pt_interp() -> None:
    image = elf_with_interpreter(b"")
    with pytest.raises(ElfError, match="empty PT_INTERP"):
        parse_elf(image)


@given(st.binary(max_size=200))
def test_elf_arbitrary_bytes_parse_or_raise_elf_error(data: bytes) -> None:
    with contextlib.suppress(ElfError):
        parse_elf(data)


@given(st.binary(min_size=64, max_size=200))
def test_elf_arbitrary_bytes_behind_a_valid_ident(tail: bytes) -> None:
    try:
        info = parse_elf(b"\x7fELF\x02\x01\x01" + tail)
    except ElfError:
        return
    assert isinstance(info, ElfInfo)


def test_elf_host_true_is_native_and_dynamic() -> None:
    info = parse_elf(Path("/bin/true").read_bytes()[:4096])
    assert str(elf_platform(info)) == "linux/amd64"
    assert info.interpreter is not None
    assert info.interpreter.endswith("ld-linux-x86-64.so.2")


@pytest.mark.parametrize(
    ("debian_arch", "expected"),
    [
        ("amd64", "linux/amd64"),
        ("arm64", "linux/arm64"),
        ("armhf", "linux/arm/v7"),
        ("s390x", "linux/s390x"),
        ("ppc64el", "linux/ppc64le"),
    ],
)
def test_elf_busybox_fixture_platform(debian_arch: str, expected: str) -> None:
    with busybox(debian_arch).open("rb") as f:
        info = parse_elf(f.read(4096))
    assert elf_platform(info) == Platform(*expected.split("/"))
    assert info.interpreter is None  # busybox-static
    assert info.missing is None


# --- #! lines (fs/binfmt_script.c) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"#!/bin/sh\n", ("/bin/sh", None)),
        (b"#!/bin/sh", ("/bin/sh", None)),
        (b"#! /bin/sh -e\necho", ("/bin/sh", "-e")),
        (b"#!\t/usr/bin/env  python3 -u  \n", ("/usr/bin/env", "python3 -u")),
        (b"#!/bin/sh -e -x\n", ("/bin/sh", "-e -x")),  # one argument, not split
        (b"#!/bin/sh \n", ("/bin/sh", None)),
        (b"#!/bin/sh\0 -e\n", ("/bin/sh", None)),  # NUL ends the interpreter line
        (b"#!/bin/sh -e\0x\n", ("/bin/sh", "-e")),
        (b"#!/bin/sh\r\n", ("/bin/sh\r", None)),  # the kernel keeps CR: a classic pitfall
        (b"#!/bin/sh " + b"a" * 300, ("/bin/sh", "a" * 245)),  # argument cut at 256 bytes
        (b"#!/\xffbin", ("/\udcffbin", None)),
    ],
)
def test_elf_parse_shebang(data: bytes, expected: tuple[str, str | None]) -> None:
    assert parse_shebang(data) == expected


@pytest.mark.parametrize("data", [b"", b"#", b"\x7fELF", b" #!/bin/sh\n", b"echo hi\n"])
def test_elf_parse_shebang_not_a_script(data: bytes) -> None:
    assert parse_shebang(data) is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"#!\n", "names no interpreter"),
        (b"#!   \t \n", "names no interpreter"),
        (b"#!/" + b"x" * 300, "truncates the interpreter path"),
        (b"#!" + b" " * 300, "truncates the interpreter path"),
    ],
)
def test_elf_parse_shebang_refuses_what_the_kernel_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ElfError, match=message):
        parse_shebang(data)
