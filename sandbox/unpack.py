"""IO: safe unpacking of one untrusted layer (a tar stream or a directory) into a layer directory.

Public API (sync; the daemon calls it through ``trio.to_thread``):

- :func:`apply_layer` runs ``sandbox.layerhelper`` (an exec'd single-threaded process) that
  reads the stream, unpacks it and reports one JSON record; on failure ``dest`` and ``work``
  are emptied. :class:`LayerHelper` splits that in two: start the process first, hand it
  the plan once the source is ready.
- :func:`copy_directory_layer` streams a source directory (given as an fd) as a canonical tar
  through the very same helper, so both sources share one filter and one writer.

The building blocks the helper uses live here too (the stream it reads from is
:class:`sandbox.layerstream.LayerStream`; trees are removed and walked by ``sandbox.fstree``):

- :func:`unpack_stream` parses tar headers (plain ones in :func:`simple_member`, the rest
  with ``tarfile``; parsing only, strictly: a bad header anywhere or a missing end-of-archive
  marker rejects the archive) and hands each planned :class:`~sandbox.archive.Entry` to
  :class:`LayerWriter`. Runs of plain files, directories and symlinks go to the native writer
  of ``sandbox.layerwrite`` instead (:meth:`LayerWriter.write_plain`), which writes them as
  ``LayerWriter`` would and hands every other member back.
- :class:`LayerWriter` performs every write relative to a root directory fd: parent directories
  are resolved with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` (symlinks met on the way
  are followed but can never leave the root), the final component is created with ``*at()``
  calls on the parent fd and never followed (``O_NOFOLLOW``, ``AT_SYMLINK_NOFOLLOW``).
  Whiteouts and opaque markers delete what the layers below show, as seen through the root; in
  the helper that root is an overlay mount whose upper dir is the new layer, so the kernel
  records them as overlay whiteouts and opaque directories (see ``sandbox.layerhelper``).

Decisions beyond the per-member table in ``sandbox.archive``:

- A plain tar must end with its two zero blocks; bytes after them count toward the diff_id
  (compressed streams: see ``sandbox.layerstream``).
- A later entry replaces what a path holds (tar semantics), a directory by removing its tree;
  a ``DIRECTORY`` entry over a symlink that resolves to a directory inside the root keeps the
  symlink (GNU tar ``--keep-directory-symlink``), so usrmerge's ``lib -> usr/lib`` survives.
- A parent that is a dangling symlink, or one that resolves to a non-directory, rejects the
  archive: nothing is created at its target.
- A whiteout or opaque marker never removes what this same layer created (OCI layer.md).
- Directory mtimes are set once every entry is written; directories the archive does not
  list (implied parents, copied up in the overlay) keep the time of the unpack.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import stat
import struct
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final, Protocol
from zlib import adler32

from runtimed.errors import (
    InternalError,
    InvalidArchiveError,
    Json,
    KernelError,
    LimitExceededError,
    RuntimedError,
    SnapshotError,
    error_from_json,
)
from sandbox import helperserver, syscalls
from sandbox.archive import (
    PAX_XATTR_PREFIX,
    Entry,
    EntryKind,
    LayerResult,
    Member,
    UnpackLimits,
    UnpackPlan,
    pax_xattrs,
    plan_entry,
)
from sandbox.fstree import clear, walk_tree
from sandbox.layerstream import CHUNK, LayerStream
from sandbox.layerwrite import PlainWriter, Written, set_dir_times

log = logging.getLogger(__name__)

BLOCK: Final = tarfile.BLOCKSIZE
_RESOLVE: Final = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
_ONE_COMPONENT: Final = (
    syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS
)
_DIR_PATH: Final = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_READ: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Failures that are the host's, not the archive's: reported as KernelError, not InvalidArchive.
_HOST_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM})
_WARNING_CHARS: Final = 300
_CACHED_DIRS: Final = 64
DEFAULT_LIMITS: Final = UnpackLimits()


class _Slice:
    """A regular member's data straight from the stream, in whatever chunks it comes."""

    def __init__(self, stream: LayerStream, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, size: int = -1, /) -> memoryview:
        data = self._stream.read_some(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data


class Readable(Protocol):
    """What a file's content is read from (tarfile's member reader, a plain file)."""

    def read(self, size: int = -1, /) -> bytes | memoryview: ...


class _Warnings:
    """Bounded list of warnings: a hostile archive cannot grow the result without limit."""

    def __init__(self, limit: int) -> None:
        self.kept: list[str] = []
        self.dropped = 0
        self._limit = limit

    def add(self, text: str) -> None:
        if len(self.kept) < self._limit:
            shown = text if len(text) <= _WARNING_CHARS else text[:_WARNING_CHARS] + "..."
            self.kept.append(shown)
            log.debug("unpack: %s", shown)
        else:
            self.dropped += 1

    def result(self) -> tuple[str, ...]:
        more = (f"... and {self.dropped} more",) if self.dropped else ()
        return (*self.kept, *more)


class LayerWriter:
    """Executes planned entries relative to a root directory fd (see the module docstring).

    Whiteouts and opaque markers apply only to what the layers below provide (OCI image spec,
    layer.md "Whiteouts"): what this layer itself created is remembered and kept.
    """

    def __init__(self, root_fd: int, limits: UnpackLimits) -> None:
        self._root = root_fd
        self._limits = limits
        self._created: set[tuple[str, ...]] = set()
        # (path as the native writer reports it, mtime in ns) of every directory written.
        self._dir_times: list[tuple[bytes, int]] = []
        # Recently used directories, kept open by path (least recently used first): archives
        # list a directory's entries together, depth first, so nearly every entry finds its
        # parent here instead of resolving it again with openat2. Each fd is either resolved
        # in the root (``_open_dir``) or a directory we just created or listed, opened
        # O_NOFOLLOW on such a parent: what its path named when it was opened. A removal
        # (the only way that can change) drops all but the parent it happened in.
        self._dirs: dict[tuple[str, ...], int] = {}
        self._plain = PlainWriter(root_fd)
        # Paths the native writer created, NUL-separated, not yet in ``_created``: only
        # whiteouts and opaque markers ask, so most layers never turn them into tuples.
        self._plain_created: list[bytes] = []
        self.size = 0

    # --- resolution ---------------------------------------------------------------------------

    def _open(self, parts: tuple[str, ...], flags: int = _DIR_PATH) -> int:
        return syscalls.openat2(self._root, "/".join(parts) or ".", flags, _RESOLVE)

    def _open_dir(self, parts: tuple[str, ...], *, create: bool) -> int:
        """An O_PATH fd of directory ``parts`` resolved in the root, creating missing ones.

        The slow path walks one component at a time without following symlinks; a component
        that is a symlink is resolved as a whole prefix in the root instead (the kernel allows
        at most 40 of those per path). So a hostile archive of deep, ever-new paths costs
        O(depth) lookups per member, not O(depth^2).
        """
        try:
            return self._open(parts)
        except KernelError as exc:
            if exc.errno_name != "ENOENT" or not create:
                raise
        fd = os.dup(self._root)
        try:
            for depth in range(1, len(parts) + 1):
                child = self._step(fd, parts[:depth])
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _step(self, fd: int, prefix: tuple[str, ...]) -> int:
        """The directory ``prefix`` (whose parent is ``fd``), created when missing."""
        name = prefix[-1]
        try:
            return syscalls.openat2(fd, name, _DIR_PATH, _ONE_COMPONENT)
        except KernelError as exc:
            if exc.errno_name == "ELOOP":  # a symlink: follow it, inside the root
                try:
                    return self._open(prefix)
                except KernelError as inner:
                    if inner.errno_name not in ("ENOENT", "ENOTDIR"):
                        raise
            elif exc.errno_name != "ENOENT":
                raise
            else:
                os.mkdir(name, 0o755, dir_fd=fd)
                self._created.add(prefix)
                return os.open(name, _DIR_PATH | os.O_NOFOLLOW, dir_fd=fd)
        raise InvalidArchiveError(
            f"{'/'.join(prefix)!r} is a symlink that does not resolve to a directory inside the "
            "layer",
            details={"entry": "/".join(prefix)},
        )

    # --- entries ------------------------------------------------------------------------------

    def write_plain(self, window: memoryview, *, max_entries: int) -> Written:
        """Write the plain members at the start of ``window`` natively (``sandbox.layerwrite``).
        The member after them is the caller's to parse.

        Raises:
            InvalidArchiveError, KernelError: as :meth:`apply`, for the member that failed.
        """
        written = self._plain.run(
            window, max_entries=max_entries, max_bytes=self._limits.max_bytes - self.size
        )
        self.size += written.file_bytes
        if written.created:
            self._plain_created.append(written.created)
        self._dir_times.extend((path, mtime * 1_000_000_000) for path, mtime in written.dirs)
        if written.err:
            header = bytes(window[written.consumed : written.consumed + BLOCK])
            member = simple_member(header)
            assert member is not None  # the native writer parsed it as simple_member does
            entry = plan_entry(member).entry
            assert entry is not None
            raise _entry_error(entry, written.err, os.strerror(written.err))
        return written

    def _created_paths(self) -> set[tuple[str, ...]]:
        for blob in self._plain_created:
            self._created.update(_parts(path) for path in blob.split(b"\0")[:-1])
        self._plain_created.clear()
        return self._created

    def apply(self, entry: Entry, data: Readable | None = None) -> None:
        """Write one entry; ``data`` is the file's content for FILE entries.

        Raises:
            InvalidArchiveError: the entry cannot be written as the archive asks (a hardlink to
                nothing or to a directory, a file where a directory is needed, ...).
            KernelError: the host failed (ENOSPC, EIO, ...).
            LimitExceededError: file data beyond ``limits.max_bytes``.
        """
        if log.isEnabledFor(logging.DEBUG):
            log.debug("unpack: %s", entry.describe())
        try:
            self._apply(entry, data)
        except OSError as exc:
            raise _entry_error(entry, exc.errno or 0, str(exc)) from exc
        except (ValueError, OverflowError) as exc:  # os.* on values the kernel cannot take
            raise _entry_error(entry, errno.EINVAL, str(exc)) from exc
        except KernelError as exc:
            raise _entry_error(entry, getattr(errno, exc.errno_name, 0), exc.message) from exc

    def _apply(self, entry: Entry, data: Readable | None) -> None:
        if entry.kind is EntryKind.WHITEOUT:
            self._whiteout(entry.path)
            return
        if entry.kind is EntryKind.OPAQUE:
            self._opaque(entry.path)
            return
        if not entry.path:
            self._remember((), self._directory_metadata(self._root, ".", entry))
            return
        self._create(self._parent_fd(entry.path[:-1]), entry.path[-1], entry, data)
        self._created.add(entry.path)

    def _parent_fd(self, parts: tuple[str, ...]) -> int:
        fd = self._dirs.pop(parts, None)
        if fd is None:
            fd = self._open_dir(parts, create=True)
        self._remember(parts, fd)
        return fd

    def _remember(self, parts: tuple[str, ...], fd: int) -> None:
        """Keep ``fd`` (now owned by the cache) as the most recently used directory."""
        old = self._dirs.pop(parts, None)
        if old is not None:
            os.close(old)
        if len(self._dirs) >= _CACHED_DIRS:
            os.close(self._dirs.pop(next(iter(self._dirs))))
        self._dirs[parts] = fd

    def _replace(self, parent: int, parts: tuple[str, ...], name: str) -> None:
        """Remove ``name`` from the cached directory ``parts`` (fd ``parent``), which stays
        valid; every other cached directory may have been below ``name``: dropped."""
        self._forget(keep=parts)
        clear(parent, name)

    def _clear_anywhere(self, parent: int, name: str) -> None:
        """Remove something that may be an ancestor of any cached directory."""
        self._forget(keep=None)
        clear(parent, name)

    def _forget(self, *, keep: tuple[str, ...] | None) -> None:
        for parts in [p for p in self._dirs if p != keep]:
            os.close(self._dirs.pop(parts))

    def close(self) -> None:
        """Close the cached directories (idempotent)."""
        self._forget(keep=None)

    def _create(self, parent: int, name: str, entry: Entry, data: Readable | None) -> None:
        if entry.kind is EntryKind.DIRECTORY:
            self._directory(parent, name, entry)
            return
        if entry.kind is EntryKind.HARDLINK:
            self._hardlink(parent, name, entry)
            return
        for attempt in (1, 2):
            try:
                self._make(parent, name, entry, data)
                return
            except FileExistsError:
                if attempt == 2:
                    raise
                self._replace(parent, entry.path[:-1], name)

    def _make(self, parent: int, name: str, entry: Entry, data: Readable | None) -> None:
        if entry.kind is EntryKind.FILE:
            fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent)
            try:
                self._write_data(fd, entry, data)
                # chown clears setuid/setgid and security.capability, so it goes first
                # (chown(2), capabilities(7) "File capability extended attribute versioning").
                os.fchown(fd, entry.uid, entry.gid)
                for key, value in entry.xattrs:
                    os.setxattr(fd, key, value)
                os.fchmod(fd, entry.mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
            return
        if entry.kind is EntryKind.SYMLINK:
            os.symlink(entry.symlink, name, dir_fd=parent)
        elif entry.kind is EntryKind.CHAR_DEVICE:
            os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(*entry.device), dir_fd=parent)
        elif entry.kind is EntryKind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=parent)
        else:
            raise InternalError(f"unpack: no writer for {entry.kind}")
        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        if entry.kind is not EntryKind.SYMLINK:
            # We created ``name`` just now as a device or FIFO in a directory only we write to.
            os.chmod(name, entry.mode, dir_fd=parent)
        ns = (entry.mtime_ns, entry.mtime_ns)
        os.utime(name, ns=ns, dir_fd=parent, follow_symlinks=False)

    def _write_data(self, fd: int, entry: Entry, data: Readable | None) -> None:
        remaining = entry.size
        while remaining > 0 and data is not None:
            chunk = data.read(min(remaining, CHUNK))
            if not chunk:
                raise InvalidArchiveError(
                    f"archive member {'/'.join(entry.path)!r}: data ends early",
                    details={"entry": "/".join(entry.path)},
                )
            self.size += len(chunk)
            if self.size > self._limits.max_bytes:
                raise LimitExceededError(
                    f"layer: more than {self._limits.max_bytes} bytes of file data",
                    details={"entry": "/".join(entry.path), "limit": "max_bytes"},
                )
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            remaining -= len(chunk)

    def _directory(self, parent: int, name: str, entry: Entry) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode) and self._is_dir(entry.path):
                # A symlink to a directory stays (GNU tar --keep-directory-symlink): usrmerge's
                # ``lib -> usr/lib`` must not be shadowed by a later ``lib/`` entry.
                log.debug("unpack: kept directory symlink %s", "/".join(entry.path))
                return
            if not stat.S_ISDIR(st.st_mode):
                self._replace(parent, entry.path[:-1], name)
                os.mkdir(name, 0o700, dir_fd=parent)
        self._remember(entry.path, self._directory_metadata(parent, name, entry))

    def _is_dir(self, parts: tuple[str, ...]) -> bool:
        try:
            os.close(self._open(parts))
        except KernelError:
            return False
        return True

    def _directory_metadata(self, parent: int, name: str, entry: Entry) -> int:
        """Set a directory's owner, xattrs and mode; the fd it was opened as (not followed)."""
        fd = os.open(name, _DIR_READ | os.O_NOFOLLOW, dir_fd=parent)
        try:
            os.fchown(fd, entry.uid, entry.gid)
            for key, value in entry.xattrs:
                os.setxattr(fd, key, value)
            os.fchmod(fd, entry.mode)
        except BaseException:
            os.close(fd)
            raise
        # Later entries change the directory's mtime: it is set once all are written.
        self._dir_times.append((os.fsencode("/".join(entry.path)), entry.mtime_ns))
        return fd

    def _hardlink(self, parent: int, name: str, entry: Entry) -> None:
        target_parent = self._open_dir(entry.hardlink[:-1], create=False)
        try:
            target = entry.hardlink[-1]
            source = os.stat(target, dir_fd=target_parent, follow_symlinks=False)
            if stat.S_ISDIR(source.st_mode):
                raise InvalidArchiveError(
                    f"archive member {'/'.join(entry.path)!r}: hardlink to a directory",
                    details={"entry": "/".join(entry.path)},
                )
            try:
                existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if (existing.st_dev, existing.st_ino) == (source.st_dev, source.st_ino):
                    return
                self._replace(parent, entry.path[:-1], name)
            # No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself (linkat(2)).
            os.link(
                target, name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False
            )
        finally:
            os.close(target_parent)

    def _whiteout(self, path: tuple[str, ...]) -> None:
        if path in self._created_paths():
            return
        try:
            parent = self._open_dir(path[:-1], create=False)
        except KernelError as exc:
            if exc.errno_name in ("ENOENT", "ENOTDIR"):
                return  # nothing below to hide
            raise
        try:
            self._clear_anywhere(parent, path[-1])
        finally:
            os.close(parent)

    def _opaque(self, path: tuple[str, ...]) -> None:
        holder = self._open_dir(path, create=True)
        os.close(holder)
        fd = self._open(path, _DIR_READ)
        try:
            created = self._created_paths()
            for name in os.listdir(fd):
                if (*path, name) not in created:
                    self._clear_anywhere(fd, name)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Set directory mtimes, deepest and latest first, once nothing else changes them
        (natively: one call for the whole layer, see ``sandbox.layerwrite``); a directory
        replaced or removed by a later entry is skipped."""
        set_dir_times(self._root, self._dir_times[::-1])


def _parts(path: bytes) -> tuple[str, ...]:
    """A path the native writer reported, as :func:`sandbox.archive.parse_member_path` gives it
    (names decode as tarfile decodes them: UTF-8 with surrogateescape)."""
    return tuple(os.fsdecode(path).split("/"))


def _entry_error(entry: Entry, err: int, text: str) -> RuntimedError:
    name = "/".join(entry.path) or "."
    if err in _HOST_ERRNOS:
        return syscalls.kernel_error(err, syscall=f"unpack {entry.kind}", path=name)
    return InvalidArchiveError(
        f"archive member {name!r} ({entry.kind}): {text}",
        details={"entry": name, "errno": errno.errorcode.get(err, str(err))},
    )


def member_from_tarinfo(info: tarfile.TarInfo) -> Member:
    """The parser's view of a tar header, as the pure planner's :class:`Member`."""
    return Member(
        name=info.name,
        type=info.type.decode("latin-1"),
        linkname=info.linkname,
        mode=info.mode,
        uid=info.uid,
        gid=info.gid,
        mtime=float(info.mtime),
        size=info.size,
        devmajor=info.devmajor,
        devminor=info.devminor,
        xattrs=pax_xattrs(info.pax_headers),
    )


def _tar_members(
    stream: LayerStream, plain: Callable[[memoryview], tuple[int, str | None]] | None
) -> Iterator[tuple[Member, tarfile.TarFile, tarfile.TarInfo | None]]:
    """Parse tar headers strictly, one at a time, without keeping them (stream order).

    Yields each member with the ``TarInfo`` tarfile parsed for it, or None when
    :func:`simple_member` parsed it: then its data, if any, starts where the stream is.
    Before each header after the first, ``plain`` (unless None, or a global PAX header
    applies) is given the decoded bytes at hand and returns how many of them it took as whole
    members of its own, and the name of the last (None if it took none). Ends at the
    end-of-archive marker (two zero blocks). Stdlib ``TarFile.next`` stops silently at a bad
    header after the first member; we reject the archive instead.
    """
    if stream.peek(BLOCK) == _ZERO_BLOCK:
        _check_end(stream)
        return
    try:
        tar = tarfile.TarFile(fileobj=stream, mode="r")  # type: ignore[arg-type]
    except tarfile.TarError as exc:
        raise InvalidArchiveError(
            f"{stream.name}: not a tar archive: {exc}", details={"blob": stream.name}
        ) from exc
    # TarFile keeps what its constructor read in two attributes typeshed does not list.
    info: tarfile.TarInfo | None = tar.firstmember  # type: ignore[attr-defined]
    if info is None:
        raise InvalidArchiveError(
            f"{stream.name}: not a tar archive: no first member", details={"blob": stream.name}
        )
    member = member_from_tarinfo(info)
    while True:
        # The archive object must not remember members: memory stays flat for any count.
        tar.members.clear()  # type: ignore[attr-defined]
        yield member, tar, info
        after = member.name  # the last member, named by errors about what follows it
        stream.seek(tar.offset)
        # Global PAX headers ("g") patch every later member: only tarfile applies them.
        if plain is not None and not tar.pax_headers:
            took, last = plain(stream.window())
            tar.offset += took
            stream.seek(tar.offset)
            after = last or after
        head = stream.peek(BLOCK)
        if len(head) < BLOCK:
            raise InvalidArchiveError(
                f"{stream.name}: truncated: no end-of-archive marker after {after!r}",
                details={"blob": stream.name, "entry": after},
            )
        if head == _ZERO_BLOCK:
            _check_end(stream)
            return
        simple = None if tar.pax_headers else simple_member(head)
        if simple is not None:
            stream.seek(tar.offset + BLOCK)
            tar.offset += BLOCK + (_round_up(simple.size) if simple.type in _DATA_TYPES else 0)
            member, info = simple, None
            continue
        try:
            info = tarfile.TarInfo.fromtarfile(tar)
        except tarfile.TarError as exc:
            raise InvalidArchiveError(
                f"{stream.name}: bad tar header after {after!r}: {exc}",
                details={"blob": stream.name, "entry": after},
            ) from exc
        member = member_from_tarinfo(info)


# Header types that simple_member parses; their data follows for the regular ones only, as
# in tarfile's _proc_builtin (links, devices, directories and FIFOs carry none, whatever
# their size field says).
_SIMPLE_TYPES: Final = frozenset(b"01234567\0")
_DATA_TYPES: Final = frozenset({"0", "\0", "7"})
# POSIX ustar header (pax(1) "ustar Header Block"): name, mode, uid, gid, size, mtime,
# chksum, typeflag, linkname, magic, version, uname, gname, devmajor, devminor, prefix.
_HEADER: Final = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s")
_CHKSUM_BLANKS: Final = 8 * ord(" ")
_PAD: Final = b"\0 "
_EMPTY_DEVICE: Final = bytes(8)
_ZERO_BLOCK: Final = bytes(BLOCK)


def simple_member(block: bytes) -> Member | None:
    """The member a plain ustar/GNU header block describes, or None.

    A fast path for the common header (no PAX or GNU long-name record before it, octal
    numbers, a plain type, an unsigned checksum that matches), built exactly as tarfile's
    ``frombuf`` and ``_proc_builtin`` and :func:`member_from_tarinfo` would build it; every
    other header goes to tarfile, which also owns all error reporting. Parsing headers was
    40% of an import's CPU time.
    """
    (name, mode, uid, gid, size, mtime, chksum, kind, link, _, _, _, _, major, minor, prefix) = (
        _HEADER.unpack_from(block)
    )
    if kind[0] not in _SIMPLE_TYPES:
        return None
    try:
        # Inline, not a helper called per field, and the device numbers only when set: a
        # fifth less time per header. int() of bytes refuses base-256 numbers (a first byte
        # 0o200/0o377), non-ASCII and a NUL left inside the field once trailing NULs and
        # spaces are cut; whatever it accepts is what tarfile's nti() (cut at the first
        # NUL, strip, int) reads.
        checksum = int(chksum.rstrip(_PAD) or b"0", 8)
        if checksum != _byte_sum(block) - sum(chksum) + _CHKSUM_BLANKS:
            return None
        numbers = (
            int(mode.rstrip(_PAD) or b"0", 8),
            int(uid.rstrip(_PAD) or b"0", 8),
            int(gid.rstrip(_PAD) or b"0", 8),
            int(size.rstrip(_PAD) or b"0", 8),
            int(mtime.rstrip(_PAD) or b"0", 8),
        )
        # GNU tar leaves both device fields empty for all but devices.
        device = (
            (0, 0)
            if major == minor == _EMPTY_DEVICE
            else (int(major.rstrip(_PAD) or b"0", 8), int(minor.rstrip(_PAD) or b"0", 8))
        )
    except ValueError:
        return None
    path, type_ = _text(name), kind.decode("latin-1")
    if type_ == "\0" and path.endswith("/"):
        type_ = "5"  # an old V7 directory
    if type_ == "5":
        path = path.rstrip("/")
    if prefix[0]:
        path = f"{_text(prefix)}/{path}"
        if type_ == "5":
            path = path.rstrip("/")
    return Member(
        name=path,
        type=type_,
        linkname=_text(link),
        mode=numbers[0],
        uid=numbers[1],
        gid=numbers[2],
        mtime=float(numbers[4]),
        size=numbers[3],
        devmajor=device[0],
        devminor=device[1],
    )


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` for one header block, five times faster: the first half of an Adler-32
    is 1 + the sum of the bytes modulo 65521 (RFC 1950 8.2), exact for 256 bytes or fewer."""
    view = memoryview(block)
    return (adler32(view[:256]) & 0xFFFF) + (adler32(view[256:]) & 0xFFFF) - 2


