"""Pure. What an untrusted layer archive may put into a layer: compression sniffing, limits,
member names, and the decision, entry by entry, of what gets written.

The IO shell (``sandbox.unpack``) turns each tar header (or each file of a source directory)
into a :class:`Member`, asks :func:`plan_entry` what to do, and executes the resulting
:class:`Entry` relative to a root directory descriptor. Everything that could reach outside
that root or smuggle in privileges is decided here, with the reason recorded:

==========================  =====================================================================
archive content             decision
==========================  =====================================================================
leading ``/``               stripped, as GNU tar and Docker do (the name is relative to the root)
``.`` / empty components    dropped (``./a//b`` is ``a/b``)
``..`` component            archive rejected (GNU tar refuses such members too)
NUL byte, name > PATH_MAX   archive rejected (the kernel could not name the file anyway)
component > NAME_MAX        archive rejected
symlink (any target)        created as is; written *through* only by ``openat2(RESOLVE_IN_ROOT)``
hardlink                    target is an archive name (same rules), resolved inside the root;
                            a link to a symlink links the symlink itself
char device                 created only for null, zero, full, random, urandom, tty; 0/0 is an
                            overlay whiteout and treated as ``.wh.NAME``; others skipped + warning
block device                skipped with a warning
FIFO                        created (harmless)
``.wh.NAME``                whiteout of NAME in the layers below
``.wh..wh..opq``            the directory hides everything below it (opaque)
other ``.wh..wh.*``         AUFS bookkeeping: skipped with a warning
setuid/setgid/sticky        kept (mode & 07777)
xattrs (PAX SCHILY.xattr)   ``security.capability`` and ``user.*`` kept; ``user.overlay.*``,
                            ``trusted.*`` and all others dropped with a warning (an archived
                            overlay xattr would rewrite the merged view)
owner                       numeric uid/gid (names ignored, as Docker does); -1 rejected
==========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Final

from runtimed.errors import InvalidArchiveError, InvalidParamsError, Json

# <linux/limits.h>
PATH_MAX: Final = 4096
NAME_MAX: Final = 255

WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
# Character devices a root filesystem may carry: (major, minor) -> name, <linux/major.h> and
# Documentation/admin-guide/devices.txt. Nothing here reaches hardware or kernel memory.
HARMLESS_CHAR_DEVICES: Final[Mapping[tuple[int, int], str]] = {
    (1, 3): "null",
    (1, 5): "zero",
    (1, 7): "full",
    (1, 8): "random",
    (1, 9): "urandom",
    (5, 0): "tty",
}
# An overlayfs whiteout is a character device 0/0 (Documentation/filesystems/overlayfs.rst).
WHITEOUT_DEVICE: Final = (0, 0)
KEPT_XATTRS: Final = frozenset({"security.capability"})
KEPT_XATTR_PREFIX: Final = "user."
DROPPED_XATTR_PREFIX: Final = "user.overlay."
PAX_XATTR_PREFIX: Final = "SCHILY.xattr."
# utimensat(2) takes a 64-bit time_t; keep mtime_ns within a signed 64-bit count of ns.
_MAX_MTIME: Final = 9_000_000_000.0
_MIN_MTIME: Final = -_MAX_MTIME
_NO_ID: Final = 0xFFFFFFFF  # (uid_t)-1 means "leave unchanged" to chown(2)
_SURROGATE: Final = "surrogateescape"  # how tarfile and os.fsencode carry undecodable bytes


class Compression(enum.StrEnum):
    """How a layer stream is compressed, as recognised by :func:`sniff_compression`."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    XZ = "xz"
    BZIP2 = "bzip2"


