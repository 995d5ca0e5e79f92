"""IO: safe unpacking of one untrusted layer (a tar stream or a directory) into a layer directory.

Public API (sync; the daemon calls it through ``trio.to_thread``):

- :func:`apply_layer` runs ``sandbox.layerhelper`` (an exec'd single-threaded process) that
  reads the stream, unpacks it and reports one JSON record; on failure ``dest`` and ``work``
  are emptied.
- :func:`copy_directory_layer` streams a source directory (given as an fd) as a canonical tar
  through the very same helper, so both sources share one filter and one writer.

The building blocks the helper uses live here too:

- :class:`LayerStream` reads the raw fd to its end, sniffs the compression, decompresses
  member by member (concatenated gzip members, zstd frames, xz and bzip2 streams are legal;
  anything else after the last one is garbage), hashes both the compressed and the
  uncompressed bytes in the same pass and enforces :class:`~sandbox.archive.UnpackLimits`.
  Decoding and hashing run in two threads of a bounded pipeline (the C code releases the
  GIL), so they overlap with parsing and writing as GNU tar's separate gzip process does.
- :func:`unpack_stream` parses tar headers (plain ones in :func:`simple_tarinfo`, the rest
  with ``tarfile``; parsing only, strictly: a bad header anywhere or a missing end-of-archive
  marker rejects the archive) and hands each planned :class:`~sandbox.archive.Entry` to
  :class:`LayerWriter`.
- :class:`LayerWriter` performs every write relative to a root directory fd: parent directories
  are resolved with ``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`` (symlinks met on the way
  are followed but can never leave the root), the final component is created with ``*at()``
  calls on the parent fd and never followed (``O_NOFOLLOW``, ``AT_SYMLINK_NOFOLLOW``).
  Whiteouts and opaque markers delete what the layers below show, as seen through the root; in
  the helper that root is an overlay mount whose upper dir is the new layer, so the kernel
  records them as overlay whiteouts and opaque directories (see ``sandbox.layerhelper``).

Decisions beyond the per-member table in ``sandbox.archive``:

- Stream ends: concatenated members are legal (RFC 1952 2.2, RFC 8878 3, xz 2.2, bzip2);
  anything else after the last one is garbage, NUL padding and zstd skippable frames included.
  A plain tar must end with its two zero blocks; bytes after them count toward the diff_id.
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

import bz2
import dataclasses
import errno
import hashlib
import json
import logging
import lzma
import os
import queue
import stat
import subprocess
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Final, Protocol, TypeVar

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from runtimed.errors import (
    InternalError,
    InvalidArchiveError,
    Json,
    KernelError,
    LimitExceededError,
    RuntimedError,
    SnapshotError,
    error_class_for_code,
)
from sandbox import syscalls
from sandbox.archive import (
    MAGIC,
    PAX_XATTR_PREFIX,
    SNIFF_BYTES,
    Compression,
    Entry,
    EntryKind,
    LayerResult,
    Member,
    UnpackLimits,
    UnpackPlan,
    pax_xattrs,
    plan_entry,
    sniff_compression,
)

log = logging.getLogger(__name__)

CHUNK: Final = 1024 * 1024
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
HELPER_MODULE: Final = "sandbox.layerhelper"
DEFAULT_LIMITS: Final = UnpackLimits()
_QUEUE_CHUNKS: Final = 8
_STOP_POLL: Final = 0.1  # seconds between checks of the stop flag while the queue is full


def _digest(h: hashlib._Hash) -> str:
    return f"sha256:{h.hexdigest()}"


class _Decompressor(Protocol):
    """The interface shared by lzma, bz2 and zstd decompressors (and our zlib adapter)."""

    @property
    def eof(self) -> bool: ...
    @property
    def needs_input(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _GzipMember:
    """zlib's gzip decoder with the needs_input/max_length interface of lzma and bz2.

    zlib checks the member's CRC-32 and length trailer (RFC 1952 2.3.1) when it reaches eof.
    """

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._tail = b""

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    @property
    def needs_input(self) -> bool:
        return not self._tail

    @property
    def unused_data(self) -> bytes:
        return self._zlib.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        out = self._zlib.decompress(self._tail + data, max(max_length, 0))
        self._tail = self._zlib.unconsumed_tail
        return out


_DECOMPRESSORS: Final[dict[Compression, Callable[[], _Decompressor]]] = {
    Compression.GZIP: _GzipMember,
    Compression.ZSTD: zstd.ZstdDecompressor,
    Compression.XZ: lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
    Compression.BZIP2: bz2.BZ2Decompressor,
}
_DECOMPRESS_ERRORS: Final = (zlib.error, lzma.LZMAError, OSError, EOFError, zstd.ZstdError)


_Item = bytes | BaseException | None
_T = TypeVar("_T")


class _Decoder:
    """The producer half of :class:`LayerStream`: raw reads, decompression and both digests.

    Runs in its own thread (zlib, lzma, bz2, zstd and hashlib release the GIL), so that
    decompressing and hashing overlap with parsing and writing, as GNU tar's separate
    decompressor process does. Hands over at most ``_QUEUE_CHUNKS`` chunks of at most
    :data:`CHUNK` bytes: a decompression bomb never sits in memory.
    """

    def __init__(self, fd: int, limits: UnpackLimits, name: str) -> None:
        self._fd = fd
        self._limits = limits
        self.name = name
        self.raw_hash = hashlib.sha256()
        self.hash = hashlib.sha256()
        self.total = 0
        self._raw_eof = False
        self._input = b""
        while len(self._input) < SNIFF_BYTES and not self._raw_eof:
            self._input += self._read_raw()
        self.compression = sniff_compression(self._input)
        if self.compression is not Compression.NONE:
            self.raw_hash.update(self._input)
        self._decoder: _Decompressor | None = None
        self.queue: queue.Queue[_Item] = queue.Queue(_QUEUE_CHUNKS)
        self.hash_queue: queue.Queue[bytes | None] = queue.Queue(_QUEUE_CHUNKS)
        self.stopped = threading.Event()

    @property
    def compressed_digest(self) -> str:
        # An uncompressed stream is hashed once: its digest is its diff_id.
        return _digest(self.hash if self.compression is Compression.NONE else self.raw_hash)

    def _read_raw(self) -> bytes:
        try:
            data = os.read(self._fd, CHUNK)
        except OSError as exc:
            raise syscalls.oserror(exc, syscall="read") from exc
        self._raw_eof = not data
        return data

    def _read_compressed(self) -> bytes:
        data = self._read_raw()
        self.raw_hash.update(data)
        return data

    def invalid(self, why: str) -> InvalidArchiveError:
        return InvalidArchiveError(
            f"{self.name} ({self.compression}): {why}",
            details={"blob": self.name, "compression": str(self.compression), "reason": why},
        )

    def _start_member(self) -> bool:
        """Begin the next compressed member; False at a clean end of the stream."""
        magic = MAGIC[self.compression]
        while len(self._input) < len(magic) and not self._raw_eof:
            self._input += self._read_compressed()
        if not self._input:
            return False
        if not self._input.startswith(magic):
            raise self.invalid(f"trailing garbage after the last member ({self._input[:8]!r})")
        self._decoder = _DECOMPRESSORS[self.compression]()
        return True

    def _produce(self) -> bytes:
        """Up to CHUNK new uncompressed bytes; b"" only at the end of the stream."""
        if self.compression is Compression.NONE:
            data, self._input = self._input or self._read_raw(), b""
            return data
        while True:
            if self._decoder is None and not self._start_member():
                return b""
            decoder = self._decoder
            assert decoder is not None
            data, at_end = b"", False
            if decoder.needs_input:
                data, self._input = self._input or self._read_compressed(), b""
                at_end = not data
            try:
                out = decoder.decompress(data, CHUNK)
            except _DECOMPRESS_ERRORS as exc:
                raise self.invalid(f"corrupt data: {exc}") from exc
            if decoder.eof:
                self._input = decoder.unused_data
                self._decoder = None
            if out:
                return out
            # Only when no input is left *and* the decoder had nothing more to give (zlib may
            # still hold output with its input all consumed) is the member cut short.
            if at_end and self._decoder is not None:
                raise self.invalid("truncated: the stream ends inside a member")

    def run(self) -> None:
        """Decoder thread: every chunk, then None; or the exception that stopped it."""
        item: bytes | BaseException | None
        try:
            while True:
                item = self._produce()
                if not item:
                    item = None
                    break
                self.total += len(item)
                if self.total > self._limits.max_bytes:
                    raise LimitExceededError(
                        f"{self.name}: more than {self._limits.max_bytes} uncompressed bytes",
                        details={"blob": self.name, "limit": "max_bytes"},
                    )
                self._put(self.hash_queue, item)
                self._put(self.queue, item)
        except BaseException as exc:  # handed to the consumer, which raises it
            item = exc
        self._put(self.hash_queue, None)
        self._put(self.queue, item)

    def hash_all(self) -> None:
        """Hasher thread: sha256 runs beside decompression, as a third stage of the pipe."""
        while (chunk := self.hash_queue.get()) is not None:
            self.hash.update(chunk)

    def _put(self, into: queue.Queue[_T], item: _T) -> None:
        while not self.stopped.is_set():
            try:
                into.put(item, timeout=_STOP_POLL)
                return
            except queue.Full:
                continue


class LayerStream:
    """Forward-only, seekable file object over an fd holding a possibly compressed tar stream.

    Reads the fd to its end, hashes what it reads (compressed digest) and what it returns
    (diff_id), and raises once the uncompressed stream grows beyond ``limits.max_bytes``.
    ``seek`` only moves forward (reading and hashing what it skips), which is all ``tarfile``
    needs in mode ``"r"``. The decoding runs in a thread (:class:`_Decoder`); call
    :meth:`close` when done. Start it only after any ``unshare``: it makes the process
    multi-threaded.

    Raises (from read/peek/seek/finish):
        InvalidArchiveError: truncated or corrupt compressed data, trailing garbage.
        LimitExceededError: more than ``limits.max_bytes`` uncompressed bytes.
    """

    def __init__(self, fd: int, limits: UnpackLimits, *, name: str = "layer") -> None:
        self.name = name
        self._decoder = _Decoder(fd, limits, name)
        self.compression = self._decoder.compression
        self._threads = [
            threading.Thread(target=self._decoder.run, name="layer-decoder", daemon=True),
            threading.Thread(target=self._decoder.hash_all, name="layer-hasher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._done = False
        self._buf = b""
        self._off = 0
        self._pos = 0

    @property
    def diff_id(self) -> str:
        return _digest(self._decoder.hash)

    @property
    def compressed_digest(self) -> str:
        return self._decoder.compressed_digest

    def _next_chunk(self) -> bytes:
        if self._done:
            return b""
        item = self._decoder.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is None:
            self._done = True
            return b""
        return item

    def _fill(self, size: int) -> None:
        while len(self._buf) - self._off < size:
            data = self._next_chunk()
            if not data:
                break
            self._buf = self._buf[self._off :] + data if self._off < len(self._buf) else data
            self._off = 0

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end) without consuming them."""
        self._fill(size)
        return self._buf[self._off : self._off + size]

    def read(self, size: int = -1) -> bytes:
        """The next ``size`` bytes; fewer only at the end of the stream."""
        if size < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        self._fill(size)
        out = self._buf[self._off : self._off + size]
        self._off += len(out)
        self._pos += len(out)
        return out

    def read_some(self, size: int) -> bytes:
        """Between 1 and ``size`` bytes without joining chunks (b"" only at the end)."""
        if self._off >= len(self._buf):
            self._buf, self._off = self._next_chunk(), 0
        out = self._buf[self._off : self._off + size]
        self._off += len(out)
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self._pos + offset
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self._pos:
            raise InternalError(f"{self.name}: backward seek to {target} from {self._pos}")
        while self._pos < target:
            if not self.read_some(target - self._pos):
                raise self._decoder.invalid("truncated: the stream ends inside a member's data")
        return self._pos

    def finish(self) -> None:
        """Read (and hash) the rest of the stream, checking the compression to its end."""
        while self.read_some(CHUNK):
            pass
        for thread in self._threads:
            thread.join()

    def close(self) -> None:
        """Tell the decoder thread to stop (idempotent). It is a daemon thread: one blocked in
        ``read`` on a stalled pipe cannot keep the helper from exiting after an error."""
        self._decoder.stopped.set()


