"""Probe images: valid ELF for their platform, claimed by their QEMU rule only, tiny."""

from __future__ import annotations

import pytest

from binfmt.elf import ET_EXEC, elf_platform, parse_elf
from binfmt.platform import Platform, normalize
from binfmt.probe import LOAD_ADDRESS, PROBE_PLATFORMS, probe_image
from binfmt.qemu import QEMU_TARGETS, target_for_platform
from runtimed.errors import UnsupportedPlatformError

REQUIRED = [
    "linux/amd64",
    "linux/386",
    "linux/arm64",
    "linux/arm/v7",
    "linux/s390x",
    "linux/ppc64le",
    "linux/ppc64",
    "linux/riscv64",
    "linux/mips64le",
    "linux/mipsle",
    "linux/loong64",
]


def test_probe_covers_the_required_architectures() -> None:
    assert set(REQUIRED) <= {str(p) for p in PROBE_PLATFORMS}


@pytest.mark.parametrize("platform", PROBE_PLATFORMS, ids=str)
def test_probe_image_is_an_executable_of_its_platform(platform: Platform) -> None:
    image = probe_image(platform)
    info = parse_elf(image)
    assert elf_platform(info) == platform
    assert info.type == ET_EXEC
    assert info.interpreter is None
    assert info.missing is None
    # the entry point lies inside the one segment, which is the whole file
    assert LOAD_ADDRESS < info.entry < LOAD_ADDRESS + len(image)
    assert len(image) <= 256


@pytest.mark.parametrize("platform", PROBE_PLATFORMS, ids=str)
def test_probe_image_is_claimed_by_its_qemu_rule_only(platform: Platform) -> None:
    image = probe_image(platform)
    assert [t.name for t in QEMU_TARGETS if t.matches(image)] == [
        target_for_platform(platform).name
    ]


@pytest.mark.parametrize(
    ("platform", "loop"),
    [
        ("linux/amd64", b"\xeb\xfe"),
        ("linux/386", b"\xeb\xfe"),
        ("linux/arm64", bytes.fromhex("00000014")),
        ("linux/arm/v7", bytes.fromhex("feffffea")),
        ("linux/s390x", bytes.fromhex("a7f40000")),
        ("linux/ppc64le", bytes.fromhex("00000048")),
        ("linux/riscv64", bytes.fromhex("6f000000")),
        ("linux/mips64le", bytes.fromhex("ffff0010 00000000")),
        ("linux/mipsle", bytes.fromhex("ffff0010 00000000")),
        ("linux/loong64", bytes.fromhex("00000050")),
    ],
)
def test_probe_entry_is_a_branch_to_itself(platform: str, loop: bytes) -> None:
    image = probe_image(normalize(Platform(*platform.split("/"))))
    entry_offset = parse_elf(image).entry - LOAD_ADDRESS
    assert image[entry_offset : entry_offset + len(loop)] == loop


def test_probe_ppc64_elfv1_enters_through_a_function_descriptor() -> None:
    image = probe_image(Platform("linux", "ppc64"))
    info = parse_elf(image)
    assert info.flags == 1  # ELFv1
    descriptor = info.entry - LOAD_ADDRESS
    code = int.from_bytes(image[descriptor : descriptor + 8], "big") - LOAD_ADDRESS
    assert image[code : code + 4] == bytes.fromhex("48000000")


def test_probe_any_arm_variant_gets_the_arm_probe() -> None:
    assert probe_image(Platform("linux", "arm", "v5")) == probe_image(Platform("linux", "armhf"))


@pytest.mark.parametrize(
    "platform", [Platform("windows", "amd64"), Platform("linux", "sparc64"), Platform("linux", "x")]
)
def test_probe_unsupported_platform(platform: Platform) -> None:
    with pytest.raises(UnsupportedPlatformError, match="no probe executable"):
        probe_image(platform)