def _text(field: bytes) -> str:
    # tarfile.nts with the archive's default encoding (UTF-8, surrogateescape).
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _round_up(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _check_end(stream: LayerStream) -> None:
    if stream.read(2 * BLOCK) != 2 * _ZERO_BLOCK:
        raise InvalidArchiveError(
            f"{stream.name}: truncated or corrupt end-of-archive marker",
            details={"blob": stream.name},
        )


def unpack_stream(
    fd: int,
    root_fd: int,
    limits: UnpackLimits,
    *,
    name: str = "layer",
    expected_diff_id: str | None = None,
    expected_digest: str | None = None,
    hash_compressed: bool = True,
) -> LayerResult:
    """Unpack the tar stream on ``fd`` into the directory ``root_fd``, in this process.

    The helper calls this with ``root_fd`` on the merged overlay (or the bare layer directory
    for a layer without parents); it is not meant for the daemon itself.

    ``expected_digest`` is checked against the sha256 of the bytes read. Without
    ``hash_compressed`` a compressed stream's bytes are not hashed (the result has no
    compressed digest): for a caller that hashed exactly the bytes ``fd`` holds as it wrote
    them into a file only it can write (the store's staging copy). An uncompressed stream is
    hashed anyway: that digest is its diff_id.

    Raises:
        InvalidArchiveError: corrupt, truncated or hostile archive, or a digest mismatch.
        LimitExceededError: beyond ``limits``.
        KernelError: the host failed while writing.
        InternalError: ``expected_digest`` without ``hash_compressed``.
    """
    if expected_digest is not None and not hash_compressed:
        raise InternalError(f"{name}: an expected digest needs the stream hashed")
    stream = LayerStream(fd, limits, name=name, hash_compressed=hash_compressed)
    try:
        entries, warnings, size = _unpack_members(stream, root_fd, limits, name)
        stream.finish()
    finally:
        stream.close()
    _check_digest(name, "diff_id", expected_diff_id, stream.diff_id)
    _check_digest(name, "digest", expected_digest, stream.compressed_digest)
    return LayerResult(
        diff_id=stream.diff_id,
        compressed_digest=stream.compressed_digest,
        compression=stream.compression,
        size=size,
        entries=entries,
        warnings=warnings,
    )


def _unpack_members(
    stream: LayerStream, root_fd: int, limits: UnpackLimits, name: str
) -> tuple[int, tuple[str, ...], int]:
    """Plan and write every member: (entries, warnings, bytes written)."""
    writer = LayerWriter(root_fd, limits)
    warnings = _Warnings(limits.max_warnings)
    entries = 0

    def plain(window: memoryview) -> tuple[int, str | None]:
        nonlocal entries
        consumed, last = 0, None
        # A call stops early when its records are full: go on until one takes none.
        while consumed < len(window):
            written = writer.write_plain(
                window[consumed:], max_entries=limits.max_entries - entries
            )
            if not written.entries:
                break
            entries += written.entries
            consumed += written.consumed
            last = written.last()
        return consumed, last

    # In debug mode every member goes through LayerWriter.apply, which logs it.
    try:
        members = _tar_members(stream, None if log.isEnabledFor(logging.DEBUG) else plain)
        for member, tar, info in members:
            entries += 1
            if entries > limits.max_entries:
                raise LimitExceededError(
                    f"{name}: more than {limits.max_entries} entries",
                    details={"blob": name, "limit": "max_entries"},
                )
            plan = plan_entry(member)
            for text in plan.warnings:
                warnings.add(text)
            if plan.entry is not None:
                writer.apply(plan.entry, _member_data(stream, tar, info, plan.entry))
    except tarfile.TarError as exc:
        raise InvalidArchiveError(
            f"{name}: corrupt tar data: {exc}", details={"blob": name}
        ) from exc
    finally:
        writer.close()
    writer.finish()
    return entries, warnings.result(), writer.size


def _member_data(
    stream: LayerStream, tar: tarfile.TarFile, info: tarfile.TarInfo | None, entry: Entry
) -> Readable | None:
    if entry.kind is not EntryKind.FILE:
        return None
    if info is not None:
        if info.sparse is not None:
            return tar.extractfile(info)  # tarfile expands GNU sparse maps
        stream.seek(info.offset_data)
    return _Slice(stream, entry.size)


def _check_digest(name: str, what: str, expected: str | None, actual: str | None) -> None:
    if expected is not None and expected != actual:
        raise InvalidArchiveError(
            f"{name}: {what} mismatch: expected {expected}, got {actual}",
            details={"blob": name, "expected": expected, "actual": actual, "digest": what},
        )


# --- the caller-facing side: run the helper ---------------------------------------------------


def apply_layer(
    source_fd: int,
    *,
    parents: Sequence[Path],
    dest: Path,
    work: Path | None = None,
    limits: UnpackLimits = DEFAULT_LIMITS,
    expected_diff_id: str | None = None,
    expected_digest: str | None = None,
    hash_compressed: bool = True,
    name: str = "layer",
) -> LayerResult:
    """Unpack the layer stream on ``source_fd`` into the empty directory ``dest``: a
    :class:`LayerHelper` started and applied at once (see :meth:`LayerHelper.apply`).

    Raises:
        InvalidArchiveError, LimitExceededError, KernelError, SnapshotError: as
            :meth:`LayerHelper.apply`.
    """
    with LayerHelper(source_fd) as helper:
        return helper.apply(
            parents=parents,
            dest=dest,
            work=work,
            limits=limits,
            expected_diff_id=expected_diff_id,
            expected_digest=expected_digest,
            hash_compressed=hash_compressed,
            name=name,
        )


class LayerHelper:
    """A ``sandbox.layerhelper`` process, forked ready by the fork server of
    ``sandbox.helperserver`` and blocked reading its plan.

    Start one before the source is ready (the store starts it on a pipe that it fills from
    the staging blob as it copies the archive). The helper holds ``source_fd`` (the same open
    file description, as its :data:`~sandbox.helperserver.SOURCE_FD`) and reads nothing from
    it before :meth:`apply` sends the plan. It is followed through a pidfd: it is not this
    process's child. Use it as a context manager: leaving kills a helper that never got a
    plan and waits until it is gone.
    """

    def __init__(self, source_fd: int) -> None:
        stdin_read, stdin = os.pipe2(os.O_CLOEXEC)
        stdout, stdout_write = os.pipe2(os.O_CLOEXEC)
        stderr, stderr_write = os.pipe2(os.O_CLOEXEC)
        try:
            helper = helperserver.spawn(stdin_read, stdout_write, stderr_write, source_fd)
        except BaseException:
            for fd in (stdin, stdout, stderr):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)
        self.pid = helper.pid
        # Ours until close(): the plan's pipe (until it is sent), the record's, stderr's and
        # the helper's pidfd.
        self._fds = {"stdin": stdin, "stdout": stdout, "stderr": stderr, "pidfd": helper.pidfd}
        self._gone = False

    def __enter__(self) -> LayerHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the helper unless it has ended (idempotent), wait until it is gone, and close
        the descriptors."""
        if not self._fds:
            return
        if not self._gone:
            self.kill()
            self._wait_gone()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def kill(self) -> None:
        """SIGKILL the helper unless it is gone. Safe from another thread while :meth:`apply`
        waits for the helper (apply then raises SnapshotError): a pidfd never names another
        process."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._fds["pidfd"], signal.SIGKILL)

    def _wait_gone(self) -> None:
        """Until the helper has exited (its pidfd turns readable; a zombie counts)."""
        poller = select.poll()
        poller.register(self._fds["pidfd"], select.POLLIN)
        poller.poll()
        self._gone = True

    def apply(
        self,
        *,
        parents: Sequence[Path],
        dest: Path,
        work: Path | None = None,
        limits: UnpackLimits = DEFAULT_LIMITS,
        expected_diff_id: str | None = None,
        expected_digest: str | None = None,
        hash_compressed: bool = True,
        name: str = "layer",
    ) -> LayerResult:
        """Unpack the layer stream on ``source_fd`` into the empty directory ``dest``.

        ``parents`` are the layer directories below, lowest first (overlayfs lowerdirs).
        With parents, the helper mounts an overlay (lower = parents, upper = ``dest``) in its
        own mount namespace on ``work`` (an empty directory on the same filesystem as
        ``dest``) and unpacks into the merged view, so ``dest`` ends up holding overlayfs's
        representation of the layer: whiteouts as 0/0 character devices, opaque directories
        with the ``user.overlay.opaque`` xattr. Every overlay mount over such layers must pass
        ``userxattr``. The helper reads ``source_fd`` to its end; ``name`` names the blob in
        errors; ``expected_digest`` and ``hash_compressed`` are as in :func:`unpack_stream`.

        On failure ``dest`` and ``work`` are emptied (the caller removes the directories).

        Raises:
            InvalidArchiveError: corrupt, truncated or hostile archive, or a digest mismatch.
            LimitExceededError: beyond ``limits``.
            KernelError: a system call failed (mounting the overlay, ENOSPC, ...).
            SnapshotError: ``dest``/``work`` unusable, or the helper died without a report.
        """
        _require_empty(dest)
        if parents:
            if work is None:
                raise SnapshotError(f"{name}: a layer with parents needs a work directory")
            _require_empty(work)
        plan = UnpackPlan(
            name=name,
            source_fd=helperserver.SOURCE_FD,
            parents=tuple(os.fspath(p) for p in parents),
            dest=os.fspath(dest),
            work=None if work is None else os.fspath(work),
            limits=limits,
            expected_diff_id=expected_diff_id,
            expected_digest=expected_digest,
            hash_compressed=hash_compressed,
        )
        try:
            return LayerResult.from_json(self._run(plan))
        except BaseException:
            _empty(dest)
            if work is not None:
                _empty(work)
            raise

    def _run(self, plan: UnpackPlan) -> Json:
        """Send the plan; the result record's payload, or the helper's error raised again."""
        data = json.dumps(plan.to_json()).encode()
        stdin = self._fds.pop("stdin")
        try:
            while data:
                data = data[os.write(stdin, data) :]
        except BrokenPipeError:
            pass  # the helper is gone: it left no report either
        finally:
            os.close(stdin)
        stdout, raw_stderr = _read_both(self._fds["stdout"], self._fds["stderr"])
        self._wait_gone()
        stderr = raw_stderr.decode(errors="replace").strip()
        if stderr:
            log.debug("layer helper stderr: %s", stderr)
        try:
            record = json.loads(stdout)
        except ValueError:
            record = None
        if isinstance(record, dict) and "result" in record:
            result: Json = record["result"]
            return result
        if isinstance(record, dict) and isinstance(record.get("error"), dict):
            raise error_from_json(record["error"], fallback="layer helper failed")
        raise SnapshotError(
            f"layer helper {self.pid} ended without a report",
            details={"pid": self.pid, "stderr": stderr[-2000:]},
        )