class _Slice:
    """A regular member's data straight from the stream, in whatever chunks it comes."""

    def __init__(self, stream: LayerStream, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read_some(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data


def _clear(parent: int, name: str) -> None:
    """Remove ``name`` in ``parent`` (a whole tree for a directory), never following it."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(parent, name)
    else:
        os.unlink(name, dir_fd=parent)


def _down(fd: int, name: str) -> int:
    """Swap ``fd`` for its subdirectory ``name`` (never a symlink); ``..`` goes back up."""
    child = os.open(name, _DIR_READ | os.O_NOFOLLOW, dir_fd=fd)
    os.close(fd)
    return child


def remove_tree(parent: int, name: str) -> None:
    """Remove the directory ``name`` in ``parent`` and everything below it, at any depth.

    ``shutil.rmtree`` recurses in Python and keeps a descriptor per level, so a hostile tree a
    few thousand levels deep (PATH_MAX allows 2048 in one name, symlinks chain further) ends in
    RecursionError or EMFILE and leaves the staging directory behind. This walk holds one
    descriptor, goes down by ``O_NOFOLLOW`` opens and back up by ``..`` (nothing else writes
    here), and never follows a symlink.
    """
    fd = os.open(name, _DIR_READ | os.O_NOFOLLOW, dir_fd=parent)
    below: list[str] = []  # the path from ``name`` down to where fd is
    try:
        while True:
            sub = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                fd = _down(fd, sub)
                below.append(sub)
                continue
            if not below:
                break
            fd = _down(fd, "..")
            try:
                os.rmdir(below[-1], dir_fd=fd)
                below.pop()
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                fd = _down(fd, below[-1])  # entries missed by a scan that was unlinking
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def remove_path(path: Path) -> None:
    """Remove ``path`` (a tree, a file or a symlink, never followed) if it exists, at any depth.

    For the store's staging and garbage: ``shutil.rmtree`` fails on trees a hostile layer can
    build (see :func:`remove_tree`).
    """
    parent = os.open(path.parent, _DIR_READ)
    try:
        _clear(parent, path.name)
    finally:
        os.close(parent)


def walk_tree(dir_fd: int) -> Iterator[tuple[int, str, str, os.stat_result]]:
    """Every entry below ``dir_fd`` in pre-order, names sorted bytewise: (fd of its directory,
    path relative to ``dir_fd``, name, lstat). Never follows a symlink; the fd is valid until
    the next item.

    Unlike :func:`remove_tree` it keeps a descriptor per level (depth is bounded by
    RLIMIT_NOFILE): the tree may be a user's source directory that is renamed under us while
    we read it as root, and a walk back up by ``..`` could then leave it.
    """
    fds = [os.open(".", _DIR_READ, dir_fd=dir_fd)]
    levels = [("", iter(sorted(os.listdir(fds[0]), key=os.fsencode)))]
    try:
        while levels:
            prefix, names = levels[-1]
            name = next(names, None)
            if name is None:
                levels.pop()
                os.close(fds.pop())
                continue
            st = os.stat(name, dir_fd=fds[-1], follow_symlinks=False)
            yield fds[-1], prefix + name, name, st
            if stat.S_ISDIR(st.st_mode):
                fds.append(os.open(name, _DIR_READ | os.O_NOFOLLOW, dir_fd=fds[-1]))
                levels.append(
                    (f"{prefix}{name}/", iter(sorted(os.listdir(fds[-1]), key=os.fsencode)))
                )
    finally:
        for fd in fds:
            os.close(fd)


class Readable(Protocol):
    """What a file's content is read from (tarfile's member reader, a plain file)."""

    def read(self, size: int = -1, /) -> bytes: ...


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
        self._dir_times: list[tuple[tuple[str, ...], int]] = []
        # The last parent directory, kept open: archives list siblings together. Any removal
        # (the only way a resolved directory can stop being what its path names) drops it.
        self._parent: tuple[tuple[str, ...], int] | None = None
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
            self._directory_metadata(self._root, ".", entry)
            return
        self._create(self._parent_fd(entry.path[:-1]), entry.path[-1], entry, data)
        self._created.add(entry.path)

    def _parent_fd(self, parts: tuple[str, ...]) -> int:
        if self._parent is not None and self._parent[0] == parts:
            return self._parent[1]
        fd = self._open_dir(parts, create=True)
        self.close()
        self._parent = (parts, fd)
        return fd

    def _clear_anywhere(self, parent: int, name: str) -> None:
        """Remove something that may be an ancestor of the cached parent: drop the cache.

        (Replacing a child of the cached parent itself, as ``_create`` does, leaves it valid.)
        """
        self.close()
        _clear(parent, name)

    def close(self) -> None:
        """Close the cached parent directory (idempotent)."""
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

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
                _clear(parent, name)

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
                _clear(parent, name)
                os.mkdir(name, 0o700, dir_fd=parent)
        self._directory_metadata(parent, name, entry)

    def _is_dir(self, parts: tuple[str, ...]) -> bool:
        try:
            os.close(self._open(parts))
        except KernelError:
            return False
        return True

    def _directory_metadata(self, parent: int, name: str, entry: Entry) -> None:
        fd = os.open(name, _DIR_READ | os.O_NOFOLLOW, dir_fd=parent)
        try:
            os.fchown(fd, entry.uid, entry.gid)
            for key, value in entry.xattrs:
                os.setxattr(fd, key, value)
            os.fchmod(fd, entry.mode)
        finally:
            os.close(fd)
        # Later entries change the directory's mtime: it is set once all are written.
        self._dir_times.append((entry.path, entry.mtime_ns))

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
                _clear(parent, name)
            # No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself (linkat(2)).
            os.link(
                target, name, src_dir_fd=target_parent, dst_dir_fd=parent, follow_symlinks=False
            )
        finally:
            os.close(target_parent)

    def _whiteout(self, path: tuple[str, ...]) -> None:
        if path in self._created:
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
            for name in os.listdir(fd):
                if (*path, name) not in self._created:
                    self._clear_anywhere(fd, name)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Set directory mtimes, deepest and latest first, once nothing else changes them."""
        for path, mtime_ns in reversed(self._dir_times):
            if path and not self._is_dir(path):
                continue
            fd = self._open(path, _DIR_READ)
            try:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)


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


