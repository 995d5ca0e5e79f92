"""QEMU targets: each magic/mask claims its own machine's executables (ET_EXEC and PIE, System V
and GNU OS ABI) and nobody else's; platform lookup; interpreter paths."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from binfmt.elf import EM_ARM, EM_MIPS, elf_platform, parse_elf
from binfmt.platform import Platform
from binfmt.qemu import (
    QEMU_TARGETS,
    QemuTarget,
    interpreter_candidates,
    target_for_platform,
    targets_for_platform,
)
from runtimed.errors import UnsupportedPlatformError
from tests.support import busybox, require
from tests.unit.binfmt.elfbuild import ET_DYN, ET_EXEC, elf_header

BY_NAME = {t.name: t for t in QEMU_TARGETS}
ELFOSABI_SYSV, ELFOSABI_GNU = 0, 3


def header_for(target: QemuTarget, *, e_type: int, osabi: int) -> bytes:
    """A header built for the target's machine, class and byte order (independently of its
    magic), with the e_flags that tell its ABI apart."""
    bits: Literal[32, 64] = 32 if target.magic[4] == 1 else 64
    order: Literal["little", "big"] = "little" if target.magic[5] == 1 else "big"
    flags = 0
    if target.machine == EM_ARM:
        flags = 0x05000400  # EABI5, hard float
    elif target.machine == EM_MIPS and target.name.startswith("mipsn32"):
        flags = 0x20  # EF_MIPS_ABI2
    return elf_header(
        machine=target.machine, bits=bits, order=order, e_type=e_type, osabi=osabi, flags=flags
    )


def test_qemu_table_is_well_formed() -> None:
    assert len(BY_NAME) == len(QEMU_TARGETS) == 34
    for t in QEMU_TARGETS:
        assert len(t.magic) == len(t.mask), t.name
        assert t.magic[:4] == b"\x7fELF", t.name
        assert t.platform.os == "linux"


@pytest.mark.parametrize("target", QEMU_TARGETS, ids=lambda t: t.name)
@pytest.mark.parametrize("e_type", [ET_EXEC, ET_DYN], ids=["exec", "pie"])
@pytest.mark.parametrize("osabi", [ELFOSABI_SYSV, ELFOSABI_GNU], ids=["sysv", "gnu"])
def test_qemu_magic_claims_its_machine_and_no_other(
    target: QemuTarget, e_type: int, osabi: int
) -> None:
    header = header_for(target, e_type=e_type, osabi=osabi)
    assert target.matches(header)
    others = [t.name for t in QEMU_TARGETS if t is not target and t.matches(header)]
    assert others == []
    # and the ELF parser agrees on which platform that header is
    assert target in targets_for_platform(elf_platform(parse_elf(header)))


@pytest.mark.parametrize(
    ("target", "e_flags", "claimed_by"),
    [("mips", 0x20, "mipsn32"), ("mipsel", 0x20, "mipsn32el"), ("mipsn32", 0, "mips")],
)
def test_qemu_mips_abi_flag_decides_o32_or_n32(target: str, e_flags: int, claimed_by: str) -> None:
    t = BY_NAME[target]
    order: Literal["little", "big"] = "little" if t.magic[5] == 1 else "big"
    header = elf_header(machine=EM_MIPS, bits=32, order=order, flags=e_flags)
    assert [x.name for x in QEMU_TARGETS if x.matches(header)] == [claimed_by]


@pytest.mark.parametrize(
    ("debian_arch", "name"),
    [
        ("amd64", "x86_64"),
        ("arm64", "aarch64"),
        ("armhf", "arm"),
        ("s390x", "s390x"),
        ("ppc64el", "ppc64le"),
    ],
)
def test_qemu_busybox_fixture_matches_its_target_only(debian_arch: str, name: str) -> None:
    with busybox(debian_arch).open("rb") as f:
        head = f.read(256)
    assert [t.name for t in QEMU_TARGETS if t.matches(head)] == [name]


@pytest.mark.parametrize(
    ("platform", "name"),
    [
        (Platform("linux", "arm64"), "aarch64"),
        (Platform("linux", "arm64", "v9"), "aarch64"),
        (Platform("linux", "arm", "v6"), "arm"),
        (Platform("linux", "armhf"), "arm"),
        (Platform("linux", "amd64", "v3"), "x86_64"),
        (Platform("linux", "386"), "i386"),
        (Platform("linux", "ppc64le"), "ppc64le"),
        (Platform("linux", "ppc64"), "ppc64"),
        (Platform("linux", "s390x"), "s390x"),
        (Platform("linux", "riscv64"), "riscv64"),
        (Platform("linux", "mips64le"), "mips64el"),
        (Platform("linux", "mipsle"), "mipsel"),
        (Platform("linux", "loong64"), "loongarch64"),
        (Platform("linux", "sparc"), "sparc"),
        (Platform("linux", "sparc", "v8plus"), "sparc32plus"),
        (Platform("Linux", "aarch64_be"), "aarch64_be"),
    ],
)
def test_qemu_target_for_platform(platform: Platform, name: str) -> None:
    assert target_for_platform(platform).name == name


def test_qemu_386_has_two_rules_for_one_interpreter() -> None:
    rules = targets_for_platform(Platform("linux", "386"))
    assert [t.name for t in rules] == ["i386", "i486"]
    assert {t.cpu for t in rules} == {"i386"}


@pytest.mark.parametrize(
    ("platform", "message"),
    [
        (Platform("windows", "amd64"), "Linux binaries only"),
        (Platform("darwin", "arm64"), "Linux binaries only"),
        (Platform("linux", "wasm"), "no QEMU user-mode emulator"),
        (Platform("linux", "s390"), "no QEMU user-mode emulator"),
    ],
)
def test_qemu_target_for_platform_unsupported(platform: Platform, message: str) -> None:
    with pytest.raises(UnsupportedPlatformError, match=message) as info:
        target_for_platform(platform)
    assert info.value.code == "platform.UnsupportedPlatform"


def test_qemu_interpreter_candidates_in_preference_order() -> None:
    assert interpreter_candidates(BY_NAME["aarch64"]) == (
        "/usr/bin/qemu-aarch64-static",
        "/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
        "/usr/bin/qemu-aarch64",
    )
    assert interpreter_candidates(BY_NAME["i486"])[0] == "/usr/bin/qemu-i386-static"


def test_qemu_every_cpu_names_an_installed_static_emulator() -> None:
    require(
        Path("/usr/bin/qemu-aarch64-static").exists(),
        "qemu-user-static is not installed (scripts/setup installs it)",
    )
    missing = [t.cpu for t in QEMU_TARGETS if not Path(interpreter_candidates(t)[0]).exists()]
    assert missing == []
