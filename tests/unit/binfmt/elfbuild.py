"""Test helper: ELF headers built byte by byte with struct, independent of binfmt's own code.

Layouts from the System V gABI: Elf32_Ehdr is 52 bytes, Elf64_Ehdr 64; Elf32_Phdr 32 bytes
(type, offset, vaddr, paddr, filesz, memsz, flags, align), Elf64_Phdr 56 (type, flags, offset,
vaddr, paddr, filesz, memsz, align).
"""

from __future__ import annotations

import struct
from typing import Literal

ET_EXEC = 2
ET_DYN = 3
PT_LOAD = 1
PT_INTERP = 3


def elf_header(
    *,
    machine: int,
    bits: Literal[32, 64] = 64,
    order: Literal["little", "big"] = "little",
    osabi: int = 0,
    abi_version: int = 0,
    e_type: int = ET_EXEC,
    flags: int = 0,
    entry: int = 0x401000,
    phoff: int | None = None,
    phnum: int = 0,
    phentsize: int | None = None,
) -> bytes:
    """An ELF header; program headers (if any) are expected right after it by default."""
    endian = "<" if order == "little" else ">"
    ehsize = 52 if bits == 32 else 64
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if order == "little" else 2, 1])
    ident += bytes([osabi, abi_version]) + b"\0" * 7
    word = "I" if bits == 32 else "Q"
    return ident + struct.pack(
        f"{endian}HHI{word}{word}{word}IHHHHHH",
        e_type,
        machine,
        1,  # e_version
        entry,
        ehsize if phoff is None else phoff,
        0,  # e_shoff
        flags,
        ehsize,
        (32 if bits == 32 else 56) if phentsize is None else phentsize,
        phnum,
        0,  # e_shentsize
        0,  # e_shnum
        0,  # e_shstrndx
    )


def program_header(
    *,
    p_type: int,
    offset: int,
    filesz: int,
    bits: Literal[32, 64] = 64,
    order: Literal["little", "big"] = "little",
    vaddr: int = 0x400000,
    flags: int = 5,
) -> bytes:
    endian = "<" if order == "little" else ">"
    if bits == 32:
        return struct.pack(
            f"{endian}IIIIIIII", p_type, offset, vaddr, vaddr, filesz, filesz, flags, 0x1000
        )
    return struct.pack(
        f"{endian}IIQQQQQQ", p_type, flags, offset, vaddr, vaddr, filesz, filesz, 0x1000
    )


def elf_with_interpreter(
    interpreter: bytes,
    *,
    machine: int = 62,
    bits: Literal[32, 64] = 64,
    order: Literal["little", "big"] = "little",
    interp_offset: int | None = None,
    phoff: int | None = None,
) -> bytes:
    """A dynamically linked ELF image: PT_INTERP then PT_LOAD, the path at ``interp_offset``
    (default: right after the program headers), NUL-terminated."""
    ehsize = 52 if bits == 32 else 64
    phsize = 32 if bits == 32 else 56
    table_at = ehsize if phoff is None else phoff
    path = interpreter + b"\0"
    path_at = table_at + 2 * phsize if interp_offset is None else interp_offset
    image = bytearray(max(table_at + 2 * phsize, path_at + len(path)))
    header = elf_header(
        machine=machine, bits=bits, order=order, e_type=ET_DYN, phoff=table_at, phnum=2
    )
    image[:ehsize] = header
    table = program_header(
        p_type=PT_INTERP, offset=path_at, filesz=len(path), bits=bits, order=order
    ) + program_header(p_type=PT_LOAD, offset=0, filesz=len(image), bits=bits, order=order)
    image[table_at : table_at + len(table)] = table
    image[path_at : path_at + len(path)] = path
    return bytes(image)
