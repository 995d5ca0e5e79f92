"""Pure. binfmt_misc entries: the register line written to ``register`` and the status text
read back from ``<name>``, both ways, within the kernel's limits.

Theory of operation (``fs/binfmt_misc.c``, Documentation/admin-guide/binfmt-misc.rst):

- A rule is registered by writing ``:name:type:offset:magic:mask:interpreter:flags`` to the
  ``register`` file in *one* ``write(2)`` of 11..1920 bytes (``MAX_REGISTER_LENGTH``). The
  first character is the delimiter; ``:`` is conventional, any other works, which is how names
  or interpreter paths containing ``:`` are registered. In magic and mask, ``\\xHH`` is one
  byte; other bytes stand for themselves (the kernel stops at a raw NUL, so it must be
  escaped, as must a backslash and the delimiter).
- Type ``M`` matches ``magic`` at ``offset`` in the first ``BINPRM_BUF_SIZE`` (256) bytes of
  the file, bit by bit under ``mask``: ``offset + len(magic) <= 256``, and the mask, if any, is
  exactly as long as the magic. Type ``E`` matches the file name's extension (the offset and
  mask fields are ignored).
- Flags: ``P`` preserve argv[0], ``O`` open the binary and pass an fd, ``C`` credentials of
  the binary (implies ``O``), ``F`` open the interpreter now (it then works in any mount
  namespace and chroot).
- The entry's file reads back as the status text :func:`format_status` models::

      enabled
      interpreter /usr/bin/qemu-aarch64-static
      flags: PF
      offset 0
      magic 7f454c460201010000000000000000000200b700
      mask ffffffffffffff00fffffffffffffffffeffffff
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from runtimed.errors import BinfmtEntryError

# fs/binfmt_misc.c
MAX_REGISTER_LENGTH: Final = 1920
MIN_REGISTER_LENGTH: Final = 11
# include/linux/binfmts.h
BINPRM_BUF_SIZE: Final = 256
# include/uapi/linux/limits.h: an entry is a file in the binfmt_misc directory
NAME_MAX: Final = 255
# Files of the binfmt_misc filesystem that are not entries.
RESERVED_NAMES: Final = frozenset({".", "..", "register", "status"})

# Delimiters tried in order when a field contains the previous ones.
_DELIMITERS: Final = ":|#!,;=@%^~+"
_HEX_ESCAPE_RE: Final = re.compile(rb"\\x([0-9A-Fa-f]{1,2})")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


class BinfmtKind(enum.StrEnum):
    MAGIC = "M"
    EXTENSION = "E"


class BinfmtFlag(enum.StrEnum):
    """Entry flags, valued by their letter; :data:`FLAG_ORDER` is the kernel's print order."""

    PRESERVE_ARGV0 = "P"
    OPEN_BINARY = "O"
    CREDENTIALS = "C"
    FIX_BINARY = "F"


FLAG_ORDER: Final = (
    BinfmtFlag.PRESERVE_ARGV0,
    BinfmtFlag.OPEN_BINARY,
    BinfmtFlag.CREDENTIALS,
    BinfmtFlag.FIX_BINARY,
)


def parse_flags(letters: str) -> frozenset[BinfmtFlag]:
    """``"FP"`` -> ``{FIX_BINARY, PRESERVE_ARGV0}`` (``C`` adds ``O``, as the kernel does).

    Raises:
        BinfmtEntryError: a letter that is not one of P, O, C, F.
    """
    unknown = set(letters) - set(BinfmtFlag)
    if unknown:
        raise BinfmtEntryError(
            f"unknown binfmt_misc flags {''.join(sorted(unknown))!r} (known: POCF)",
            details={"flags": letters},
        )
    return _with_implied(BinfmtFlag(letter) for letter in letters)


def format_flags(flags: Iterable[BinfmtFlag]) -> str:
    """The flag letters in the kernel's order (``POCF``)."""
    present = set(flags)
    return "".join(flag.value for flag in FLAG_ORDER if flag in present)


def _with_implied(flags: Iterable[BinfmtFlag]) -> frozenset[BinfmtFlag]:
    found = frozenset(flags)
    if BinfmtFlag.CREDENTIALS in found:
        # fs/binfmt_misc.c check_special_flags: "this flag also implies the open-binary flag"
        found |= {BinfmtFlag.OPEN_BINARY}
    return found


def _error(message: str, **details: str | int) -> BinfmtEntryError:
    return BinfmtEntryError(message, details=dict(details))


