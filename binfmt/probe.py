"""Pure. Tiny static probe executables, one per architecture, built byte by byte.

A probe is an ELF executable with one ``PT_LOAD`` segment (the whole file, read+execute) whose
entry point is a branch to itself: it runs until killed, touches no memory, makes no system
call and needs no libc, loader or page beyond its own. A runner execs it, reads
``/proc/PID/exe`` (the probe itself when the kernel ran it natively, the QEMU interpreter when
a binfmt_misc handler did), then kills it with SIGKILL.

Encodings of "branch to self" (each ISA's manual):

=========  ======================  ==========================================================
arch       instruction             bytes
=========  ======================  ==========================================================
x86, x64   ``jmp .`` (rel8 -2)     ``eb fe``
aarch64    ``b .`` (imm26 0)       ``0x14000000``
arm (A32)  ``b .`` (imm24 -2)      ``0xeafffffe`` (PC reads 8 bytes ahead)
s390x      ``j .`` (brc 15, 0)     ``a7 f4 00 00``
ppc64      ``b .`` (LI 0)          ``0x48000000``; ELFv1 (big-endian) enters via a
                                   function descriptor, ELFv2 (ppc64le) directly
riscv64    ``j .`` (jal x0, 0)     ``0x0000006f``
mips       ``b .`` (beq $0,$0,-1)  ``0x1000ffff`` then ``nop`` for the delay slot
loong64    ``b .`` (offs26 0)      ``0x50000000``
=========  ======================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from binfmt.elf import (
    EF_ARM_ABI_FLOAT_HARD,
    ELF_MAGIC,
    ELFCLASS32,
    ELFCLASS64,
    ELFDATA2LSB,
    ELFDATA2MSB,
    ELFOSABI_SYSV,
    EM_386,
    EM_AARCH64,
    EM_ARM,
    EM_LOONGARCH,
    EM_MIPS,
    EM_PPC64,
    EM_RISCV,
    EM_S390,
    EM_X86_64,
    ET_EXEC,
    EV_CURRENT,
    PF_R,
    PF_X,
    PT_LOAD,
    ByteOrder,
)
from binfmt.platform import Architecture, Platform, format_platform, is_linux, normalize
from runtimed.errors import UnsupportedPlatformError

# Load address: above mmap_min_addr (64 KiB) and the low pages QEMU's guest base avoids.
LOAD_ADDRESS: Final = 0x400000
PAGE_SIZE: Final = 0x1000
# Code starts at this alignment after the headers (every ISA here needs at most 4 or 8).
_CODE_ALIGN: Final = 16

# ARM ELF ABI: EABI version 5 in the top byte of e_flags.
EF_ARM_EABI_VER5: Final = 0x05000000
# MIPS e_flags (arch/mips/include/asm/elf.h): ISA level, o32 ABI, noreorder.
EF_MIPS_NOREORDER: Final = 0x1
EF_MIPS_ABI_O32: Final = 0x1000
EF_MIPS_ARCH_32R2: Final = 0x70000000
EF_MIPS_ARCH_64R2: Final = 0x80000000
# PowerPC64 ELF ABI version in e_flags (1: function descriptors, 2: direct entry).
EF_PPC64_ABI_V1: Final = 1
EF_PPC64_ABI_V2: Final = 2
# RISC-V: compressed instructions, double-float ABI (Debian's riscv64 lp64d).
EF_RISCV_RVC: Final = 0x1
EF_RISCV_FLOAT_ABI_DOUBLE: Final = 0x4
# LoongArch: double-float ABI, object ABI v1 (Debian's loong64).
EF_LOONGARCH_ABI_DOUBLE_FLOAT: Final = 0x3
EF_LOONGARCH_OBJABI_V1: Final = 0x40


@dataclass(frozen=True, slots=True, kw_only=True)
class _ProbeSpec:
    elf_class: int
    byte_order: ByteOrder
    machine: int
    flags: int
    loop: bytes
    function_descriptor: bool = False


_BRANCH_PPC: Final = 0x48000000
_MIPS_LOOP: Final = (0x1000FFFF, 0x00000000)


def _words(order: ByteOrder, *words: int) -> bytes:
    return b"".join(word.to_bytes(4, order) for word in words)


_SPECS: Final[Mapping[str, _ProbeSpec]] = {
    Architecture.AMD64: _ProbeSpec(
        elf_class=ELFCLASS64, byte_order="little", machine=EM_X86_64, flags=0, loop=b"\xeb\xfe"
    ),
    Architecture.I386: _ProbeSpec(
        elf_class=ELFCLASS32, byte_order="little", machine=EM_386, flags=0, loop=b"\xeb\xfe"
    ),
    Architecture.ARM64: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="little",
        machine=EM_AARCH64,
        flags=0,
        loop=_words("little", 0x14000000),
    ),
    Architecture.ARM: _ProbeSpec(
        elf_class=ELFCLASS32,
        byte_order="little",
        machine=EM_ARM,
        flags=EF_ARM_EABI_VER5 | EF_ARM_ABI_FLOAT_HARD,
        loop=_words("little", 0xEAFFFFFE),
    ),
    Architecture.S390X: _ProbeSpec(
        elf_class=ELFCLASS64, byte_order="big", machine=EM_S390, flags=0, loop=b"\xa7\xf4\0\0"
    ),
    Architecture.PPC64LE: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="little",
        machine=EM_PPC64,
        flags=EF_PPC64_ABI_V2,
        loop=_words("little", _BRANCH_PPC),
    ),
    Architecture.PPC64: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="big",
        machine=EM_PPC64,
        flags=EF_PPC64_ABI_V1,
        loop=_words("big", _BRANCH_PPC),
        function_descriptor=True,
    ),
    Architecture.RISCV64: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="little",
        machine=EM_RISCV,
        flags=EF_RISCV_RVC | EF_RISCV_FLOAT_ABI_DOUBLE,
        loop=_words("little", 0x0000006F),
    ),
    Architecture.MIPS64LE: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="little",
        machine=EM_MIPS,
        flags=EF_MIPS_ARCH_64R2 | EF_MIPS_NOREORDER,
        loop=_words("little", *_MIPS_LOOP),
    ),
    Architecture.MIPS64: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="big",
        machine=EM_MIPS,
        flags=EF_MIPS_ARCH_64R2 | EF_MIPS_NOREORDER,
        loop=_words("big", *_MIPS_LOOP),
    ),
    Architecture.MIPSLE: _ProbeSpec(
        elf_class=ELFCLASS32,
        byte_order="little",
        machine=EM_MIPS,
        flags=EF_MIPS_ARCH_32R2 | EF_MIPS_ABI_O32 | EF_MIPS_NOREORDER,
        loop=_words("little", *_MIPS_LOOP),
    ),
    Architecture.MIPS: _ProbeSpec(
        elf_class=ELFCLASS32,
        byte_order="big",
        machine=EM_MIPS,
        flags=EF_MIPS_ARCH_32R2 | EF_MIPS_ABI_O32 | EF_MIPS_NOREORDER,
        loop=_words("big", *_MIPS_LOOP),
    ),
    Architecture.LOONG64: _ProbeSpec(
        elf_class=ELFCLASS64,
        byte_order="little",
        machine=EM_LOONGARCH,
        flags=EF_LOONGARCH_ABI_DOUBLE_FLOAT | EF_LOONGARCH_OBJABI_V1,
        loop=_words("little", 0x50000000),
    ),
}

# The platforms a probe exists for, normalised (arm is arm/v7).
PROBE_PLATFORMS: Final = tuple(normalize(Platform("linux", arch)) for arch in _SPECS)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _build(spec: _ProbeSpec) -> bytes:
    order = spec.byte_order
    is64 = spec.elf_class == ELFCLASS64
    word = 8 if is64 else 4
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    code_at = _align(ehsize + phentsize, _CODE_ALIGN)
    body = spec.loop
    entry = LOAD_ADDRESS + code_at
    if spec.function_descriptor:
        # ELFv1: e_entry points at a descriptor (code address, TOC, environment).
        descriptor_at = _align(code_at + len(body), word)
        body = body.ljust(descriptor_at - code_at, b"\0")
        body += b"".join(v.to_bytes(8, order) for v in (LOAD_ADDRESS + code_at, 0, 0))
        entry = LOAD_ADDRESS + descriptor_at
    size = code_at + len(body)

    def half(v: int) -> bytes:
        return v.to_bytes(2, order)

    def u32(v: int) -> bytes:
        return v.to_bytes(4, order)

    def addr(v: int) -> bytes:
        return v.to_bytes(word, order)

    data = ELFDATA2LSB if order == "little" else ELFDATA2MSB
    ident = ELF_MAGIC + bytes([spec.elf_class, data, EV_CURRENT, ELFOSABI_SYSV]) + bytes(8)
    header = (
        ident
        + half(ET_EXEC)
        + half(spec.machine)
        + u32(EV_CURRENT)
        + addr(entry)
        + addr(ehsize)  # e_phoff: the program header follows the ELF header
        + addr(0)  # e_shoff: no sections
        + u32(spec.flags)
        + half(ehsize)
        + half(phentsize)
        + half(1)  # e_phnum
        + half(0)  # e_shentsize
        + half(0)  # e_shnum
        + half(0)  # e_shstrndx
    )
    flags = PF_R | PF_X
    if is64:  # Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, memsz, align
        phdr = u32(PT_LOAD) + u32(flags) + addr(0) + addr(LOAD_ADDRESS) + addr(LOAD_ADDRESS)
        phdr += addr(size) + addr(size) + addr(PAGE_SIZE)
    else:  # Elf32_Phdr: type, offset, vaddr, paddr, filesz, memsz, flags, align
        phdr = u32(PT_LOAD) + addr(0) + addr(LOAD_ADDRESS) + addr(LOAD_ADDRESS)
        phdr += addr(size) + addr(size) + u32(flags) + addr(PAGE_SIZE)
    head = header + phdr
    return head + bytes(code_at - len(head)) + body


def probe_image(platform: Platform) -> bytes:
    """The probe executable for ``platform`` (by architecture; arm is EABI5 hard-float).

    Raises:
        UnsupportedPlatformError: not Linux, or no probe for that architecture.
    """
    p = normalize(platform)
    spec = _SPECS.get(p.architecture)
    if not is_linux(p) or spec is None:
        raise UnsupportedPlatformError(
            f"no probe executable for {format_platform(p)}",
            details={"platform": format_platform(p)},
            hint="probes exist for " + ", ".join(map(format_platform, PROBE_PLATFORMS)),
        )
    return _build(spec)