def _tar_members(stream: LayerStream) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Parse tar headers strictly, one at a time, without keeping them (stream order).

    Ends at the end-of-archive marker (two zero blocks). Stdlib ``TarFile.next`` stops
    silently at a bad header after the first member; we reject the archive instead.
    """
    if stream.peek(BLOCK) == bytes(BLOCK):
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
    while info is not None:
        # The archive object must not remember members: memory stays flat for any count.
        tar.members.clear()  # type: ignore[attr-defined]
        yield tar, info
        stream.seek(tar.offset)
        head = stream.peek(BLOCK)
        if len(head) < BLOCK:
            raise InvalidArchiveError(
                f"{stream.name}: truncated: no end-of-archive marker after {info.name!r}",
                details={"blob": stream.name, "entry": info.name},
            )
        if head == bytes(BLOCK):
            _check_end(stream)
            return
        # Global PAX headers ("g") patch every later member: only tarfile applies them.
        simple = None if tar.pax_headers else simple_tarinfo(head, tar.offset)
        if simple is not None:
            tar.offset = simple.offset_data + (
                _round_up(simple.size) if simple.type in _DATA_TYPES else 0
            )
            info = simple
            continue
        try:
            info = tarfile.TarInfo.fromtarfile(tar)
        except tarfile.TarError as exc:
            raise InvalidArchiveError(
                f"{stream.name}: bad tar header after {info.name!r}: {exc}",
                details={"blob": stream.name, "entry": info.name},
            ) from exc


# Header types that simple_tarinfo parses; their data follows for the regular ones only, as
# in tarfile's _proc_builtin (links, devices, directories and FIFOs carry none, whatever
# their size field says).
_SIMPLE_TYPES: Final = frozenset(b"01234567\0")
_DATA_TYPES: Final = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_BASE256: Final = (0o200, 0o377)
_CHKSUM_BLANKS: Final = 8 * ord(" ")


def simple_tarinfo(block: bytes, offset: int) -> tarfile.TarInfo | None:
    """The member a plain ustar/GNU header block at ``offset`` describes, or None.

    A fast path for the common header (no PAX or GNU long-name record before it, octal
    numbers, a plain type, an unsigned checksum that matches), built exactly as tarfile's
    ``frombuf`` and ``_proc_builtin`` would build it; every other header goes to tarfile,
    which also owns all error reporting. Parsing headers was 40% of an import's CPU time.
    """
    if block[156] not in _SIMPLE_TYPES:
        return None
    numbers = []
    for start, end in (
        (100, 108),
        (108, 116),
        (116, 124),
        (124, 136),
        (136, 148),
        (148, 156),
        (329, 337),
        (337, 345),
    ):
        field = block[start:end]
        if field[0] in _BASE256:
            return None
        try:
            numbers.append(int(field.split(b"\0", 1)[0].decode("ascii").strip() or "0", 8))
        except ValueError:
            return None
    mode, uid, gid, size, mtime, chksum, devmajor, devminor = numbers
    if chksum != sum(block) - sum(block[148:156]) + _CHKSUM_BLANKS:
        return None
    info = tarfile.TarInfo(_text(block[0:100]))
    info.mode, info.uid, info.gid, info.size, info.mtime = mode, uid, gid, size, mtime
    info.chksum = chksum
    info.type = block[156:157]
    info.linkname = _text(block[157:257])
    info.uname, info.gname = _text(block[265:297]), _text(block[297:329])
    info.devmajor, info.devminor = devmajor, devminor
    if info.type == tarfile.AREGTYPE and info.name.endswith("/"):
        info.type = tarfile.DIRTYPE  # old V7 directories
    if info.type == tarfile.DIRTYPE:
        info.name = info.name.rstrip("/")
    prefix = _text(block[345:500])
    if prefix:
        info.name = f"{prefix}/{info.name}"
    info.offset, info.offset_data = offset, offset + BLOCK
    return info


def _text(field: bytes) -> str:
    # tarfile.nts with the archive's default encoding (UTF-8, surrogateescape).
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _round_up(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _check_end(stream: LayerStream) -> None:
    if stream.read(2 * BLOCK) != bytes(2 * BLOCK):
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
) -> LayerResult:
    """Unpack the tar stream on ``fd`` into the directory ``root_fd``, in this process.

    The helper calls this with ``root_fd`` on the merged overlay (or the bare layer directory
    for a layer without parents); it is not meant for the daemon itself.

    Raises:
        InvalidArchiveError: corrupt, truncated or hostile archive, or a digest mismatch.
        LimitExceededError: beyond ``limits``.
        KernelError: the host failed while writing.
    """
    stream = LayerStream(fd, limits, name=name)
    try:
        entries, warnings, size = _unpack_members(stream, root_fd, limits, name)
        stream.finish()
    finally:
        stream.close()
    result = LayerResult(
        diff_id=stream.diff_id,
        compressed_digest=stream.compressed_digest,
        compression=stream.compression,
        size=size,
        entries=entries,
        warnings=warnings,
    )
    _check_digest(name, "diff_id", expected_diff_id, result.diff_id)
    _check_digest(name, "digest", expected_digest, result.compressed_digest)
    return result


def _unpack_members(
    stream: LayerStream, root_fd: int, limits: UnpackLimits, name: str
) -> tuple[int, tuple[str, ...], int]:
    """Plan and write every member: (entries, warnings, bytes written)."""
    writer = LayerWriter(root_fd, limits)
    warnings = _Warnings(limits.max_warnings)
    entries = 0
    try:
        for tar, info in _tar_members(stream):
            entries += 1
            if entries > limits.max_entries:
                raise LimitExceededError(
                    f"{name}: more than {limits.max_entries} entries",
                    details={"blob": name, "limit": "max_entries"},
                )
            plan = plan_entry(member_from_tarinfo(info))
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
    stream: LayerStream, tar: tarfile.TarFile, info: tarfile.TarInfo, entry: Entry
) -> Readable | None:
    if entry.kind is not EntryKind.FILE:
        return None
    if info.sparse is not None:
        return tar.extractfile(info)  # tarfile expands GNU sparse maps
    stream.seek(info.offset_data)
    return _Slice(stream, info.size)


def _check_digest(name: str, what: str, expected: str | None, actual: str) -> None:
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
    name: str = "layer",
) -> LayerResult:
    """Unpack the layer stream on ``source_fd`` into the empty directory ``dest``.

    ``parents`` are the layer directories below, lowest first (overlayfs lowerdirs). With
    parents, the exec'd helper mounts an overlay (lower = parents, upper = ``dest``) in its own
    mount namespace on ``work`` (an empty directory on the same filesystem as ``dest``) and
    unpacks into the merged view, so ``dest`` ends up holding overlayfs's representation of
    the layer: whiteouts as 0/0 character devices, opaque directories with the
    ``user.overlay.opaque`` xattr. Every overlay mount over such layers must pass ``userxattr``.
    The helper reads ``source_fd`` to its end; ``name`` names the blob in errors.

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
        source_fd=source_fd,
        parents=tuple(os.fspath(p) for p in parents),
        dest=os.fspath(dest),
        work=None if work is None else os.fspath(work),
        limits=limits,
        expected_diff_id=expected_diff_id,
        expected_digest=expected_digest,
    )
    try:
        return LayerResult.from_json(_run_helper(plan))
    except BaseException:
        _empty(dest)
        if work is not None:
            _empty(work)
        raise