def _fs_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _fs_text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True, kw_only=True)
class BinfmtEntry:
    """One binfmt_misc rule, valid by the kernel's rules (checked on construction).

    For ``kind`` E, ``magic`` is the file name extension (without the dot), ``offset`` is 0 and
    ``mask`` None. ``flags`` may be given with ``C`` alone; ``O`` is added as the kernel does.

    Raises:
        BinfmtEntryError: a field the kernel would refuse (EINVAL/ENAMETOOLONG/EEXIST).
    """

    name: str
    kind: BinfmtKind = BinfmtKind.MAGIC
    offset: int = 0
    magic: bytes
    mask: bytes | None = None
    interpreter: str
    flags: frozenset[BinfmtFlag] = frozenset()
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.kind is BinfmtKind.MAGIC:
            _check_magic(self.offset, self.magic, self.mask)
        else:
            _check_extension(self.offset, self.magic, self.mask)
        if not self.interpreter:
            raise _error(f"binfmt_misc entry {self.name!r}: empty interpreter", name=self.name)
        if _CONTROL_RE.search(self.interpreter):
            raise _error(
                f"binfmt_misc entry {self.name!r}: control character in interpreter "
                f"{self.interpreter!r}",
                name=self.name,
            )
        implied = _with_implied(self.flags)
        if implied != self.flags:
            object.__setattr__(self, "flags", implied)

    @property
    def flags_text(self) -> str:
        return format_flags(self.flags)

    def matches(self, data: bytes, *, filename: str = "") -> bool:
        """Whether the kernel's ``check_file`` picks this entry for a file (enabled or not).

        Args:
            data: the start of the file (the kernel looks at the first 256 bytes, zero-padded).
            filename: the path being executed, for type E entries.
        """
        if self.kind is BinfmtKind.EXTENSION:
            dot = filename.rfind(".")
            return dot != -1 and _fs_bytes(filename[dot + 1 :]) == self.magic
        return magic_matches(data, offset=self.offset, magic=self.magic, mask=self.mask)


def magic_matches(data: bytes, *, offset: int, magic: bytes, mask: bytes | None) -> bool:
    """``fs/binfmt_misc.c`` check_file for type M: ``(byte ^ magic) & mask == 0`` for every
    byte of ``magic`` at ``offset`` of the zero-padded first 256 bytes of ``data``."""
    buf = data[:BINPRM_BUF_SIZE].ljust(BINPRM_BUF_SIZE, b"\0")
    window = buf[offset : offset + len(magic)]
    bits = mask if mask is not None else b"\xff" * len(magic)
    return all((b ^ m) & k == 0 for b, m, k in zip(window, magic, bits, strict=True))


def _check_name(name: str) -> None:
    raw = _fs_bytes(name)
    if not raw or name in RESERVED_NAMES or "/" in name or _CONTROL_RE.search(name):
        raise _error(
            f"invalid binfmt_misc entry name {name!r}: must be non-empty, not "
            f"{'/'.join(sorted(RESERVED_NAMES))}, without '/' or control characters",
            name=name,
        )
    if len(raw) > NAME_MAX:
        raise _error(
            f"binfmt_misc entry name of {len(raw)} bytes exceeds NAME_MAX ({NAME_MAX})", name=name
        )


def _check_magic(offset: int, magic: bytes, mask: bytes | None) -> None:
    if not magic:
        raise _error("binfmt_misc magic is empty")
    if offset < 0:
        raise _error(f"binfmt_misc offset {offset} is negative", offset=offset)
    if offset + len(magic) > BINPRM_BUF_SIZE:
        raise _error(
            f"binfmt_misc offset {offset} + magic length {len(magic)} exceeds {BINPRM_BUF_SIZE}",
            offset=offset,
            size=len(magic),
        )
    if mask is not None and len(mask) != len(magic):
        raise _error(
            f"binfmt_misc mask length {len(mask)} differs from magic length {len(magic)}",
            mask=len(mask),
            magic=len(magic),
        )


def _check_extension(offset: int, magic: bytes, mask: bytes | None) -> None:
    if offset != 0 or mask is not None:
        raise _error("binfmt_misc extension entries have no offset or mask")
    if not magic or b"/" in magic or re.search(rb"[\x00-\x1f\x7f]", magic):
        raise _error(
            f"invalid binfmt_misc extension {magic!r}: non-empty, without '/' or control bytes"
        )


# --- register line ------------------------------------------------------------------------------


