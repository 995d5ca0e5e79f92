"""Pure: platform detection of a root filesystem from ELF headers (sandbox.rootplatform)."""

from __future__ import annotations

import struct

import pytest

from binfmt.platform import Platform
from sandbox import rootplatform

EM_X86_64, EM_AARCH64, EM_ARM = 62, 183, 40
EF_ARM_EABI5_HARD = 0x05000400


def _elf(machine: int, *, bits: int = 64, flags: int = 0) -> bytes:
    """A minimal little-endian ELF header without program headers."""
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1, 1, 0]) + bytes(8)
    if bits == 64:
        rest = struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, 0, 0, 0, flags, 64, 56, 0, 64, 0, 0)
    else:
        rest = struct.pack("<HHIIIIIHHHHHH", 2, machine, 1, 0, 0, 0, flags, 52, 32, 0, 40, 0, 0)
    return ident + rest


@pytest.mark.parametrize(
    ("heads", "platform", "reason"),
    [
        ([("bin/busybox", _elf(EM_AARCH64))], Platform("linux", "arm64"), "/bin/busybox"),
        (
            [("bin/sh", b"#!/bin/bash\n"), ("usr/bin/env", _elf(EM_X86_64))],
            Platform("linux", "amd64"),
            "/usr/bin/env",
        ),
        (
            [
                ("bin/sh", b"garbage"),
                ("lib/ld-linux-armhf.so.3", _elf(EM_ARM, bits=32, flags=EF_ARM_EABI5_HARD)),
            ],
            Platform("linux", "arm", "v7"),
            "/lib/ld-linux-armhf.so.3",
        ),
        ([("bin/sh", _elf(0x7FFF))], None, ""),
        ([], None, ""),
    ],
)
def test_detect_platform_takes_the_first_known_elf(
    heads: list[tuple[str, bytes]], platform: Platform | None, reason: str
) -> None:
    detected = rootplatform.detect_platform(heads)
    if platform is None:
        assert detected is None
    else:
        assert detected is not None
        assert detected.platform == platform
        assert detected.reason == f"detected from {reason}"


def test_candidate_paths_put_shells_before_loaders() -> None:
    paths = rootplatform.candidate_paths(
        [("lib64", "ld-linux-x86-64.so.2"), ("lib", "libc.so.6"), ("lib", "ld-musl-x86_64.so.1")]
    )
    assert paths[0] == "bin/busybox"
    assert paths[-2:] == ["lib/ld-musl-x86_64.so.1", "lib64/ld-linux-x86-64.so.2"]
    assert "lib/libc.so.6" not in paths
