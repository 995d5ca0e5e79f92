"""Pure. ELF headers (bytes -> :class:`ElfInfo`) mapped to OCI platforms, and ``#!`` lines.

The caller reads the start of a file and hands the bytes to :func:`parse_elf`. The program
headers and the ``PT_INTERP`` string usually lie in the first page; when they do not,
``ElfInfo.missing`` names the file range still needed, and the caller reads it and calls
:func:`parse_elf` again with that range in ``reads`` (at most two rounds: program headers,
then the interpreter string)::

    reads: dict[int, bytes] = {}
    info = parse_elf(head)
    while info.missing is not None:
        offset, size = info.missing
        reads[offset] = pread(fd, size, offset)
        info = parse_elf(head, reads=reads)

References: the System V gABI (ELF header, program header), ``include/uapi/linux/elf.h`` and
``include/uapi/linux/elf-em.h``, the ARM ELF ABI (``e_flags``), the MIPS ABI supplements and
``fs/binfmt_script.c`` for ``#!``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final, Literal

from binfmt.platform import Architecture, Platform
from runtimed.errors import ElfError, UnsupportedPlatformError

ByteOrder = Literal["little", "big"]

# include/uapi/linux/elf.h: e_ident
ELF_MAGIC: Final = b"\x7fELF"
EI_NIDENT: Final = 16
ELFCLASS32: Final = 1
ELFCLASS64: Final = 2
ELFDATA2LSB: Final = 1
ELFDATA2MSB: Final = 2
EV_CURRENT: Final = 1
ELFOSABI_SYSV: Final = 0
ELFOSABI_NETBSD: Final = 2
ELFOSABI_GNU: Final = 3
ELFOSABI_SOLARIS: Final = 6
ELFOSABI_FREEBSD: Final = 9
ELFOSABI_OPENBSD: Final = 12
# include/uapi/linux/elf.h: e_type, p_type
ET_REL: Final = 1
ET_EXEC: Final = 2
ET_DYN: Final = 3
ET_CORE: Final = 4
PT_LOAD: Final = 1
PT_INTERP: Final = 3
PN_XNUM: Final = 0xFFFF
PF_X: Final = 1
PF_W: Final = 2
PF_R: Final = 4

# include/uapi/linux/elf-em.h (EM_MICROBLAZE_OLD from QEMU's binfmt table)
EM_SPARC: Final = 2
EM_386: Final = 3
EM_68K: Final = 4
EM_486: Final = 6
EM_MIPS: Final = 8
EM_PARISC: Final = 15
EM_SPARC32PLUS: Final = 18
EM_PPC: Final = 20
EM_PPC64: Final = 21
EM_S390: Final = 22
EM_ARM: Final = 40
EM_SH: Final = 42
EM_SPARCV9: Final = 43
EM_X86_64: Final = 62
EM_OPENRISC: Final = 92
EM_XTENSA: Final = 94
EM_HEXAGON: Final = 164
EM_AARCH64: Final = 183
EM_MICROBLAZE: Final = 189
EM_RISCV: Final = 243
EM_LOONGARCH: Final = 258
EM_ALPHA: Final = 0x9026
EM_MICROBLAZE_OLD: Final = 0xBAAB

# ARM ELF ABI e_flags: EABI version in the top byte, float ABI bits (EABI v5).
EF_ARM_EABIMASK: Final = 0xFF000000
EF_ARM_ABI_FLOAT_SOFT: Final = 0x200
EF_ARM_ABI_FLOAT_HARD: Final = 0x400
# MIPS e_flags: n32 is a 32-bit ELF class with the ABI2 flag (arch/mips/include/asm/elf.h).
EF_MIPS_ABI2: Final = 0x20

# fs/binfmt_script.c reads the first BINPRM_BUF_SIZE bytes (include/linux/binfmts.h).
BINPRM_BUF_SIZE: Final = 256
# A PT_INTERP longer than PATH_MAX cannot name a file (include/uapi/linux/limits.h).
PATH_MAX: Final = 4096

_HEADER_SIZE: Final[Mapping[int, int]] = {ELFCLASS32: 52, ELFCLASS64: 64}
_PHDR_SIZE: Final[Mapping[int, int]] = {ELFCLASS32: 32, ELFCLASS64: 56}

_OS_BY_OSABI: Final[Mapping[int, str]] = {
    ELFOSABI_NETBSD: "netbsd",
    ELFOSABI_SOLARIS: "solaris",
    ELFOSABI_FREEBSD: "freebsd",
    ELFOSABI_OPENBSD: "openbsd",
}

# (e_machine, ELF class in bits, byte order) -> architecture. Variants and ABIs that e_flags
# decide (arm float ABI, MIPS n32, SPARC v8plus) are handled in elf_platform.
_ARCH_BY_MACHINE: Final[Mapping[tuple[int, int, ByteOrder], Architecture]] = {
    (EM_386, 32, "little"): Architecture.I386,
    (EM_486, 32, "little"): Architecture.I386,
    (EM_X86_64, 64, "little"): Architecture.AMD64,
    (EM_X86_64, 32, "little"): Architecture.AMD64P32,
    (EM_ARM, 32, "little"): Architecture.ARM,
    (EM_ARM, 32, "big"): Architecture.ARMBE,
    (EM_AARCH64, 64, "little"): Architecture.ARM64,
    (EM_AARCH64, 64, "big"): Architecture.ARM64BE,
    (EM_PPC, 32, "big"): Architecture.PPC,
    (EM_PPC64, 64, "big"): Architecture.PPC64,
    (EM_PPC64, 64, "little"): Architecture.PPC64LE,
    (EM_S390, 64, "big"): Architecture.S390X,
    (EM_S390, 32, "big"): Architecture.S390,
    (EM_RISCV, 64, "little"): Architecture.RISCV64,
    (EM_RISCV, 32, "little"): Architecture.RISCV,
    (EM_MIPS, 32, "big"): Architecture.MIPS,
    (EM_MIPS, 32, "little"): Architecture.MIPSLE,
    (EM_MIPS, 64, "big"): Architecture.MIPS64,
    (EM_MIPS, 64, "little"): Architecture.MIPS64LE,
    (EM_LOONGARCH, 64, "little"): Architecture.LOONG64,
    (EM_SPARC, 32, "big"): Architecture.SPARC,
    (EM_SPARC32PLUS, 32, "big"): Architecture.SPARC,
    (EM_SPARCV9, 64, "big"): Architecture.SPARC64,
    (EM_ALPHA, 64, "little"): Architecture.ALPHA,
    (EM_PARISC, 32, "big"): Architecture.HPPA,
    (EM_68K, 32, "big"): Architecture.M68K,
    (EM_SH, 32, "little"): Architecture.SH4,
    (EM_SH, 32, "big"): Architecture.SH4EB,
    (EM_MICROBLAZE, 32, "big"): Architecture.MICROBLAZE,
    (EM_MICROBLAZE, 32, "little"): Architecture.MICROBLAZEEL,
    (EM_MICROBLAZE_OLD, 32, "big"): Architecture.MICROBLAZE,
    (EM_MICROBLAZE_OLD, 32, "little"): Architecture.MICROBLAZEEL,
    (EM_OPENRISC, 32, "big"): Architecture.OR1K,
    (EM_XTENSA, 32, "little"): Architecture.XTENSA,
    (EM_XTENSA, 32, "big"): Architecture.XTENSAEB,
    (EM_HEXAGON, 32, "little"): Architecture.HEXAGON,
}
_N32_TWIN: Final[Mapping[Architecture, Architecture]] = {
    Architecture.MIPS: Architecture.MIPS64P32,
    Architecture.MIPSLE: Architecture.MIPS64P32LE,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ElfInfo:
    """What an ELF header says.

    Attributes:
        elf_class: 32 or 64.
        byte_order: ``"little"`` or ``"big"`` (as ``int.from_bytes`` takes it).
        osabi: ``e_ident[EI_OSABI]`` (0 System V, 3 GNU/Linux, ...).
        abi_version: ``e_ident[EI_ABIVERSION]``.
        type: ``e_type`` (``ET_EXEC``, ``ET_DYN`` for PIE and shared objects, ...).
        machine: ``e_machine`` (``EM_*``).
        flags: ``e_flags``.
        entry: ``e_entry``.
        interpreter: the ``PT_INTERP`` path, None for a static binary (or while ``missing``).
        missing: ``(offset, size)`` of file bytes still needed to find the interpreter.
    """

    elf_class: int
    byte_order: ByteOrder
    osabi: int
    abi_version: int
    type: int
    machine: int
    flags: int
    entry: int
    interpreter: str | None
    missing: tuple[int, int] | None = None


class _File:
    """The bytes known of a file: a prefix plus ranges read elsewhere."""

    def __init__(self, head: bytes, reads: Mapping[int, bytes]) -> None:
        self._head = head
        self._reads = reads

    def get(self, offset: int, size: int) -> bytes | None:
        """The bytes ``[offset, offset + size)`` or None when they were not read yet.

        Raises:
            ElfError: the range was read but the file ended before it did.
        """
        if offset + size <= len(self._head):
            return self._head[offset : offset + size]
        chunk = self._reads.get(offset)
        if chunk is None:
            return None
        if len(chunk) < size:
            raise ElfError(
                f"truncated ELF file: {size} bytes wanted at offset {offset}, {len(chunk)} read",
                details={"offset": offset, "size": size, "read": len(chunk)},
            )
        return chunk[:size]


def _check_ident(head: bytes) -> tuple[int, ByteOrder]:
    if not head.startswith(ELF_MAGIC):
        if len(head) < len(ELF_MAGIC) and ELF_MAGIC.startswith(head):
            raise ElfError(f"truncated ELF file: {len(head)} bytes", details={"size": len(head)})
        raise ElfError(
            f"not an ELF file: starts with {head[:4]!r}, not {ELF_MAGIC!r}",
            details={"magic": head[:4].hex()},
        )
    if len(head) < EI_NIDENT:
        raise ElfError(
            f"truncated ELF identification: {len(head)} of {EI_NIDENT} bytes",
            details={"size": len(head)},
        )
    elf_class, data = head[4], head[5]
    if elf_class not in _HEADER_SIZE:
        raise ElfError(f"invalid ELF class {elf_class}", details={"ei_class": elf_class})
    if data not in (ELFDATA2LSB, ELFDATA2MSB):
        raise ElfError(f"invalid ELF byte order {data}", details={"ei_data": data})
    return elf_class, "little" if data == ELFDATA2LSB else "big"


def parse_elf(head: bytes, *, reads: Mapping[int, bytes] | None = None) -> ElfInfo:
    """Parse the ELF header at the start of a file, and its ``PT_INTERP`` when known.

    Args:
        head: the first bytes of the file (the header needs 52 or 64; a page is typical).
        reads: further ranges of the file by offset, as asked for by ``ElfInfo.missing``.

    Raises:
        ElfError: not an ELF file, truncated, or with inconsistent header fields.
    """
    elf_class, order = _check_ident(head)
    header_size = _HEADER_SIZE[elf_class]
    if len(head) < header_size:
        raise ElfError(
            f"truncated ELF header: {len(head)} of {header_size} bytes",
            details={"size": len(head), "needed": header_size},
        )
    bits = 32 if elf_class == ELFCLASS32 else 64
    word = bits // 8

    def field(offset: int, size: int) -> int:
        return int.from_bytes(head[offset : offset + size], order)

    e_type, e_machine = field(16, 2), field(18, 2)
    entry = field(24, word)
    rest = 24 + word  # e_phoff follows e_entry
    phoff, flags_at = field(rest, word), rest + 2 * word
    flags, phentsize, phnum = field(flags_at, 4), field(flags_at + 6, 2), field(flags_at + 8, 2)
    info = ElfInfo(
        elf_class=bits,
        byte_order=order,
        osabi=head[7],
        abi_version=head[8],
        type=e_type,
        machine=e_machine,
        flags=flags,
        entry=entry,
        interpreter=None,
    )
    if phnum == 0:
        return info
    if phnum == PN_XNUM:
        raise ElfError(
            "ELF with PN_XNUM program headers is not supported", details={"phnum": phnum}
        )
    if phentsize != _PHDR_SIZE[elf_class]:
        raise ElfError(
            f"invalid e_phentsize {phentsize} for ELF{bits} (expected {_PHDR_SIZE[elf_class]})",
            details={"phentsize": phentsize},
        )
    return _with_interpreter(info, _File(head, reads or {}), phoff, phnum, phentsize)


def _with_interpreter(info: ElfInfo, file: _File, phoff: int, phnum: int, size: int) -> ElfInfo:
    table = file.get(phoff, phnum * size)
    if table is None:
        return replace(info, missing=(phoff, phnum * size))
    order = info.byte_order
    word = info.elf_class // 8
    for index in range(phnum):
        phdr = table[index * size : (index + 1) * size]
        if int.from_bytes(phdr[0:4], order) != PT_INTERP:
            continue
        # Elf32_Phdr: type, offset, vaddr, paddr, filesz; Elf64_Phdr: type, flags, offset, ...
        offset_at = 4 if word == 4 else 8
        filesz_at = 16 if word == 4 else 32
        offset = int.from_bytes(phdr[offset_at : offset_at + word], order)
        filesz = int.from_bytes(phdr[filesz_at : filesz_at + word], order)
        if not 0 < filesz <= PATH_MAX:
            raise ElfError(
                f"PT_INTERP of {filesz} bytes (must be 1..{PATH_MAX})", details={"size": filesz}
            )
        raw = file.get(offset, filesz)
        if raw is None:
            return replace(info, missing=(offset, filesz))
        path = raw.split(b"\0", 1)[0]
        if not path:
            raise ElfError("empty PT_INTERP", details={"offset": offset})
        return replace(info, interpreter=_decode(path))
    return info


def elf_platform(info: ElfInfo) -> Platform:
    """The OCI platform an ELF binary is built for, as far as its header tells.

    The OS comes from ``EI_OSABI`` (System V and GNU mean Linux). For 32-bit arm the header
    gives only the float ABI: hard-float EABI is armhf (``arm/v7``, the Debian and OCI
    convention); anything else is armel (``arm/v5``, Debian's ARMv5TE baseline); the exact
    CPU architecture is in ``.ARM.attributes``, not in the header. MIPS n32 is an ELF32 with
    ``EF_MIPS_ABI2`` (``mips64p32``); SPARC v8plus has its own ``e_machine``.

    Raises:
        UnsupportedPlatformError: an ``e_machine``/class/byte-order combination we do not know.
    """
    arch = _ARCH_BY_MACHINE.get((info.machine, info.elf_class, info.byte_order))
    if arch is None:
        raise UnsupportedPlatformError(
            f"unknown ELF machine {info.machine} (ELF{info.elf_class}, {info.byte_order}-endian)",
            details={
                "machine": info.machine,
                "elf_class": info.elf_class,
                "byte_order": info.byte_order,
            },
        )
    os_name = _OS_BY_OSABI.get(info.osabi, "linux")
    variant = ""
    if arch in (Architecture.ARM, Architecture.ARMBE):
        hard = info.flags & EF_ARM_EABIMASK and info.flags & EF_ARM_ABI_FLOAT_HARD
        variant = "v7" if hard else "v5"
    elif arch in _N32_TWIN and info.flags & EF_MIPS_ABI2:
        arch = _N32_TWIN[arch]
    elif info.machine == EM_SPARC32PLUS:
        variant = "v8plus"
    return Platform(os_name, arch.value, variant)


def _next_terminator(line: bytes, start: int) -> int:
    """Index of the first space, tab or NUL at or after ``start``, or -1."""
    for index in range(start, len(line)):
        if line[index] in b" \t\0":
            return index
    return -1


def _skip_blanks(line: bytes, start: int) -> int:
    while start < len(line) and line[start] in b" \t":
        start += 1
    return start


def parse_shebang(data: bytes) -> tuple[str, str | None] | None:
    """The interpreter and optional single argument of a ``#!`` script, as Linux reads them.

    Follows ``fs/binfmt_script.c``: only the first ``BINPRM_BUF_SIZE`` bytes count; the rest
    of the line after the interpreter is one argument (not split on blanks); an interpreter
    path cut off by the buffer end is refused, a cut-off argument is not.

    Returns:
        None when ``data`` does not start with ``#!`` (not a script).

    Raises:
        ElfError: a ``#!`` line without an interpreter, or one whose path is truncated.
    """
    if not data.startswith(b"#!"):
        return None
    buf = data[:BINPRM_BUF_SIZE].ljust(BINPRM_BUF_SIZE, b"\0")
    end = buf.find(b"\n")
    if end == -1:
        # No newline in the buffer: the kernel accepts the line only when the interpreter
        # path ends (blank or NUL) before the last byte of the buffer.
        last = BINPRM_BUF_SIZE - 1
        start = _skip_blanks(buf[:last], 2)
        if start == last or _next_terminator(buf[:last], start) == -1:
            raise ElfError(
                f"#! line longer than {BINPRM_BUF_SIZE} bytes truncates the interpreter path",
                details={"limit": BINPRM_BUF_SIZE},
            )
        end = last
    line = buf[2:end].rstrip(b" \t")
    start = _skip_blanks(line, 0)
    if start == len(line) or line[start] == 0:
        raise ElfError("#! line names no interpreter", details={"line": line.hex()})
    sep = _next_terminator(line, start)
    if sep == -1:
        return _decode(line[start:]), None
    interpreter = _decode(line[start:sep])
    if line[sep] == 0:
        return interpreter, None
    arg = line[_skip_blanks(line, sep) :].split(b"\0", 1)[0]
    return interpreter, (_decode(arg) if arg else None)


def _decode(raw: bytes) -> str:
    # Paths are bytes; surrogateescape keeps them exact, as os.fsdecode does.
    return raw.decode("utf-8", "surrogateescape")