def _escape(data: bytes, delimiter: int) -> bytes:
    """Printable ASCII stays; the rest, backslash and the delimiter become ``\\xHH``."""
    return b"".join(
        bytes([b]) if 0x20 < b < 0x7F and b not in (0x5C, delimiter) else b"\\x%02x" % b
        for b in data
    )


def _pick_delimiter(entry: BinfmtEntry) -> int:
    taken = _fs_bytes(entry.name) + _fs_bytes(entry.interpreter)
    if entry.kind is BinfmtKind.EXTENSION:
        taken += entry.magic
    for candidate in _DELIMITERS.encode():
        if candidate not in taken:
            return candidate
    raise _error(
        f"binfmt_misc entry {entry.name!r}: name, interpreter and extension use every delimiter",
        name=entry.name,
    )


def format_register_line(entry: BinfmtEntry) -> bytes:
    """The line to write to ``register`` in one ``write(2)`` (no trailing newline).

    ``enabled`` is not part of a register line: the kernel registers entries enabled.

    Raises:
        BinfmtEntryError: the line would exceed the kernel's 1920 bytes.
    """
    d = _pick_delimiter(entry)
    if entry.kind is BinfmtKind.MAGIC:
        fields = [
            str(entry.offset).encode(),
            _escape(entry.magic, d),
            b"" if entry.mask is None else _escape(entry.mask, d),
        ]
    else:
        fields = [b"", entry.magic, b""]
    parts = [
        _fs_bytes(entry.name),
        entry.kind.value.encode(),
        *fields,
        _fs_bytes(entry.interpreter),
    ]
    sep = bytes([d])
    line = sep + sep.join(parts) + sep + entry.flags_text.encode()
    if len(line) > MAX_REGISTER_LENGTH:
        raise _error(
            f"binfmt_misc register line for {entry.name!r} is {len(line)} bytes "
            f"(the kernel takes at most {MAX_REGISTER_LENGTH})",
            name=entry.name,
            length=len(line),
        )
    return line


def _scan_escaped(line: bytes, start: int, delimiter: int) -> tuple[bytes, int]:
    """fs/binfmt_misc.c scanarg: the field up to ``delimiter``, ``\\x`` escapes skipped over."""
    index = start
    while index < len(line) and line[index] != delimiter:
        if line[index] == 0x5C and line[index + 1 : index + 2] == b"x":
            if not re.fullmatch(rb"[0-9A-Fa-f]{2}", line[index + 2 : index + 4]):
                raise _error(f"bad \\x escape at byte {index} of the register line", at=index)
            index += 4
        else:
            index += 1
    if index >= len(line):
        raise _error("register line ends inside a field")
    return line[start:index], index + 1


def _unescape(field: bytes, what: str) -> bytes:
    """lib/string_helpers.c string_unescape with UNESCAPE_HEX: ``\\x`` and one or two hex
    digits is a byte; a backslash before anything else stays, with the byte after it."""
    if b"\0" in field:
        raise _error(f"raw NUL byte in the {what} field (write it as \\x00)")
    out = bytearray()
    index = 0
    while index < len(field):
        if field[index] == 0x5C and index + 1 < len(field):
            escape = _HEX_ESCAPE_RE.match(field, index)
            if escape is not None:
                out.append(int(escape.group(1), 16))
                index = escape.end()
                continue
            out += field[index : index + 2]
            index += 2
            continue
        out.append(field[index])
        index += 1
    return bytes(out)


def _take(line: bytes, start: int, delimiter: int) -> tuple[bytes, int]:
    end = line.find(bytes([delimiter]), start)
    if end == -1:
        raise _error("register line ends inside a field")
    return line[start:end], end + 1


