"""Pure. What a binfmt_misc entry claims: which QEMU targets' executables its magic and mask
match, whether it misses PIE executables, and which CPU its interpreter emulates.

An entry is judged by matching it the way the kernel does (:meth:`BinfmtEntry.matches`)
against sample ELF headers of each target: its ``ET_EXEC`` header and the same header as
``ET_DYN`` (what PIE executables are). So an entry written by hand, by systemd-binfmt or by
another tool is understood as well as ours.
"""

from __future__ import annotations

import re
from typing import Final

from binfmt.elf import ELFDATA2MSB, ET_DYN, ET_EXEC
from binfmt.entry import BinfmtEntry
from binfmt.platform import Platform, normalize
from binfmt.qemu import QEMU_TARGETS, QemuTarget

# System V gABI: e_type is the half-word at offset 16, in the byte order of e_ident[EI_DATA].
_E_TYPE_OFFSET: Final = 16
_EI_DATA: Final = 5
# Samples are zero-padded so that entries looking beyond the target's magic (e_flags) can match.
_SAMPLE_LENGTH: Final = 64

# qemu-<cpu>, qemu-<cpu>-static (Debian, Fedora) and Debian's <cpu>-binfmt-P wrapper name.
_INTERPRETER_RE: Final = re.compile(
    r"(?:qemu-(?P<a>[A-Za-z0-9_]+?)(?:-static)?|(?P<b>[A-Za-z0-9_]+)-binfmt-P)"
)


def sample_header(target: QemuTarget, e_type: int) -> bytes:
    """An ELF header prefix of ``target`` with type ``e_type``: its magic (a real header's
    bytes, masked or not), zero-padded, with ``e_type`` set."""
    head = bytearray(target.magic)
    head.extend(bytes(_SAMPLE_LENGTH - len(head)))
    big = head[_EI_DATA] == ELFDATA2MSB
    head[_E_TYPE_OFFSET : _E_TYPE_OFFSET + 2] = e_type.to_bytes(2, "big" if big else "little")
    return bytes(head)


def claimed_targets(entry: BinfmtEntry) -> tuple[QemuTarget, ...]:
    """The QEMU targets whose (non-PIE) executables ``entry`` matches."""
    return tuple(t for t in QEMU_TARGETS if entry.matches(sample_header(t, ET_EXEC)))


def claimed_platforms(entry: BinfmtEntry) -> frozenset[Platform]:
    """The normalised platforms of :func:`claimed_targets`."""
    return frozenset(normalize(t.platform) for t in claimed_targets(entry))


def misses_pie(entry: BinfmtEntry, target: QemuTarget) -> bool:
    """Whether ``entry`` matches ``target``'s ET_EXEC executables but not its PIE (ET_DYN) ones."""
    return entry.matches(sample_header(target, ET_EXEC)) and not entry.matches(
        sample_header(target, ET_DYN)
    )


def interpreter_cpu(interpreter: str) -> str | None:
    """The QEMU CPU name an interpreter path names (``/usr/bin/qemu-aarch64-static`` ->
    ``aarch64``), or None for a name that does not follow QEMU's conventions."""
    name = interpreter.rpartition("/")[2]
    found = _INTERPRETER_RE.fullmatch(name)
    if found is None:
        return None
    return found.group("a") or found.group("b")