def _run_helper(plan: UnpackPlan) -> Json:
    """Run the helper; the result record's payload, or the helper's error raised again."""
    proc = subprocess.run(
        [sys.executable, "-I", "-m", HELPER_MODULE],
        input=json.dumps(plan.to_json()).encode(),
        capture_output=True,
        pass_fds=(plan.source_fd,),
        check=False,
    )
    stderr = proc.stderr.decode(errors="replace").strip()
    if stderr:
        log.debug("layer helper stderr: %s", stderr)
    try:
        record = json.loads(proc.stdout)
    except ValueError:
        record = None
    if isinstance(record, dict) and "result" in record:
        result: Json = record["result"]
        return result
    if isinstance(record, dict) and isinstance(record.get("error"), dict):
        raise error_from_record(record["error"])
    raise SnapshotError(
        f"layer helper exited with status {proc.returncode} without a report",
        details={"returncode": proc.returncode, "stderr": stderr[-2000:]},
    )


def error_from_record(obj: dict[str, Json]) -> RuntimedError:
    """Rebuild the error the helper reported (its ``to_json()``) as the same class."""
    code, message = obj.get("code"), obj.get("message")
    details = obj.get("details")
    hint = obj.get("hint")
    text = message if isinstance(message, str) else "layer helper failed"
    extra = details if isinstance(details, dict) else {}
    cls = error_class_for_code(code if isinstance(code, str) else "")
    tip = hint if isinstance(hint, str) else None
    if issubclass(cls, KernelError):
        return KernelError(
            text,
            syscall=str(extra.get("syscall", "?")),
            errno_name=str(extra.get("errno", "?")),
            path=None if extra.get("path") is None else str(extra.get("path")),
            hint=tip,
        )
    error: RuntimedError = cls(text, details=extra, hint=tip)
    return error


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
            _clear(fd, name)
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
