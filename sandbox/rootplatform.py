"""Pure. Decide the platform of a root filesystem that carries none (a tarball, a directory)
from the ELF headers of the binaries every root has.

The IO side (``sandbox.store``) reads the first bytes of each candidate, resolving symlinks
inside the root only, and hands them here in the order of :func:`candidate_paths`. The first
candidate that is an ELF binary we know decides, and the reason names it ("detected from
/bin/busybox"), so the user can tell why and override it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from binfmt.elf import elf_platform, parse_elf
from binfmt.platform import Platform, normalize
from runtimed.errors import ElfError, UnsupportedPlatformError

# What a Linux root nearly always has, most telling first: the shell (often busybox itself),
# then binaries that are ELF even where /bin/sh is a script wrapper.
SHELL_CANDIDATES: Final = (
    "bin/busybox",
    "bin/sh",
    "usr/bin/busybox",
    "usr/bin/sh",
    "bin/bash",
    "usr/bin/bash",
    "usr/bin/env",
    "bin/ls",
    "usr/bin/ls",
    "sbin/init",
    "usr/sbin/init",
)
# Directories holding the dynamic loader (ld-linux-*.so.*, ld64.so.*, ld-musl-*.so.1).
LOADER_DIRS: Final = ("lib", "lib64", "lib32", "usr/lib", "usr/lib64")
# Enough for the ELF header; the platform needs nothing beyond it.
HEAD_BYTES: Final = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectedPlatform:
    platform: Platform
    reason: str


def is_loader_name(name: str) -> bool:
    """Whether a file name in one of :data:`LOADER_DIRS` looks like a dynamic loader."""
    return (name.startswith("ld-") or name.startswith("ld64.")) and ".so" in name


def candidate_paths(loader_names: Iterable[tuple[str, str]]) -> list[str]:
    """Every path to try, in order: the shells, then the loaders found.

    Args:
        loader_names: ``(directory, name)`` pairs listed from :data:`LOADER_DIRS`.
    """
    loaders = sorted(f"{d}/{n}" for d, n in loader_names if is_loader_name(n))
    return [*SHELL_CANDIDATES, *loaders]


def detect_platform(heads: Sequence[tuple[str, bytes]]) -> DetectedPlatform | None:
    """The platform of the first candidate that is an ELF binary of a known machine.

    Args:
        heads: ``(path relative to the root, first bytes of the file)`` in candidate order.

    Returns:
        None when no candidate is such a binary (the caller asks for ``--platform``).
    """
    for path, head in heads:
        try:
            platform = normalize(elf_platform(parse_elf(head)))
        except (ElfError, UnsupportedPlatformError):
            continue
        return DetectedPlatform(platform=platform, reason=f"detected from /{path}")
    return None