def parse_register_line(line: bytes) -> BinfmtEntry:
    """Parse a register line as ``fs/binfmt_misc.c`` create_entry does (one trailing newline
    allowed). The result is enabled, as a fresh registration is.

    Raises:
        BinfmtEntryError: whatever the kernel would refuse with EINVAL, named.
    """
    if not MIN_REGISTER_LENGTH <= len(line) <= MAX_REGISTER_LENGTH:
        raise _error(
            f"register line of {len(line)} bytes (the kernel takes "
            f"{MIN_REGISTER_LENGTH}..{MAX_REGISTER_LENGTH})",
            length=len(line),
        )
    d = line[0]
    name, at = _take(line, 1, d)
    kind_field, at = _take(line, at, d)
    if kind_field not in (b"M", b"E"):
        raise _error(f"register line type {kind_field!r} is neither M nor E")
    kind = BinfmtKind(kind_field.decode())
    offset, mask = 0, None
    if kind is BinfmtKind.MAGIC:
        offset_field, at = _take(line, at, d)
        if offset_field:
            if not re.fullmatch(rb"\+?[0-9]+", offset_field):
                raise _error(f"register line offset {offset_field!r} is not a decimal number")
            offset = int(offset_field)
        raw_magic, at = _scan_escaped(line, at, d)
        if not raw_magic:
            raise _error("register line has an empty magic")
        magic = _unescape(raw_magic, "magic")
        raw_mask, at = _scan_escaped(line, at, d)
        mask = _unescape(raw_mask, "mask") if raw_mask else None
    else:
        _, at = _take(line, at, d)  # the offset field, ignored for extensions
        magic, at = _take(line, at, d)
        _, at = _take(line, at, d)  # the mask field, ignored for extensions
    interpreter, at = _take(line, at, d)
    tail = line[at:].removesuffix(b"\n")
    if not re.fullmatch(rb"[POCF]*", tail):
        raise _error(f"register line flags {tail!r}: only P, O, C, F may follow the interpreter")
    return BinfmtEntry(
        name=_fs_text(name),
        kind=kind,
        offset=offset,
        magic=magic,
        mask=mask,
        interpreter=_fs_text(interpreter),
        flags=parse_flags(tail.decode()),
    )


# --- status text --------------------------------------------------------------------------------


def format_status(entry: BinfmtEntry) -> str:
    """The text the kernel shows in ``binfmt_misc/<name>`` (fs/binfmt_misc.c entry_status)."""
    lines = [
        "enabled" if entry.enabled else "disabled",
        f"interpreter {entry.interpreter}",
        f"flags: {entry.flags_text}",
    ]
    if entry.kind is BinfmtKind.EXTENSION:
        lines.append(f"extension .{_fs_text(entry.magic)}")
    else:
        lines += [f"offset {entry.offset}", f"magic {entry.magic.hex()}"]
        if entry.mask is not None:
            lines.append(f"mask {entry.mask.hex()}")
    return "\n".join(lines) + "\n"


def _hex_field(line: str, prefix: str, name: str) -> bytes:
    try:
        return bytes.fromhex(line.removeprefix(prefix))
    except ValueError:
        raise _error(f"binfmt_misc status of {name!r}: bad hex in {line!r}", name=name) from None


def parse_status(name: str, text: str) -> BinfmtEntry:
    """Parse the text of ``binfmt_misc/<name>`` back into the entry.

    Raises:
        BinfmtEntryError: text that is not what the kernel prints for an entry.
    """
    lines = text.removesuffix("\n").split("\n")
    if len(lines) < 4 or lines[0] not in ("enabled", "disabled"):
        raise _error(f"binfmt_misc status of {name!r} is not an entry's: {text[:80]!r}", name=name)
    if not lines[1].startswith("interpreter ") or not lines[2].startswith("flags: "):
        raise _error(f"binfmt_misc status of {name!r}: no interpreter/flags lines", name=name)
    interpreter = lines[1].removeprefix("interpreter ")
    flags = parse_flags(lines[2].removeprefix("flags: "))
    rest = lines[3:]
    if len(rest) == 1 and rest[0].startswith("extension ."):
        return BinfmtEntry(
            name=name,
            kind=BinfmtKind.EXTENSION,
            magic=_fs_bytes(rest[0].removeprefix("extension .")),
            interpreter=interpreter,
            flags=flags,
            enabled=lines[0] == "enabled",
        )
    offset_match = re.fullmatch(r"offset (-?[0-9]+)", rest[0])
    if offset_match is None or len(rest) not in (2, 3) or not rest[1].startswith("magic "):
        raise _error(f"binfmt_misc status of {name!r}: no offset/magic lines", name=name)
    mask = None
    if len(rest) == 3:
        if not rest[2].startswith("mask "):
            raise _error(f"binfmt_misc status of {name!r}: unexpected {rest[2]!r}", name=name)
        mask = _hex_field(rest[2], "mask ", name)
    return BinfmtEntry(
        name=name,
        kind=BinfmtKind.MAGIC,
        offset=int(offset_match.group(1)),
        magic=_hex_field(rest[1], "magic ", name),
        mask=mask,
        interpreter=interpreter,
        flags=flags,
        enabled=lines[0] == "enabled",
    )