# The magic each compressed member (gzip member, zstd frame, xz stream, bzip2 stream) starts
# with; concatenated members are legal, anything else after the last one is garbage.
MAGIC: Final[Mapping[Compression, bytes]] = {
    Compression.GZIP: b"\x1f\x8b",  # RFC 1952 2.3.1
    Compression.ZSTD: b"\x28\xb5\x2f\xfd",  # RFC 8878 3.1.1
    Compression.XZ: b"\xfd7zXZ\x00",  # xz file format 2.1.1.1
    Compression.BZIP2: b"BZh",  # followed by the block size digit '1'..'9'
}
SNIFF_BYTES: Final = 6


def sniff_compression(head: bytes) -> Compression:
    """The compression of a stream from its first bytes (at least :data:`SNIFF_BYTES`).

    Anything without a known magic is taken as a plain tar stream; the tar parser rejects it
    later if it is not one.
    """
    for compression, magic in MAGIC.items():
        if head.startswith(magic):
            if compression is Compression.BZIP2 and head[3:4] not in b"123456789":
                continue
            return compression
    return Compression.NONE


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UnpackLimits:
    """Bounds on one layer, against decompression bombs and inode exhaustion.

    ``max_bytes`` bounds both the uncompressed tar stream and the file data written (a sparse
    member can expand beyond its stream size); ``max_entries`` bounds the tar members.
    """

    max_bytes: int = 64 * 1024**3
    max_entries: int = 2_000_000
    max_warnings: int = 100

    def to_json(self) -> dict[str, Json]:
        return {
            "max_bytes": self.max_bytes,
            "max_entries": self.max_entries,
            "max_warnings": self.max_warnings,
        }

    @classmethod
    def from_json(cls, obj: Json) -> UnpackLimits:
        """Raises:
        InvalidParamsError: a field is missing, not a positive integer.
        """
        if not isinstance(obj, dict):
            raise InvalidParamsError("limits: not an object", details={"parameter": "limits"})
        values: dict[str, int] = {}
        for field in ("max_bytes", "max_entries", "max_warnings"):
            value = obj.get(field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidParamsError(
                    f"limits.{field}: not a non-negative integer: {value!r}",
                    details={"parameter": f"limits.{field}"},
                )
            values[field] = value
        return cls(**values)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerResult:
    """What unpacking one layer produced.

    Attributes:
        diff_id: ``sha256:<hex>`` of the uncompressed tar stream (the OCI diff ID).
        compressed_digest: ``sha256:<hex>`` of the bytes as read (equal to ``diff_id`` when
            the stream was not compressed); None for a compressed stream unpacked without
            ``hash_compressed`` (its reader hashed it).
        compression: What the stream was compressed with.
        size: Bytes of file data written.
        entries: Tar members (or source files) processed, skipped ones included.
        warnings: What was skipped or dropped and why, at most ``limits.max_warnings`` lines.
    """

    diff_id: str
    compressed_digest: str | None
    compression: Compression
    size: int
    entries: int
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Json]:
        return {
            "diff_id": self.diff_id,
            "compressed_digest": self.compressed_digest,
            "compression": str(self.compression),
            "size": self.size,
            "entries": self.entries,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, obj: Json) -> LayerResult:
        """Raises:
        InvalidParamsError: a field is missing or of the wrong type.
        """
        if not isinstance(obj, dict):
            raise InvalidParamsError("layer result: not an object", details={"parameter": "."})
        diff_id, digest = obj.get("diff_id"), obj.get("compressed_digest")
        size, entries = obj.get("size"), obj.get("entries")
        compression, warnings = obj.get("compression"), obj.get("warnings")
        if not (isinstance(diff_id, str) and (digest is None or isinstance(digest, str))):
            raise InvalidParamsError("layer result: bad digests", details={"parameter": "diff_id"})
        if not (isinstance(size, int) and isinstance(entries, int)):
            raise InvalidParamsError("layer result: bad counts", details={"parameter": "size"})
        if compression not in set(Compression):
            raise InvalidParamsError(
                f"layer result: bad compression {compression!r}",
                details={"parameter": "compression"},
            )
        if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
            raise InvalidParamsError(
                "layer result: bad warnings", details={"parameter": "warnings"}
            )
        return cls(
            diff_id=diff_id,
            compressed_digest=digest,
            compression=Compression(str(compression)),
            size=size,
            entries=entries,
            warnings=tuple(str(w) for w in warnings),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UnpackPlan:
    """What ``sandbox.unpack.apply_layer`` asks of ``sandbox.layerhelper``: its stdin, as JSON.

    Paths are absolute strings (the helper turns them into ``Path``); ``parents`` lowest first.
    """

    name: str
    source_fd: int
    parents: tuple[str, ...]
    dest: str
    work: str | None
    limits: UnpackLimits
    expected_diff_id: str | None = None
    expected_digest: str | None = None
    hash_compressed: bool = True

    def to_json(self) -> dict[str, Json]:
        return {
            "name": self.name,
            "source_fd": self.source_fd,
            "parents": list(self.parents),
            "dest": self.dest,
            "work": self.work,
            "limits": self.limits.to_json(),
            "expected_diff_id": self.expected_diff_id,
            "expected_digest": self.expected_digest,
            "hash_compressed": self.hash_compressed,
        }

    @classmethod
    def from_json(cls, obj: Json) -> UnpackPlan:
        """Raises:
        InvalidParamsError: naming the missing or mistyped field.
        """
        if not isinstance(obj, dict):
            raise InvalidParamsError("plan: not an object", details={"parameter": "."})
        parents = obj.get("parents")
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise InvalidParamsError(
                "plan.parents: not a list of paths", details={"parameter": "parents"}
            )
        fd = obj.get("source_fd")
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise InvalidParamsError(
                "plan.source_fd: not a file descriptor", details={"parameter": "source_fd"}
            )
        hash_compressed = obj.get("hash_compressed", True)
        if not isinstance(hash_compressed, bool):
            raise InvalidParamsError(
                "plan.hash_compressed: not a boolean", details={"parameter": "hash_compressed"}
            )
        plan = cls(
            name=_text(obj, "name"),
            source_fd=fd,
            parents=tuple(str(p) for p in parents),
            dest=_text(obj, "dest"),
            work=_optional_text(obj, "work"),
            limits=UnpackLimits.from_json(obj.get("limits")),
            expected_diff_id=_optional_text(obj, "expected_diff_id"),
            expected_digest=_optional_text(obj, "expected_digest"),
            hash_compressed=hash_compressed,
        )
        if plan.parents and plan.work is None:
            raise InvalidParamsError(
                "plan.work: needed with parents", details={"parameter": "work"}
            )
        if plan.expected_digest is not None and not plan.hash_compressed:
            raise InvalidParamsError(
                "plan.expected_digest: needs hash_compressed",
                details={"parameter": "expected_digest"},
            )
        return plan


def _text(obj: dict[str, Json], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidParamsError(f"plan.{key}: not a non-empty string", details={"parameter": key})
    return value


def _optional_text(obj: dict[str, Json], key: str) -> str | None:
    return None if obj.get(key) is None else _text(obj, key)


class EntryKind(enum.StrEnum):
    """What one planned entry does to the layer."""

    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR_DEVICE = "char-device"
    FIFO = "fifo"
    WHITEOUT = "whiteout"  # remove ``path`` as seen through the layers below
    OPAQUE = "opaque"  # directory ``path`` hides what the layers below have in it


# tar typeflags (POSIX ustar, GNU): what each becomes, or None for "not a file we create".
_TAR_KINDS: Final[Mapping[str, str]] = {
    "0": "file",
    "\0": "file",
    "7": "file",  # contiguous file
    "S": "file",  # GNU sparse, expanded by the parser
    "1": "hardlink",
    "2": "symlink",
    "3": "char",
    "4": "block",
    "5": "directory",
    "6": "fifo",
}


_ENTRY_KINDS: Final[Mapping[str, EntryKind]] = {
    "file": EntryKind.FILE,
    "directory": EntryKind.DIRECTORY,
    "symlink": EntryKind.SYMLINK,
    "hardlink": EntryKind.HARDLINK,
    "char": EntryKind.CHAR_DEVICE,
    "fifo": EntryKind.FIFO,
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Member:
    """One archive member as the parser saw it (a tar header, or a source directory's stat).

    ``type`` is the tar typeflag character; ``xattrs`` the extended attributes it carries
    (PAX ``SCHILY.xattr.*`` records, see :func:`pax_xattrs`), unfiltered.
    """

    name: str
    type: str
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 0.0
    size: int = 0
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One write to the layer, relative to its root: the data part of the plan.

    ``path`` is the normalised component tuple (no ``..``; empty only for the root itself, as
    a DIRECTORY whose metadata is set or an OPAQUE root). ``symlink`` is a symlink's target
    (any text); ``hardlink`` a hardlink's target, normalised like ``path``.
    """

    path: tuple[str, ...]
    kind: EntryKind
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    symlink: str = ""
    hardlink: tuple[str, ...] = ()
    device: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def describe(self) -> str:
        name = "/".join(self.path)
        if self.kind is EntryKind.SYMLINK:
            return f"symlink {name} -> {self.symlink}"
        if self.kind is EntryKind.HARDLINK:
            return f"hardlink {name} => {'/'.join(self.hardlink)}"
        return f"{self.kind} {name}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """The decision for one member: the entry to write (None: skip) and what to tell."""

    entry: Entry | None
    warnings: tuple[str, ...] = ()


def _invalid(name: str, why: str) -> InvalidArchiveError:
    return InvalidArchiveError(
        f"archive member {name!r}: {why}", details={"entry": name, "reason": why}
    )


def parse_member_path(name: str) -> tuple[str, ...]:
    """Normalise an archive member name into path components below the root.

    A leading ``/`` is stripped, ``.`` and empty components are dropped.

    Raises:
        InvalidArchiveError: a ``..`` component, a NUL byte, a name beyond PATH_MAX or a
            component beyond NAME_MAX; an empty name is allowed only as the root itself
            (returned as ``()``).
    """
    if "\0" in name:
        raise _invalid(name, "name contains a NUL byte")
    # An ASCII name is its own UTF-8: its length in bytes is len(). This runs once per member,
    # so the common case skips the encoding.
    size = len(name) if name.isascii() else len(name.encode("utf-8", _SURROGATE))
    if size >= PATH_MAX:
        raise _invalid(name[:64] + "...", f"name longer than PATH_MAX ({size} bytes)")
    parts = tuple([p for p in name.split("/") if p and p != "."])
    if ".." in parts:
        raise _invalid(name, "'..' component")
    if size > NAME_MAX and any(len(p.encode("utf-8", _SURROGATE)) > NAME_MAX for p in parts):
        raise _invalid(name, "component longer than NAME_MAX")
    return parts


def filter_xattrs(
    name: str, xattrs: Mapping[str, bytes]
) -> tuple[tuple[tuple[str, bytes], ...], tuple[str, ...]]:
    """The xattrs kept (sorted) and one warning per dropped one (see the module table)."""
    if not xattrs:
        return (), ()
    kept: list[tuple[str, bytes]] = []
    warnings: list[str] = []
    for key in sorted(xattrs):
        allowed = "\0" not in key and (
            key in KEPT_XATTRS
            or (key.startswith(KEPT_XATTR_PREFIX) and not key.startswith(DROPPED_XATTR_PREFIX))
        )
        if allowed:
            kept.append((key, xattrs[key]))
        else:
            warnings.append(f"{name}: dropped xattr {key}")
    return tuple(kept), tuple(warnings)


def pax_xattrs(pax: Mapping[str, str]) -> dict[str, bytes]:
    """The ``SCHILY.xattr.*`` records of a PAX header (GNU tar ``--xattrs``), as raw bytes.

    tarfile decodes PAX values as UTF-8 with surrogateescape, so the bytes come back intact.
    """
    return {
        key.removeprefix(PAX_XATTR_PREFIX): value.encode("utf-8", _SURROGATE)
        for key, value in pax.items()
        if key.startswith(PAX_XATTR_PREFIX)
    }


def _check_id(name: str, what: str, value: int) -> int:
    if not 0 <= value < _NO_ID:
        raise _invalid(name, f"{what} {value} out of range")
    return value


def plan_entry(member: Member) -> Plan:
    """Decide what one archive member does to the layer (see the module table).

    Raises:
        InvalidArchiveError: the member is hostile or malformed in a way that makes the whole
            archive suspect (bad names, ids out of range, unusable whiteouts).
    """
    name = member.name
    path = parse_member_path(name)
    kind = _TAR_KINDS.get(member.type)
    if kind is None:
        return Plan(entry=None, warnings=(f"{name}: skipped tar type {member.type!r}",))
    if not path and kind != "directory":
        raise _invalid(name, "names the root but is not a directory")
    if path and path[-1].startswith(WHITEOUT_PREFIX):
        return _plan_whiteout(name, path)
    device = (member.devmajor, member.devminor)
    if kind == "char" and device == WHITEOUT_DEVICE:
        if not path:
            raise _invalid(name, "whiteout of the root")
        return Plan(entry=Entry(path=path, kind=EntryKind.WHITEOUT))
    if kind == "block" or (kind == "char" and device not in HARMLESS_CHAR_DEVICES):
        return Plan(
            entry=None, warnings=(f"{name}: skipped {kind} device {device[0]}:{device[1]}",)
        )
    symlink, size = "", 0
    hardlink: tuple[str, ...] = ()
    xattrs: tuple[tuple[str, bytes], ...] = ()
    warnings: tuple[str, ...] = ()
    if kind == "symlink":
        symlink = member.linkname
        if "\0" in symlink or not symlink:
            raise _invalid(name, "empty symlink target or NUL byte in it")
        if len(symlink.encode("utf-8", _SURROGATE)) >= PATH_MAX:
            raise _invalid(name, "symlink target longer than PATH_MAX")
    elif kind == "hardlink":
        hardlink = parse_member_path(member.linkname)
        if not hardlink:
            raise _invalid(name, "hardlink to the root")
    elif kind in ("file", "directory"):
        xattrs, warnings = filter_xattrs(name, member.xattrs)
        if member.size < 0:
            raise _invalid(name, "negative size")
        size = member.size if kind == "file" else 0
    if not _MIN_MTIME <= member.mtime <= _MAX_MTIME:  # also false for NaN
        raise _invalid(name, f"mtime {member.mtime} out of range")
    entry = Entry(
        path=path,
        kind=_ENTRY_KINDS[kind],
        mode=member.mode & 0o7777,
        uid=_check_id(name, "uid", member.uid),
        gid=_check_id(name, "gid", member.gid),
        mtime_ns=round(member.mtime * 1_000_000_000),
        size=size,
        symlink=symlink,
        hardlink=hardlink,
        device=device if kind == "char" else (0, 0),
        xattrs=xattrs,
    )
    return Plan(entry=entry, warnings=warnings)


def _plan_whiteout(name: str, path: tuple[str, ...]) -> Plan:
    base = path[-1]
    if base == OPAQUE_MARKER:
        if len(path) == 1:
            # The root itself turns opaque: everything below is hidden.
            return Plan(entry=Entry(path=(), kind=EntryKind.OPAQUE))
        return Plan(entry=Entry(path=path[:-1], kind=EntryKind.OPAQUE))
    if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
        return Plan(entry=None, warnings=(f"{name}: skipped AUFS metadata",))
    hidden = base.removeprefix(WHITEOUT_PREFIX)
    if hidden in ("", ".", ".."):
        raise _invalid(name, "whiteout of nothing, '.' or '..'")
    return Plan(entry=Entry(path=(*path[:-1], hidden), kind=EntryKind.WHITEOUT))
