"""Pure. The QEMU user-mode targets: the binfmt_misc magic and mask of each, its ELF machine and
OCI platform, and where its interpreter is usually installed.

The magic/mask table is the data of QEMU's ``scripts/qemu-binfmt-conf.sh`` (current upstream,
every target it lists). Laid out as ``e_ident[0:4] class/data/version osabi abiversion+pad
e_type e_machine [e_version e_entry..e_flags]``, masks show what matches:

- ``EI_OSABI`` is masked out (``00``; ``fc`` for loongarch64), so GNU/Linux (3) binaries match
  as well as System V (0) ones;
- the low bit of ``e_type`` is masked out (``fe``), so ``ET_DYN`` (PIE) matches as well as
  ``ET_EXEC``;
- MIPS o32 and n32 differ only in ``EF_MIPS_ABI2`` (``0x20``) of ``e_flags``; ppc64le ignores
  the high byte of ``e_machine``.

One deliberate fix: upstream's microblaze (big-endian) entry writes ``e_type`` in little-endian
byte order (``02 00``), so no big-endian executable matches it; here it is ``00 02`` with the
big-endian mask, as Debian's qemu-user-static ships it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from binfmt.elf import (
    EM_68K,
    EM_386,
    EM_486,
    EM_AARCH64,
    EM_ALPHA,
    EM_ARM,
    EM_HEXAGON,
    EM_LOONGARCH,
    EM_MICROBLAZE_OLD,
    EM_MIPS,
    EM_OPENRISC,
    EM_PARISC,
    EM_PPC,
    EM_PPC64,
    EM_RISCV,
    EM_S390,
    EM_SH,
    EM_SPARC,
    EM_SPARC32PLUS,
    EM_SPARCV9,
    EM_X86_64,
    EM_XTENSA,
)
from binfmt.entry import magic_matches
from binfmt.platform import Platform, format_platform, is_linux, normalize
from runtimed.errors import UnsupportedPlatformError


@dataclass(frozen=True, slots=True, kw_only=True)
class QemuTarget:
    """One binfmt_misc rule of QEMU user mode.

    Attributes:
        name: the target's name in qemu-binfmt-conf.sh (unique; ``i486`` is a second rule
            for ``qemu-i386``).
        cpu: the ``qemu-<cpu>`` interpreter that runs it.
        platform: the OCI platform it emulates (normalised; for arm any variant).
        machine: the ELF ``e_machine`` its magic claims.
        magic: the bytes at offset 0 to match.
        mask: which bits of ``magic`` count, as long as ``magic``.
    """

    name: str
    cpu: str
    platform: Platform
    machine: int
    magic: bytes
    mask: bytes

    def matches(self, data: bytes) -> bool:
        """Whether the kernel would hand a file starting with ``data`` to this rule."""
        return magic_matches(data, offset=0, magic=self.magic, mask=self.mask)


def _target(
    name: str, machine: int, platform: str, magic: str, mask: str, *, cpu: str | None = None
) -> QemuTarget:
    return QemuTarget(
        name=name,
        cpu=cpu or name,
        platform=Platform(*platform.split("/")),
        machine=machine,
        magic=bytes.fromhex(magic),
        mask=bytes.fromhex(mask),
    )


# fmt: off
QEMU_TARGETS: Final = (
    _target("i386", EM_386, "linux/386",
        "7f454c46 010101 00 0000000000000000 0200 0300",
        "ffffffff fffefe 00 ffffffffffffffff feff ffff"),
    _target("i486", EM_486, "linux/386",
        "7f454c46 010101 00 0000000000000000 0200 0600",
        "ffffffff fffefe 00 ffffffffffffffff feff ffff", cpu="i386"),
    _target("alpha", EM_ALPHA, "linux/alpha",
        "7f454c46 020101 00 0000000000000000 0200 2690",
        "ffffffff fffefe 00 ffffffffffffffff feff ffff"),
    _target("arm", EM_ARM, "linux/arm/v7",
        "7f454c46 010101 00 0000000000000000 0200 2800",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("armeb", EM_ARM, "linux/armbe",
        "7f454c46 010201 00 0000000000000000 0002 0028",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("sparc", EM_SPARC, "linux/sparc",
        "7f454c46 010201 00 0000000000000000 0002 0002",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("sparc32plus", EM_SPARC32PLUS, "linux/sparc/v8plus",
        "7f454c46 010201 00 0000000000000000 0002 0012",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("sparc64", EM_SPARCV9, "linux/sparc64",
        "7f454c46 020201 00 0000000000000000 0002 002b",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("ppc", EM_PPC, "linux/ppc",
        "7f454c46 010201 00 0000000000000000 0002 0014",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("ppc64", EM_PPC64, "linux/ppc64",
        "7f454c46 020201 00 0000000000000000 0002 0015",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("ppc64le", EM_PPC64, "linux/ppc64le",
        "7f454c46 020101 00 0000000000000000 0200 1500",
        "ffffffff ffffff 00 ffffffffffffffff feff ff00"),
    _target("m68k", EM_68K, "linux/m68k",
        "7f454c46 010201 00 0000000000000000 0002 0004",
        "ffffffff fffffe 00 ffffffffffffffff fffe ffff"),
    _target("mips", EM_MIPS, "linux/mips",
        "7f454c46 010201 00 0000000000000000 0002 0008 00000001 00000000000000000000000000000000",
        "ffffffff ffffff 00 00ffffffffffffff fffe ffff ffffffff 00000000000000000000000000000020"),
    _target("mipsel", EM_MIPS, "linux/mipsle",
        "7f454c46 010101 00 0000000000000000 0200 0800 01000000 00000000000000000000000000000000",
        "ffffffff ffffff 00 00ffffffffffffff feff ffff ffffffff 00000000000000000000000020000000"),
    _target("mipsn32", EM_MIPS, "linux/mips64p32",
        "7f454c46 010201 00 0000000000000000 0002 0008 00000001 00000000000000000000000000000020",
        "ffffffff ffffff 00 00ffffffffffffff fffe ffff ffffffff 00000000000000000000000000000020"),
    _target("mipsn32el", EM_MIPS, "linux/mips64p32le",
        "7f454c46 010101 00 0000000000000000 0200 0800 01000000 00000000000000000000000020000000",
        "ffffffff ffffff 00 00ffffffffffffff feff ffff ffffffff 00000000000000000000000020000000"),
    _target("mips64", EM_MIPS, "linux/mips64",
        "7f454c46 020201 00 0000000000000000 0002 0008",
        "ffffffff ffffff 00 00ffffffffffffff fffe ffff"),
    _target("mips64el", EM_MIPS, "linux/mips64le",
        "7f454c46 020101 00 0000000000000000 0200 0800",
        "ffffffff ffffff 00 00ffffffffffffff feff ffff"),
    _target("sh4", EM_SH, "linux/sh4",
        "7f454c46 010101 00 0000000000000000 0200 2a00",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("sh4eb", EM_SH, "linux/sh4eb",
        "7f454c46 010201 00 0000000000000000 0002 002a",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("s390x", EM_S390, "linux/s390x",
        "7f454c46 020201 00 0000000000000000 0002 0016",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("aarch64", EM_AARCH64, "linux/arm64",
        "7f454c46 020101 00 0000000000000000 0200 b700",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("aarch64_be", EM_AARCH64, "linux/arm64be",
        "7f454c46 020201 00 0000000000000000 0002 00b7",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("hppa", EM_PARISC, "linux/hppa",
        "7f454c46 010201 00 0000000000000000 0002 000f",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("riscv32", EM_RISCV, "linux/riscv",
        "7f454c46 010101 00 0000000000000000 0200 f300",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("riscv64", EM_RISCV, "linux/riscv64",
        "7f454c46 020101 00 0000000000000000 0200 f300",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("xtensa", EM_XTENSA, "linux/xtensa",
        "7f454c46 010101 00 0000000000000000 0200 5e00",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("xtensaeb", EM_XTENSA, "linux/xtensaeb",
        "7f454c46 010201 00 0000000000000000 0002 005e",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("microblaze", EM_MICROBLAZE_OLD, "linux/microblaze",
        "7f454c46 010201 00 0000000000000000 0002 baab",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("microblazeel", EM_MICROBLAZE_OLD, "linux/microblazeel",
        "7f454c46 010101 00 0000000000000000 0200 abba",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("or1k", EM_OPENRISC, "linux/or1k",
        "7f454c46 010201 00 0000000000000000 0002 005c",
        "ffffffff ffffff 00 ffffffffffffffff fffe ffff"),
    _target("x86_64", EM_X86_64, "linux/amd64",
        "7f454c46 020101 00 0000000000000000 0200 3e00",
        "ffffffff fffefe 00 ffffffffffffffff feff ffff"),
    _target("hexagon", EM_HEXAGON, "linux/hexagon",
        "7f454c46 010101 00 0000000000000000 0200 a400",
        "ffffffff ffffff 00 ffffffffffffffff feff ffff"),
    _target("loongarch64", EM_LOONGARCH, "linux/loong64",
        "7f454c46 020101 00 0000000000000000 0200 0201",
        "ffffffff ffffff fc 00ffffffffffffff feff ffff"),
)
# fmt: on


def targets_for_platform(platform: Platform) -> tuple[QemuTarget, ...]:
    """Every rule QEMU registers for ``platform`` (linux/386 has two: i386 and i486), best
    first: those naming the exact variant, then those of the same architecture.

    Raises:
        UnsupportedPlatformError: not Linux, or an architecture QEMU user mode does not run.
    """
    p = normalize(platform)
    if not is_linux(p):
        raise UnsupportedPlatformError(
            f"QEMU user mode runs Linux binaries only, not {format_platform(p)}",
            details={"platform": format_platform(p)},
        )
    same = [t for t in QEMU_TARGETS if t.platform.architecture == p.architecture]
    exact = tuple(t for t in same if t.platform.variant == p.variant)
    if exact:
        return exact
    if not same:
        raise UnsupportedPlatformError(
            f"no QEMU user-mode emulator for {format_platform(p)}",
            details={"platform": format_platform(p)},
            hint="see QEMU_TARGETS for the architectures QEMU emulates",
        )
    return (same[0],)


def target_for_platform(platform: Platform) -> QemuTarget:
    """The QEMU target that runs ``platform`` (any arm variant is qemu-arm, amd64/v3 is
    qemu-x86_64, sparc/v8plus is qemu-sparc32plus).

    Raises:
        UnsupportedPlatformError: not Linux, or an architecture QEMU user mode does not run.
    """
    return targets_for_platform(platform)[0]


def interpreter_candidates(target: QemuTarget) -> tuple[str, ...]:
    """Where the interpreter for ``target`` is usually installed, preferred first: the static
    binary (works in any root with the F flag), Debian's preserve-argv0 wrapper, the dynamic
    binary. Only paths: whether they exist and are static is for the IO layer to check."""
    return (
        f"/usr/bin/qemu-{target.cpu}-static",
        f"/usr/libexec/qemu-binfmt/{target.cpu}-binfmt-P",
        f"/usr/bin/qemu-{target.cpu}",
    )