def _read_both(first: int, second: int) -> tuple[bytes, bytes]:
    """Everything two pipes carry until both end, read as it comes (neither can fill up)."""
    out: dict[int, list[bytes]] = {first: [], second: []}
    poller = select.poll()
    for fd in out:
        poller.register(fd, select.POLLIN)
    open_fds = set(out)
    while open_fds:
        for fd, _ in poller.poll():
            data = os.read(fd, 65536)
            if data:
                out[fd].append(data)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)
    return b"".join(out[first]), b"".join(out[second])


def _require_empty(path: Path) -> None:
    try:
        names = os.listdir(path)
    except OSError as exc:
        raise SnapshotError(
            f"layer directory {path}: {exc.strerror}", details={"path": os.fspath(path)}
        ) from exc
    if names:
        raise SnapshotError(
            f"layer directory {path} is not empty", details={"path": os.fspath(path)}
        )


def _empty(path: Path) -> None:
    """Remove everything inside ``path`` (without following any symlink), keeping ``path``."""
    try:
        fd = os.open(path, _DIR_READ | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        for name in os.listdir(fd):
            clear(fd, name)
    finally:
        os.close(fd)


# --- directory sources -----------------------------------------------------------------------


def copy_directory_layer(
    src_dir_fd: int, dest: Path, limits: UnpackLimits = DEFAULT_LIMITS, *, name: str = "directory"
) -> LayerResult:
    """Copy the tree under the open directory ``src_dir_fd`` into the empty layer ``dest``.

    The tree is streamed as a canonical tar (:func:`write_directory_tar`) through
    :func:`apply_layer`, so it gets exactly the filters and writer an archive gets; the
    result's ``diff_id`` is that tar's digest. Symlinks in the source are copied, never
    followed. Opening the source with the caller's rights is the caller's business.

    Raises:
        InvalidArchiveError, LimitExceededError, KernelError, SnapshotError: as apply_layer;
            KernelError also when the source cannot be read.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    failures: list[BaseException] = []
    skipped: list[str] = []

    def produce() -> None:
        try:
            with os.fdopen(write_end, "wb") as out:
                write_directory_tar(src_dir_fd, out, skipped.append)
        except BaseException as exc:  # handed to the calling thread
            failures.append(exc)

    producer = threading.Thread(target=produce, name="copy-directory-layer")
    producer.start()
    try:
        result = apply_layer(read_end, parents=(), dest=dest, limits=limits, name=name)
    except RuntimedError:
        os.close(read_end)
        producer.join()
        _raise_producer_failure(failures)
        raise
    os.close(read_end)
    producer.join()
    if failures:
        _empty(dest)
        _raise_producer_failure(failures)
    return dataclasses.replace(result, warnings=(*skipped, *result.warnings))


def _raise_producer_failure(failures: list[BaseException]) -> None:
    for exc in failures:
        if isinstance(exc, RuntimedError):
            raise exc
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise syscalls.oserror(exc, syscall="copy directory") from exc


_TAR_TYPES: Final = {
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


def write_directory_tar(dir_fd: int, out: BinaryIO, warn: Callable[[str], None]) -> None:
    """Write the tree under ``dir_fd`` to ``out`` as a canonical PAX tar.

    Canonical: names sorted bytewise, numeric owners only, mtimes with nanoseconds, xattrs as
    ``SCHILY.xattr.*``, hardlinks to the first name of an inode. Symlinks are never followed
    (every lookup is ``*at()`` with ``O_NOFOLLOW``); sockets are skipped with a warning.

    Raises:
        OSError: the source could not be read.
    """
    tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    seen: dict[tuple[int, int], str] = {}
    root = os.stat(".", dir_fd=dir_fd)
    tar.addfile(_tarinfo(".", root, dir_fd, "."))
    for fd, path, name, st in walk_tree(dir_fd):
        kind = stat.S_IFMT(st.st_mode)
        if kind not in _TAR_TYPES:
            warn(f"{path}: skipped (socket or unknown file type)")
            continue
        info = _tarinfo(path, st, fd, name)
        if kind == stat.S_IFREG and st.st_nlink > 1:
            first = seen.setdefault((st.st_dev, st.st_ino), path)
            if first != path:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, first, 0
        if info.type == tarfile.REGTYPE:
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            with os.fdopen(file_fd, "rb") as data:
                tar.addfile(info, data)
        else:
            tar.addfile(info)
    tar.close()


def _tarinfo(path: str, st: os.stat_result, dir_fd: int, name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    kind = stat.S_IFMT(st.st_mode)
    info.type = _TAR_TYPES[kind]
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = st.st_mtime_ns / 1_000_000_000
    if kind == stat.S_IFREG:
        info.size = st.st_size
    if kind == stat.S_IFLNK:
        info.linkname = os.readlink(name, dir_fd=dir_fd)
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    if kind in (stat.S_IFREG, stat.S_IFDIR):
        pax: dict[str, str] = {}
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
        try:
            for key in sorted(os.listxattr(fd)):
                value = os.getxattr(fd, key)
                pax[PAX_XATTR_PREFIX + key] = value.decode("utf-8", "surrogateescape")
        finally:
            os.close(fd)
        info.pax_headers = pax
    return info
