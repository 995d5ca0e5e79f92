"""IO: the content-addressed snapshot store under the state directory (sync API).

Theory of operation
-------------------
A *layer* is one unpacked filesystem change set, stored once in overlayfs representation
(whiteouts are 0/0 character devices, opaque directories carry ``user.overlay.opaque``) under
``layers/<chain-id hex>/`` and keyed by its chain ID, so every snapshot whose history starts
with the same layers shares the directories. A *snapshot* is an ordered list of layers plus an
OCI image config; its id is the digest of that config (the image ID), which names the platform,
the execution defaults and every diff ID: the same content imported from a tarball, an OCI
layout or our own export gets the same id.

::

    state_dir/
      meta.db            SQLite (WAL): layers, snapshots, their layer lists, source keys, views
      store.lock         flock: shared while a Store is open, exclusive to reclaim garbage
      locks/<name>.lock  flocks: per chain ID (one unpack per layer, no gc under an import),
                         per tarball digest (src-<hex>), the tarball gate (tarballs, -turn)
      layers/<hex>/      unpacked layers, read-only after commit (overlay lowerdirs)
      blobs/<alg>/<hex>  compressed layer blobs as imported, kept for export
      staging/<tmp>/     work in progress, removed on success, failure or next open
      runs/<tmp>/        upper/ and work/ of runs (new_run_dir), removed by remove_run_dir

Crash safety: everything is built under ``staging/``, synced (``syncfs``), renamed into
``layers/`` or ``blobs/``, and only then recorded in one SQLite transaction. The invariants
are: a layer row exists only for a complete layer directory; a snapshot row and its layer list
are written in the same transaction, after all its layer rows. After ``kill -9`` at any point
the next :class:`Store` that finds itself alone (exclusive ``store.lock``) removes staging and
run directories, layer directories without a row, layers no snapshot uses and blobs no layer
uses (:meth:`Store.reclaim`).

Concurrency: an import takes the lock of each chain ID before looking for the layer and keeps it
until its snapshot is committed, so two imports of the same layer unpack it once and ``gc``
(which only takes free locks) never removes a layer an import is about to use. A layer's
helper unpacks while the store copies and hashes the blob into staging (:class:`_StagedBlob`).
A tarball's chain ID is known only once it is unpacked and its digest once it is copied, so
an import of a tarball unpacks during its copy only while no other one is in flight
(:meth:`Store._tarball_gate`); otherwise it copies, takes the lock of its digest, and looks
for the content before it unpacks.
"""

from __future__ import annotations

import builtins
import bz2
import contextlib
import datetime
import enum
import fcntl
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import sqlite3
import stat
import sys
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd
if TYPE_CHECKING:
    from _typeshed import SupportsWrite

from binfmt.platform import Platform, compatible, parse_platform, platform_from_uname
from runtimed.errors import (
    InternalError,
    InvalidArchiveError,
    Json,
    KernelError,
    LimitExceededError,
    PlatformError,
    SnapshotError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    UsageError,
)
from sandbox import fstree, layertar, oci, rootplatform, syscalls, view
from sandbox.archive import SNIFF_BYTES, Compression, UnpackLimits, sniff_compression
from sandbox.unpack import LayerHelper, copy_directory_layer

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR: Final = Path("/var/lib/runtimed")
SCHEMA_VERSION: Final = 1
CHUNK: Final = 1 << 20
# zlib's default level, as gzip(1) and Go's compress/gzip (hence containerd) use it: layers
# without a kept OCI blob are exported gzipped at this level.
EXPORT_GZIP_LEVEL: Final = 6
# Nested indexes are followed this deep, and at most this many manifests are considered.
MAX_INDEX_DEPTH: Final = 4
MAX_MANIFESTS: Final = 256
SHORT_ID: Final = 12
IDLE_CONNECTIONS: Final = 4
MIN_PREFIX: Final = 4
# Lock names are digests' hex, "src-<hex>", "snap-<hex>" or the tarball gate's; nothing else
# reaches the file system.
_LOCK_NAME_RE: Final = re.compile(r"[a-z0-9-]{1,140}")

_SCHEMA: Final = """
CREATE TABLE layers (
    chain_id TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    blob_digest TEXT,
    blob_compression TEXT,
    blob_size INTEGER
);
CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    config BLOB NOT NULL,
    platform TEXT NOT NULL,
    platform_source TEXT NOT NULL,
    source TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE snapshot_layers (
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    chain_id TEXT NOT NULL REFERENCES layers(chain_id),
    PRIMARY KEY (snapshot_id, position)
);
CREATE INDEX snapshot_layers_chain ON snapshot_layers(chain_id);
CREATE TABLE sources (
    key TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE
);
CREATE TABLE views (
    path TEXT PRIMARY KEY,
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id)
);
"""

# Media type of a kept blob by its compression; xz and bzip2 have none in OCI and are exported
# as gzip (Store._write_layer_blob).
_LAYER_MEDIA_TYPES: Final = {
    Compression.NONE: oci.OCI_LAYER_TAR,
    Compression.GZIP: oci.OCI_LAYER_GZIP,
    Compression.ZSTD: oci.OCI_LAYER_ZSTD,
}
# Readers of a whole compressed file (every gzip member, zstd frame, xz or bzip2 stream).
_DECOMPRESSORS: Final[Mapping[Compression, Callable[[Path], io.BufferedIOBase]]] = {
    Compression.GZIP: lambda path: gzip.GzipFile(path, "rb"),
    Compression.ZSTD: zstd.ZstdFile,
    Compression.XZ: lzma.LZMAFile,
    Compression.BZIP2: bz2.BZ2File,
}
_DECOMPRESS_ERRORS: Final = (OSError, EOFError, zlib.error, lzma.LZMAError, zstd.ZstdError)

Checkpoint = Callable[[str], None]
"""Called with the name of each crash-safety phase; tests kill the importer there."""
Progress = Callable[[str], None]


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerInfo:
    chain_id: str
    diff_id: str
    size: int
    entries: int
    blob_digest: str | None = None
    blob_compression: Compression | None = None
    blob_size: int | None = None

    def to_json(self) -> dict[str, Json]:
        return {
            "chain_id": self.chain_id,
            "diff_id": self.diff_id,
            "size": self.size,
            "entries": self.entries,
            "blob": self.blob_digest,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotInfo:
    """A stored snapshot. ``platform_source`` says how the platform was decided."""

    id: str
    platform: Platform
    platform_source: str
    layers: tuple[LayerInfo, ...]
    config: oci.ImageConfig
    created: str
    source: str

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def short_id(self) -> str:
        return oci.digest_hex(self.id)[:SHORT_ID]

    def to_json(self) -> dict[str, Json]:
        return {
            "id": self.id,
            "platform": str(self.platform),
            "platform_source": self.platform_source,
            "layers": [layer.to_json() for layer in self.layers],
            "config": self.config.to_json(),
            "created": self.created,
            "size": self.size,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class _NewLayer:
    """A layer unpacked in staging, before it is installed under its chain ID."""

    path: Path
    diff_id: str
    size: int
    entries: int
    blob: Path | None = None
    blob_digest: str | None = None
    blob_compression: Compression | None = None
    blob_size: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Resolved:
    """What an import source resolves to before any layer is unpacked."""

    config: bytes
    platform: Platform
    platform_source: str


# --- low-level helpers -------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _rmtree(path: Path) -> None:
    """Remove garbage of any depth (sandbox.fstree; shutil.rmtree recurses and a hostile layer
    nests deeper than Python's recursion limit). What cannot be removed now is reclaimed by
    the next store that opens alone."""
    try:
        fstree.remove_path(path)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _stat_identity(st: os.stat_result) -> str:
    return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"


def _copy_hashing(source: Path, blob: _StagedBlob) -> str:
    """Copy a regular file into ``blob`` and return its sha256 digest.

    Raises:
        SnapshotError: ``source`` is not a regular file (any more) or cannot be read.
    """
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SnapshotError(f"import {source}: not a regular file")
            return blob.copy_from(iter(functools.partial(src.read, CHUNK), b""))
    except OSError as exc:
        raise SnapshotError(f"import {source}: {exc.strerror}") from exc


class _StagedBlob:
    """The staging copy of a layer blob, which only the store writes, and the layer helper
    that unpacks it, started at once.

    The helper's source is a pipe the store fills from the blob as far as it has written it
    (with sendfile, from the page cache), so a helper that has its plan decodes while the
    store still copies and hashes (a Debian rootfs as tar.zst: ~80 ms to copy, ~400 ms to
    unpack). What the helper unpacks is then exactly what the store hashed. Writing never
    waits for the helper: the pipe takes what it has room for (a helper without a plan reads
    nothing), and :meth:`finish` sends the rest. A helper that has gone ends the sending; its
    report says why. The blob gets the mode open(..., "wb") gives (0666 less the umask).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._sent = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        read_fd, self._pipe = os.pipe2(os.O_CLOEXEC)
        try:
            os.set_blocking(self._pipe, False)
            with contextlib.suppress(OSError):  # a bigger pipe only means fewer wake-ups
                fcntl.fcntl(self._pipe, fcntl.F_SETPIPE_SZ, CHUNK)
            self.helper = LayerHelper(read_fd)
        except BaseException:
            os.close(self._pipe)
            os.close(self._fd)
            raise
        finally:
            # Only the helper may hold the read end: once it has gone, sending fails at once.
            os.close(read_fd)

    def __enter__(self) -> _StagedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.helper.close()
        self._end()
        os.close(self._fd)

    def copy_from(self, chunks: Iterable[bytes], algorithm: str = "sha256") -> str:
        """Append ``chunks`` to the blob and return their digest (``algorithm:hex``), in one
        pass: each chunk is hashed in a thread (hashlib releases the GIL) while it is written,
        a third faster for a large blob."""
        h = hashlib.new(algorithm)
        with ThreadPoolExecutor(1) as pool:
            hashed: Future[None] | None = None
            for chunk in chunks:
                if hashed is not None:
                    hashed.result()
                hashed = pool.submit(h.update, chunk)
                self.write(chunk)
            if hashed is not None:
                hashed.result()
        return f"{h.name}:{h.hexdigest()}"

    def write(self, data: bytes) -> None:
        """Append ``data`` to the blob, and send the helper what its pipe takes now."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)
        self._send()

    def finish(self) -> None:
        """Send the helper the rest of the blob, as fast as it reads, then end its stream."""
        if self._pipe >= 0:
            os.set_blocking(self._pipe, True)
            self._send()
            self._end()

    def _send(self) -> None:
        while self._sent < self.size and self._pipe >= 0:
            try:
                sent = os.sendfile(self._pipe, self._fd, self._sent, self.size - self._sent)
            except BlockingIOError:
                return
            except BrokenPipeError:
                self._end()
                return
            if not sent:  # only the store writes the blob: it cannot have shrunk
                raise InternalError(f"{self.path}: shorter than the {self.size} bytes written")
            self._sent += sent

    def _end(self) -> None:
        """End the helper's stream (idempotent)."""
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1


class _Gate:
    """A tarball import's hold on the store's gate (:meth:`Store._tarball_gate`): ``gate_fd``
    flocked exclusively at once if that was free without waiting (``alone``), else shared
    once the import has copied its tarball (:meth:`hold_content`).

    flock(2) turns an exclusive lock into a shared one by dropping it first, and another
    process may take it in that gap. So the exclusive holder also holds ``turn_fd``, which a
    candidate must get before it tries the gate, until its lock is shared.
    """

    def __init__(self, gate_fd: int, turn_fd: int) -> None:
        self._gate_fd, self._turn_fd = gate_fd, turn_fd
        self.alone = _flock_now(turn_fd, fcntl.LOCK_EX) and _flock_now(gate_fd, fcntl.LOCK_EX)
        if not self.alone:
            fcntl.flock(turn_fd, fcntl.LOCK_UN)

    def hold_content(
        self, held: contextlib.ExitStack[bool | None], lock: contextlib.AbstractContextManager[bool]
    ) -> None:
        """Take ``lock``, the lock of the import's content, into ``held``, and the gate
        shared. The import that holds the gate exclusively takes its content's lock first;
        any other waits for the gate first: so none takes the lock of a content before an
        import that began unpacking it during its copy."""
        if self.alone:
            held.enter_context(lock)
        fcntl.flock(self._gate_fd, fcntl.LOCK_SH)
        fcntl.flock(self._turn_fd, fcntl.LOCK_UN)
        if not self.alone:
            held.enter_context(lock)


def _flock_now(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _Member:
    """A byte range of an open file: a blob in a layout directory or inside a tar archive."""

    def __init__(self, fd: int, offset: int, size: int, name: str) -> None:
        self.fd, self.offset, self.size, self.name = fd, offset, size, name

    def chunks(self) -> Iterator[bytes]:
        done = 0
        while done < self.size:
            data = os.pread(self.fd, min(CHUNK, self.size - done), self.offset + done)
            if not data:
                raise InvalidArchiveError(f"{self.name}: truncated ({done} of {self.size} bytes)")
            done += len(data)
            yield data

    def read(self) -> bytes:
        return b"".join(self.chunks())


class _Archive:
    """The files of an image archive: a layout directory or an uncompressed tar of one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._members: dict[str, tuple[int, int]] | None = None
        if not stat.S_ISDIR(os.fstat(self._fd).st_mode):
            self._members = _index_tar(path)

    def close(self) -> None:
        os.close(self._fd)

    def _open(self, name: str) -> int:
        # A layout directory is untrusted input too: never follow a symlink out of it.
        return syscalls.openat2(
            self._fd,
            name,
            os.O_RDONLY | os.O_NONBLOCK,
            syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS,
        )

    @contextlib.contextmanager
    def member(self, name: str) -> Iterator[_Member]:
        """Raises: InvalidArchiveError: the archive has no regular file ``name``."""
        if self._members is not None:
            if name not in self._members:
                raise InvalidArchiveError(f"{self.path}: no {name} in the archive")
            offset, size = self._members[name]
            yield _Member(self._fd, offset, size, name)
            return
        try:
            fd = self._open(name)
        except (KernelError, OSError) as exc:
            raise InvalidArchiveError(f"{self.path}: cannot open {name}: {exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArchiveError(f"{self.path}: {name} is not a regular file")
            yield _Member(fd, 0, st.st_size, name)
        finally:
            os.close(fd)

    def read_small(self, name: str) -> bytes:
        with self.member(name) as m:
            if m.size > oci.MAX_DOCUMENT_SIZE:
                raise InvalidArchiveError(f"{name}: {m.size} bytes, too big for a document")
            return m.read()

    def read_blob(self, desc: oci.Descriptor, *, what: str) -> bytes:
        """A small blob (index, manifest, config), read whole and verified."""
        if desc.size > oci.MAX_DOCUMENT_SIZE:
            raise InvalidArchiveError(f"{what}: {desc.size} bytes, too big for a document")
        data = self.read_small(blob_name(desc.digest))
        oci.verify_blob(data, desc.digest, desc.size, what=what)
        return data


def blob_name(digest: str) -> str:
    return f"blobs/{oci.digest_algorithm(digest)}/{oci.digest_hex(digest)}"


_ARCHIVE_NAME_RE: Final = re.compile(
    r"oci-layout|index\.json|manifest\.json|repositories|blobs|blobs/(sha256|sha512)"
    r"|blobs/(sha256|sha512)/[0-9a-f]+|[0-9a-f]{64}(\.json|\.tar|/|/layer\.tar|/json|/VERSION)?"
)


def _member_name(name: str) -> str:
    return name.removeprefix("./").rstrip("/")


def _index_tar(path: Path) -> dict[str, tuple[int, int]]:
    """Name -> (data offset, size) of the regular files of an uncompressed image archive.

    Raises:
        InvalidArchiveError: not a tar archive, duplicate names, links or special files.
    """
    out: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                name = _member_name(info.name)
                if not info.isreg():
                    continue  # directories; docker save's legacy <id>/layer.tar symlinks
                if name in out:
                    raise InvalidArchiveError(f"{path}: {info.name} appears twice")
                out[name] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidArchiveError(f"{path}: not a readable tar archive: {exc}") from exc
    return out


def sniff_image_archive(path: Path) -> str | None:
    """``"oci"`` or ``"docker"`` for a tar holding an image layout or ``docker save`` output,
    None for a root filesystem tarball. Stops at the first member a layout cannot hold, so a
    rootfs tarball costs one header read.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if len(head) < 512 or head[257:262] != b"ustar":
        return None  # compressed or not a tar: a rootfs tarball for the unpacker to judge
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                name = _member_name(info.name)
                if name in ("", "."):
                    continue
                if not _ARCHIVE_NAME_RE.fullmatch(name):
                    return None
                seen.add(name)
    except (tarfile.TarError, EOFError):
        return None
    if {"oci-layout", "index.json"} <= seen:
        return "oci"
    if "manifest.json" in seen:
        return "docker"
    return None


def _file_compression(path: Path) -> Compression:
    """The compression of the file ``path``, by its first bytes."""
    with open(path, "rb") as f:
        return sniff_compression(f.read(SNIFF_BYTES))


def _starts_like_image_archive(path: Path, compression: Compression) -> bool:
    """Whether the compressed tar ``path`` may hold an image layout or ``docker save`` output:
    its first member (past ``.``) has a name only such an archive holds. Decompresses only
    that far, so a compressed rootfs tarball costs its first block.
    """
    try:
        with _DECOMPRESSORS[compression](path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for info in tar:
                name = _member_name(info.name)
                if name not in ("", "."):
                    return _ARCHIVE_NAME_RE.fullmatch(name) is not None
    except (tarfile.TarError, *_DECOMPRESS_ERRORS):
        pass  # not a readable tar: a rootfs tarball for the unpacker to judge and report
    return False


def _decompress_archive(source: Path, compression: Compression, dest: Path, limit: int) -> None:
    """Write the decompressed image archive ``source`` to ``dest``, at most ``limit`` bytes.

    Raises:
        InvalidArchiveError: corrupt or truncated compressed data.
        LimitExceededError: more than ``limit`` uncompressed bytes.
    """
    written = 0
    try:
        with _DECOMPRESSORS[compression](source) as data, open(dest, "wb") as out:
            while chunk := data.read(CHUNK):
                written += len(chunk)
                if written > limit:
                    raise LimitExceededError(
                        f"{source}: more than {limit} uncompressed bytes",
                        details={"source": str(source), "limit": "max_bytes"},
                    )
                out.write(chunk)
    except _DECOMPRESS_ERRORS as exc:
        raise InvalidArchiveError(
            f"{source} ({compression}): corrupt image archive: {exc}",
            details={"source": str(source), "compression": str(compression)},
        ) from exc


# --- the store ---------------------------------------------------------------------------------


class Store:
    """The snapshot store at ``state_dir`` (created if missing). Close it, or use ``with``.

    Args:
        state_dir: where layers, blobs and ``meta.db`` live.
        limits: bounds for every layer unpacked.
        host: the platform a single-component ``--platform`` is completed from, and the
            default when an image index offers several and the caller asked for none.
        checkpoint: called with each crash-safety phase name (fault injection in tests).

    Raises:
        SnapshotError: the state directory is unusable or its schema is newer than ours.
    """

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        *,
        limits: UnpackLimits | None = None,
        host: Platform | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.limits = limits or UnpackLimits()
        self.host = host or platform_from_uname(os.uname().machine)
        self._checkpoint = checkpoint or (lambda _phase: None)
        self._pool: builtins.list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self.layers_dir = state_dir / "layers"
        self.blobs_dir = state_dir / "blobs"
        self.staging_dir = state_dir / "staging"
        self.runs_dir = state_dir / "runs"
        self.locks_dir = state_dir / "locks"
        try:
            for d in (self.layers_dir, self.staging_dir, self.runs_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
            for alg in ("sha256", "sha512"):
                (self.blobs_dir / alg).mkdir(parents=True, exist_ok=True)
            self._store_lock = os.open(
                state_dir / "store.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise SnapshotError(
                f"open snapshot store {state_dir}: {exc.strerror}",
                details={"state_dir": str(state_dir)},
                hint="the state directory must be writable (run as root or pass --state-dir)",
            ) from exc
        self._init_schema()
        try:
            fcntl.flock(self._store_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another process has the store open: it reclaimed at its own start
        else:
            self.reclaim()
        fcntl.flock(self._store_lock, fcntl.LOCK_SH)

    def close(self) -> None:
        with self._pool_lock:
            for conn in self._pool:
                conn.close()
            self._pool.clear()
        os.close(self._store_lock)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- database ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A pooled connection (the daemon calls in from several worker threads, which come
        and go), inside one transaction when ``write``. At most :data:`IDLE_CONNECTIONS` stay
        open between calls."""
        with self._pool_lock:
            conn = self._pool.pop() if self._pool else None
        if conn is None:
            conn = sqlite3.connect(
                self.state_dir / "meta.db",
                timeout=30,
                isolation_level=None,
                check_same_thread=False,  # one thread at a time, handed over by the pool
            )
            conn.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL: a commit survives a killed process; after a power loss the last
            # ones may roll back, which leaves only layer directories that reclaim() removes.
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            if not write:
                yield conn
            else:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            with self._pool_lock:
                if len(self._pool) < IDLE_CONNECTIONS:
                    self._pool.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def _init_schema(self) -> None:
        with self._db() as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute("BEGIN IMMEDIATE")
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            elif version != SCHEMA_VERSION:
                raise SnapshotError(
                    f"snapshot store {self.state_dir}: schema version {version}, "
                    f"this runtimed reads {SCHEMA_VERSION}",
                    details={"schema_version": version},
                )

    # --- locks and staging ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, name: str, *, wait: bool = True, shared: bool = False) -> Iterator[bool]:
        """Hold ``locks/<name>.lock``; yields False (not holding) when ``wait`` is off and
        another holder has it. Lock files are never deleted while the store is shared."""
        fd = self._lock_fd(name)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _lock_fd(self, name: str) -> int:
        """An open ``locks/<name>.lock`` to flock."""
        if not _LOCK_NAME_RE.fullmatch(name):
            raise InternalError(f"bad lock name {name!r}")
        return os.open(
            self.locks_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(dir=self.staging_dir))
        try:
            yield path
        finally:
            _rmtree(path)

    def _layer_path(self, chain_id: str) -> Path:
        return self.layers_dir / oci.digest_hex(chain_id)

    def _blob_path(self, digest: str) -> Path:
        return self.blobs_dir / oci.digest_algorithm(digest) / oci.digest_hex(digest)

    # --- reading metadata ----------------------------------------------------------------------

    def _resolve_id(self, conn: sqlite3.Connection, ref: str) -> str:
        text = ref.removeprefix("sha256:")
        if not re.fullmatch(f"[0-9a-f]{{{MIN_PREFIX},64}}", text):
            raise UsageError(
                f"snapshot id {ref!r}: expected at least {MIN_PREFIX} hex digits",
                details={"id": ref},
            )
        rows = conn.execute(
            "SELECT id FROM snapshots WHERE id >= ? AND id < ?",
            (f"sha256:{text}", f"sha256:{text}g"),
        ).fetchall()
        if not rows:
            raise SnapshotNotFoundError(f"no snapshot {ref}", details={"id": ref})
        if len(rows) > 1:
            raise UsageError(f"snapshot id {ref!r} is ambiguous", details={"id": ref})
        return str(rows[0][0])

    def _info(self, conn: sqlite3.Connection, snapshot_id: str) -> SnapshotInfo:
        row = conn.execute(
            "SELECT config, platform, platform_source, source, created FROM snapshots WHERE id = ?",
            (snapshot_id,),
        ).fetchone()
        if row is None:
            raise SnapshotNotFoundError(f"no snapshot {snapshot_id}", details={"id": snapshot_id})
        layers = conn.execute(
            "SELECT l.chain_id, l.diff_id, l.size, l.entries, l.blob_digest, "
            "l.blob_compression, l.blob_size FROM snapshot_layers s "
            "JOIN layers l ON l.chain_id = s.chain_id WHERE s.snapshot_id = ? "
            "ORDER BY s.position",
            (snapshot_id,),
        ).fetchall()
        config = oci.parse_config(row[0], what=f"snapshot {snapshot_id} config")
        return SnapshotInfo(
            id=snapshot_id,
            platform=config.platform,
            platform_source=row[2],
            layers=tuple(
                LayerInfo(
                    chain_id=c,
                    diff_id=d,
                    size=s,
                    entries=e,
                    blob_digest=b,
                    blob_compression=None if bc is None else Compression(bc),
                    blob_size=bs,
                )
                for c, d, s, e, b, bc, bs in layers
            ),
            config=config.config,
            created=row[4],
            source=row[3],
        )

    def get(self, ref: str) -> SnapshotInfo:
        """The snapshot whose id is ``ref`` (with or without ``sha256:``, or a unique prefix).

        Raises:
            SnapshotNotFoundError: no such snapshot.
            UsageError: ``ref`` is malformed or ambiguous.
        """
        with self._db() as conn:
            return self._info(conn, self._resolve_id(conn, ref))

    def resolve(self, ref: str) -> str:
        """The id of the snapshot ``ref`` names (as :meth:`get`, one indexed query).

        Raises:
            SnapshotNotFoundError: no such snapshot.
            UsageError: ``ref`` is malformed or ambiguous.
        """
        with self._db() as conn:
            return self._resolve_id(conn, ref)

    def count(self) -> int:
        """How many snapshots the store holds (one query, unlike ``len(list())``)."""
        with self._db() as conn:
            (n,) = conn.execute("SELECT count(*) FROM snapshots").fetchone()
            return int(n)

    def list(self) -> builtins.list[SnapshotInfo]:
        with self._db() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM snapshots ORDER BY created, id")]
            return [self._info(conn, i) for i in ids]

    def config_blob(self, ref: str) -> bytes:
        """The snapshot's image config, byte for byte as imported.

        Raises:
            SnapshotNotFoundError: no such snapshot.
        """
        with self._db() as conn:
            row = conn.execute(
                "SELECT config FROM snapshots WHERE id = ?", (self._resolve_id(conn, ref),)
            ).fetchone()
            return bytes(row[0])

    def layer_paths(self, snapshot_id: str) -> builtins.list[Path]:
        """The layer directories of a snapshot, lowest first (overlayfs lists them reversed).

        Raises:
            SnapshotNotFoundError: no such snapshot.
        """
        return [self._layer_path(layer.chain_id) for layer in self.get(snapshot_id).layers]

    # --- import --------------------------------------------------------------------------------

    def import_source(
        self,
        source: Path,
        *,
        platform: str | None = None,
        progress: Progress | None = None,
        name: str | None = None,
    ) -> SnapshotInfo:
        """Import a directory, a rootfs tarball, an OCI layout (directory or tar) or a
        ``docker save`` archive; tars may be compressed (told apart by content, not by name).
        A second import of the same content is a lookup.

        Args:
            source: what to import.
            platform: for an image with an index, the platform to pick (default: the host's);
                for a tarball or a directory, the platform to record instead of detecting it.
            progress: called with one line per step.
            name: what to record as the snapshot's source (default: ``source``), e.g. the
                client's path of a file the daemon reads through ``/proc/self/fd/N``.

        Raises:
            InvalidArchiveError: the source is corrupt, hostile or fails a digest check.
            PlatformError: ``platform`` is malformed, or none can be detected.
            LimitExceededError: a layer is beyond the configured limits.
            SnapshotError: the source cannot be read.
        """
        wanted = None if platform is None else parse_platform(platform, host=self.host)
        say = progress or (lambda _line: None)
        try:
            return self._import(source, wanted, say, name or str(source))
        except OSError as exc:
            raise SnapshotError(
                f"import {source}: {exc.strerror or exc}", details={"source": str(source)}
            ) from exc

    def _import(
        self, source: Path, wanted: Platform | None, say: Progress, label: str
    ) -> SnapshotInfo:
        st = os.stat(source)
        if stat.S_ISDIR(st.st_mode):
            if (source / "oci-layout").exists():
                return self._import_image(source, wanted, say, label)
            return self._import_directory(source, wanted, say, label)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"import {source}: not a regular file or a directory")
        kind = sniff_image_archive(source)
        if kind == "oci":
            return self._import_image(source, wanted, say, label)
        if kind == "docker":
            return self._import_docker(source, wanted, say, label)
        compression = _file_compression(source)
        if compression is not Compression.NONE and _starts_like_image_archive(source, compression):
            # An image archive is read by random access: decompress it once into staging.
            with self._staging() as tmp:
                plain = tmp / "archive.tar"
                say(f"decompressing {source}")
                _decompress_archive(source, compression, plain, self.limits.max_bytes)
                kind = sniff_image_archive(plain)
                if kind == "oci":
                    return self._import_image(plain, wanted, say, label)
                if kind == "docker":
                    return self._import_docker(plain, wanted, say, label)
        return self._import_tarball(source, wanted, say, label)

    def _lookup_source(self, key: str) -> SnapshotInfo | None:
        with self._db() as conn:
            row = conn.execute("SELECT snapshot_id FROM sources WHERE key = ?", (key,)).fetchone()
            return None if row is None else self._info(conn, row[0])

    def _lookup(self, snapshot_id: str) -> SnapshotInfo | None:
        with contextlib.suppress(SnapshotNotFoundError), self._db() as conn:
            return self._info(conn, snapshot_id)
        return None

    def _import_tarball(
        self, source: Path, wanted: Platform | None, say: Progress, label: str
    ) -> SnapshotInfo:
        # The same file, unchanged since an earlier import, is a lookup without reading it: the
        # key holds its inode, size, mtime and ctime, and ctime moves on every change to the
        # file and cannot be set from user space (as git's index and ccache rely on).
        before = os.stat(source)
        file_key = f"file {source.resolve()} {_stat_identity(before)} {wanted or ''}"
        found = self._lookup_source(file_key)
        if found is not None:
            return found
        with self._staging() as tmp, self._tarball_gate() as gate, contextlib.ExitStack() as held:
            blob = held.enter_context(_StagedBlob(tmp / "blob"))
            say(f"{'unpacking' if gate.alone else 'copying'} {source}")
            unpacked = None
            if gate.alone:  # no other tarball import is past its copy: unpack during this one
                unpacked = held.enter_context(self._unpacking(tmp, blob, parents=[], diff_id=None))
            digest = _copy_hashing(source, blob)
            self._checkpoint("copied")
            keys = [f"tarball {digest} {wanted or ''}"]
            if _stat_identity(os.stat(source)) == _stat_identity(before):
                keys.append(file_key)
            gate.hold_content(held, self._lock("src-" + oci.digest_hex(digest)))
            found = self._lookup_source(keys[0])
            if found is not None:  # the same content, from another file
                self._add_sources(found.id, keys)
                return found
            if unpacked is None:
                say(f"unpacking {source}")
                unpacked = held.enter_context(self._unpacking(tmp, blob, parents=[], diff_id=None))
            new = unpacked(digest)
            layer = self._install_layer(held, new, chain_id=new.diff_id)
            resolved = self._tarball_config(self._layer_path(layer.chain_id), layer, wanted)
            return self._commit(resolved, [layer], source=label, source_keys=keys)

    @contextlib.contextmanager
    def _tarball_gate(self) -> Iterator[_Gate]:
        """The gate of tarball imports: exclusive (``alone``) for the one that may unpack
        during its copy, shared by every other from the end of its copy to its end.

        A tarball's digest, hence its ``src-<digest>`` lock, is known only once it is copied,
        so an import that unpacks during its copy cannot yet know whether another import of
        the same content is in flight; the issue asks that two of them unpack it once. So one
        unpacks during its copy only if it got the gate exclusively without waiting (no other
        import between its copy and its end), and keeps it so until it holds its ``src-`` lock
        (:meth:`_Gate.hold_content`). Any other import copies first, then waits for the gate
        (at most the rest of that one's copy), takes its ``src-`` lock and unpacks only if the
        content is not stored by then. Costs: an import of content stored under another file
        name, alone, drops the unpack begun during its copy; a copy from a slow file delays
        the unpacks, not the copies, of imports that arrive meanwhile. Imports of images take
        the chain locks before they copy a layer and do not need the gate.
        """
        gate, turn = self._lock_fd("tarballs"), self._lock_fd("tarballs-turn")
        try:
            yield _Gate(gate, turn)
        finally:
            os.close(turn)
            os.close(gate)

    def _add_sources(self, snapshot_id: str, keys: Sequence[str]) -> None:
        with self._db(write=True) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO sources VALUES (?, ?)", [(k, snapshot_id) for k in keys]
            )

    def _import_directory(
        self, source: Path, wanted: Platform | None, say: Progress, label: str
    ) -> SnapshotInfo:
        say(f"copying {source}")
        with contextlib.ExitStack() as held, self._staging() as tmp:
            dest = tmp / "layer"
            dest.mkdir()
            src_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                result = copy_directory_layer(src_fd, dest, self.limits)
            finally:
                os.close(src_fd)
            # The diff ID is that of the tar export re-creates from the stored directory.
            tar = layertar.write_layer(dest)
            new = _NewLayer(path=dest, diff_id=tar.digest, size=result.size, entries=result.entries)
            layer = self._install_layer(held, new, chain_id=new.diff_id)
            resolved = self._tarball_config(self._layer_path(layer.chain_id), layer, wanted)
            return self._commit(resolved, [layer], source=label, source_keys=())

    def _tarball_config(self, root: Path, layer: LayerInfo, wanted: Platform | None) -> _Resolved:
        if wanted is not None:
            platform, why = wanted, "set by the caller"
        else:
            detected = detect_root_platform(root)
            if detected is None:
                raise PlatformError(
                    "cannot detect the platform: no ELF binary among /bin/sh, /bin/busybox "
                    "and the dynamic loaders",
                    hint="pass the platform explicitly, e.g. --platform linux/arm64",
                )
            platform, why = detected.platform, detected.reason
        config = oci.format_config(
            platform=platform, config=oci.ImageConfig(), diff_ids=[layer.diff_id]
        )
        return _Resolved(config=config, platform=platform, platform_source=why)

    @contextlib.contextmanager
    def _unpacking(
        self,
        tmp: Path,
        blob: _StagedBlob,
        *,
        parents: Sequence[Path],
        diff_id: str | None,
        sha256_by_store: bool = True,
    ) -> Iterator[Callable[[str], _NewLayer]]:
        """Give ``blob``'s helper its plan: it unpacks the blob into ``tmp/layer`` while the
        caller goes on (it may still be writing the blob). Yields the call that waits for the
        layer, given the blob's digest as the store computed it while writing. With
        ``sha256_by_store`` that is the blob's sha256 and the helper does not hash the
        compressed bytes again (~80 ms of CPU per 85 MiB of tar.zst); otherwise (a digest of
        another algorithm) the helper's sha256 names the blob. A helper still at work when the
        caller leaves without its layer is killed."""
        dest, work = tmp / "layer", tmp / "work"
        dest.mkdir()
        work.mkdir()
        self._checkpoint("unpacking")
        with ThreadPoolExecutor(1, thread_name_prefix="layer-apply") as pool:
            applied = pool.submit(
                blob.helper.apply,
                parents=parents,
                dest=dest,
                work=work,
                limits=self.limits,
                expected_diff_id=diff_id,
                hash_compressed=not sha256_by_store,
            )

            def unpacked(digest: str) -> _NewLayer:
                blob.finish()
                result = applied.result()
                self._checkpoint("unpacked")
                helper_digest = result.compressed_digest
                if sha256_by_store and helper_digest not in (None, digest):
                    raise InternalError(
                        f"{blob.path}: the helper read {helper_digest}, the store wrote {digest}"
                    )
                return _NewLayer(
                    path=dest,
                    diff_id=result.diff_id,
                    size=result.size,
                    entries=result.entries,
                    blob=blob.path,
                    blob_digest=digest if sha256_by_store else helper_digest,
                    blob_compression=result.compression,
                    blob_size=blob.size,
                )

            try:
                yield unpacked
            finally:
                blob.helper.kill()

    def _install_layer(
        self, held: contextlib.ExitStack[bool | None] | None, new: _NewLayer, *, chain_id: str
    ) -> LayerInfo:
        """Make a staged layer the one stored under ``chain_id`` (or drop it for the one
        already there). Takes the chain lock into ``held`` unless the caller holds it (None)."""
        if held is not None:
            held.enter_context(self._lock(oci.digest_hex(chain_id)))
        existing = self._layer_row(chain_id)
        if existing is not None:
            return existing
        final = self._layer_path(chain_id)
        if final.exists():  # left by an import killed between rename and commit
            _rmtree(final)
        if new.blob is not None and new.blob_digest is not None:
            blob_final = self._blob_path(new.blob_digest)
            if not blob_final.exists():
                os.rename(new.blob, blob_final)
        dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Flush the store's file system before metadata points at the new files.
            syscalls.syncfs(dir_fd)
            self._checkpoint("synced")
            os.rename(new.path, final)
            self._checkpoint("renamed")
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        info = LayerInfo(
            chain_id=chain_id,
            diff_id=new.diff_id,
            size=new.size,
            entries=new.entries,
            blob_digest=new.blob_digest,
            blob_compression=new.blob_compression,
            blob_size=new.blob_size,
        )
        with self._db(write=True) as conn:
            conn.execute(
                "INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    chain_id,
                    new.diff_id,
                    new.size,
                    new.entries,
                    new.blob_digest,
                    None if new.blob_compression is None else str(new.blob_compression),
                    new.blob_size,
                ),
            )
        self._checkpoint("layer-committed")
        return info

    def _layer_row(self, chain_id: str) -> LayerInfo | None:
        with self._db() as conn:
            row = conn.execute(
                "SELECT diff_id, size, entries, blob_digest, blob_compression, blob_size "
                "FROM layers WHERE chain_id = ?",
                (chain_id,),
            ).fetchone()
        if row is None:
            return None
        return LayerInfo(
            chain_id=chain_id,
            diff_id=row[0],
            size=row[1],
            entries=row[2],
            blob_digest=row[3],
            blob_compression=None if row[4] is None else Compression(row[4]),
            blob_size=row[5],
        )

    def _commit(
        self,
        resolved: _Resolved,
        layers: Sequence[LayerInfo],
        *,
        source: str,
        source_keys: Sequence[str],
    ) -> SnapshotInfo:
        snapshot_id = oci.sha256_digest(resolved.config)
        with self._db(write=True) as conn:
            inserted = conn.execute(
                "INSERT OR IGNORE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
                (
                    snapshot_id,
                    resolved.config,
                    str(resolved.platform),
                    resolved.platform_source,
                    source,
                    _now(),
                ),
            ).rowcount
            if inserted:
                conn.executemany(
                    "INSERT INTO snapshot_layers VALUES (?, ?, ?)",
                    [(snapshot_id, i, layer.chain_id) for i, layer in enumerate(layers)],
                )
            conn.executemany(
                "INSERT OR REPLACE INTO sources VALUES (?, ?)",
                [(key, snapshot_id) for key in source_keys],
            )
        self._checkpoint("snapshot-committed")
        with self._db() as conn:
            info = self._info(conn, snapshot_id)
        log.info("snapshot %s imported from %s (%s)", info.short_id, source, info.platform)
        return info

    # --- OCI and docker archives ---------------------------------------------------------------

    def _manifests(
        self, archive: _Archive, index: oci.Index, depth: int, out: builtins.list[oci.Descriptor]
    ) -> None:
        """Flatten nested indexes into manifest descriptors with their platform filled in."""
        for desc in index.manifests:
            if len(out) >= MAX_MANIFESTS:
                raise InvalidArchiveError(f"image index lists more than {MAX_MANIFESTS} manifests")
            if desc.media_type in oci.INDEX_TYPES:
                if depth >= MAX_INDEX_DEPTH:
                    raise InvalidArchiveError(f"image indexes nested deeper than {MAX_INDEX_DEPTH}")
                nested = archive.read_blob(desc, what=f"index {desc.digest}")
                self._manifests(archive, oci.parse_index(nested, what=desc.digest), depth + 1, out)
            elif desc.media_type in oci.MANIFEST_TYPES:
                if desc.platform is None:
                    manifest = oci.parse_manifest(archive.read_blob(desc, what=desc.digest))
                    config = oci.parse_config(archive.read_blob(manifest.config, what="config"))
                    desc = oci.Descriptor(
                        media_type=desc.media_type,
                        digest=desc.digest,
                        size=desc.size,
                        platform=config.platform,
                    )
                out.append(desc)
            # Other entries (attestations, signatures) are not images: skipped.

    def _import_image(
        self, source: Path, wanted: Platform | None, say: Progress, label: str
    ) -> SnapshotInfo:
        archive = _Archive(source)
        try:
            oci.check_oci_layout(archive.read_small("oci-layout"))
            candidates: list[oci.Descriptor] = []
            self._manifests(
                archive, oci.parse_index(archive.read_small("index.json")), 0, candidates
            )
            if not candidates:
                raise InvalidArchiveError(f"{source}: the image index lists no image manifest")
            pick = wanted or self.host
            if wanted is None and len({d.platform for d in candidates}) == 1:
                selection = oci.Selection(
                    descriptor=candidates[0], reason="the only platform in the image"
                )
            else:
                selection = oci.select_manifest(candidates, pick)
            desc = selection.descriptor
            manifest = oci.parse_manifest(archive.read_blob(desc, what=f"manifest {desc.digest}"))
            config_bytes = archive.read_blob(manifest.config, what="image config")
            config = oci.parse_config(config_bytes)
            oci.check_manifest_matches_config(manifest, config, what=f"manifest {desc.digest}")
            if desc.platform is not None and desc.platform != config.platform:
                raise InvalidArchiveError(
                    f"manifest {desc.digest}: the index says {desc.platform}, "
                    f"its config says {config.platform}"
                )
            if wanted is not None and not compatible(wanted, config.platform):
                raise InvalidArchiveError(
                    f"{source}: the image is for {config.platform}, not {wanted}",
                    details={"platform": str(config.platform)},
                )
            reason = f"from the image index: {selection.reason}"
            resolved = _Resolved(
                config=config_bytes, platform=config.platform, platform_source=reason
            )
            layers = [(blob_name(d.digest), d.digest, d.size) for d in manifest.layers]
            return self._import_layers(archive, resolved, config, layers, label, say)
        finally:
            archive.close()

    def _import_docker(
        self, source: Path, wanted: Platform | None, say: Progress, label: str
    ) -> SnapshotInfo:
        archive = _Archive(source)
        try:
            entries = json.loads(archive.read_small("manifest.json"))
            if not isinstance(entries, list) or not entries:
                raise InvalidArchiveError(f"{source}: manifest.json: expected a non-empty list")
            images: list[tuple[bytes, oci.ConfigFile, list[str]]] = []
            for i, entry in enumerate(entries[:MAX_MANIFESTS]):
                where = f"manifest.json[{i}]"
                if not isinstance(entry, dict):
                    raise InvalidArchiveError(f"{where}: expected an object")
                config_name = entry.get("Config")
                layer_names = entry.get("Layers")
                if not isinstance(config_name, str) or not isinstance(layer_names, list):
                    raise InvalidArchiveError(f"{where}: Config and Layers are required")
                if not all(isinstance(n, str) for n in layer_names):
                    raise InvalidArchiveError(f"{where}.Layers: expected strings")
                config_bytes = archive.read_small(_member_name(config_name))
                _check_named_digest(config_name, config_bytes)
                config = oci.parse_config(config_bytes, what=f"{where}.Config")
                images.append((config_bytes, config, [_member_name(n) for n in layer_names]))
            candidates = [
                oci.Descriptor(
                    media_type=oci.OCI_MANIFEST,
                    digest=oci.sha256_digest(c),
                    size=len(c),
                    platform=cf.platform,
                )
                for c, cf, _ in images
            ]
            if len(images) == 1 and wanted is None:
                chosen, reason = 0, "the only image in the archive"
            else:
                selection = oci.select_manifest(candidates, wanted or self.host)
                chosen, reason = candidates.index(selection.descriptor), selection.reason
            config_bytes, config, names = images[chosen]
            if len(names) != len(config.diff_ids):
                raise InvalidArchiveError(
                    f"manifest.json[{chosen}]: {len(names)} layers, config lists "
                    f"{len(config.diff_ids)} diff_ids"
                )
            if wanted is not None and not compatible(wanted, config.platform):
                raise InvalidArchiveError(f"{source}: the image is for {config.platform}")
            resolved = _Resolved(
                config=config_bytes,
                platform=config.platform,
                platform_source=f"from the image config: {reason}",
            )
            layers: list[tuple[str, str | None, int | None]] = [(n, None, None) for n in names]
            return self._import_layers(archive, resolved, config, layers, label, say)
        finally:
            archive.close()

    def _import_layers(
        self,
        archive: _Archive,
        resolved: _Resolved,
        config: oci.ConfigFile,
        layers: Sequence[tuple[str, str | None, int | None]],
        label: str,
        say: Progress,
    ) -> SnapshotInfo:
        """Unpack (or find) each layer in order under its chain lock, then commit."""
        found = self._lookup(oci.sha256_digest(resolved.config))
        if found is not None:
            return found
        chains = oci.chain_ids(config.diff_ids)
        installed: list[LayerInfo] = []
        with contextlib.ExitStack() as held:
            for i, ((name, digest, size), chain_id) in enumerate(zip(layers, chains, strict=True)):
                held.enter_context(self._lock(oci.digest_hex(chain_id)))
                existing = self._layer_row(chain_id)
                if existing is not None:
                    say(f"layer {i + 1}/{len(layers)} {chain_id[:19]} already stored")
                    installed.append(existing)
                    continue
                say(f"layer {i + 1}/{len(layers)} {chain_id[:19]} unpacking")
                # The chain lock is held: the helper unpacks while the blob is copied.
                sha256 = digest is None or oci.digest_algorithm(digest) == "sha256"
                with (
                    self._staging() as tmp,
                    _StagedBlob(tmp / "blob") as blob,
                    self._unpacking(
                        tmp,
                        blob,
                        parents=[self._layer_path(layer.chain_id) for layer in installed],
                        diff_id=config.diff_ids[i],
                        sha256_by_store=sha256,
                    ) as unpacked,
                ):
                    copied = self._copy_member(archive, name, blob, digest=digest, size=size)
                    new = unpacked(copied)
                    installed.append(self._install_layer(None, new, chain_id=chain_id))
            return self._commit(resolved, installed, source=label, source_keys=())

    @staticmethod
    def _copy_member(
        archive: _Archive, name: str, blob: _StagedBlob, *, digest: str | None, size: int | None
    ) -> str:
        """Copy a blob out of the archive, checking its size and digest on the way; its
        digest (sha256 unless ``digest`` names another algorithm)."""
        with archive.member(name) as member:
            if size is not None and member.size != size:
                raise InvalidArchiveError(
                    f"{name}: {member.size} bytes, its descriptor says {size}",
                    details={"blob": name},
                )
            algorithm = oci.digest_algorithm(digest) if digest else "sha256"
            actual = blob.copy_from(member.chunks(), algorithm)
        if digest is not None and actual != digest:
            raise InvalidArchiveError(
                f"{name}: blob fails its digest check (expected {digest}, got {actual})",
                details={"blob": name, "expected": digest, "actual": actual},
            )
        return actual

    # --- remove and gc -------------------------------------------------------------------------

    def remove(self, ref: str) -> SnapshotInfo:
        """Forget a snapshot and delete the layers no other snapshot uses.

        Raises:
            SnapshotNotFoundError: no such snapshot.
            SnapshotInUseError: a view of it is mounted (``runtimectl snapshot unmount``) or a
                run holds a :meth:`lease` on it.
        """
        snapshot_id = self.get(ref).id
        with self._lock("snap-" + oci.digest_hex(snapshot_id), wait=False) as free:
            if not free:
                raise SnapshotInUseError(
                    f"snapshot {oci.digest_hex(snapshot_id)[:SHORT_ID]} is in use by a run",
                    details={"id": snapshot_id},
                )
            info = self._forget(snapshot_id)
        self._checkpoint("snapshot-removed")
        self.gc()
        return info

    def _forget(self, snapshot_id: str) -> SnapshotInfo:
        with self._db(write=True) as conn:
            info = self._info(conn, snapshot_id)
            for (path,) in conn.execute(
                "SELECT path FROM views WHERE snapshot_id = ?", (info.id,)
            ).fetchall():
                if os.path.ismount(path):
                    raise SnapshotInUseError(
                        f"snapshot {info.short_id} is mounted at {path}",
                        details={"id": info.id, "path": path},
                        hint=f"runtimectl snapshot unmount {path}",
                    )
                conn.execute("DELETE FROM views WHERE path = ?", (path,))
            conn.execute("DELETE FROM snapshots WHERE id = ?", (info.id,))
        return info

    @contextlib.contextmanager
    def lease(self, ref: str) -> Iterator[SnapshotInfo]:
        """Keep a snapshot, hence its layers, from being removed while a run uses them: hold
        this around the run (``remove`` then raises SnapshotInUseError).

        Raises:
            SnapshotNotFoundError: no such snapshot (or it was removed just now).
        """
        snapshot_id = self.get(ref).id
        with self._lock("snap-" + oci.digest_hex(snapshot_id), shared=True):
            yield self.get(snapshot_id)  # still there: a remove that won the race is done

    def gc(self) -> builtins.list[str]:
        """Delete layers no snapshot uses (skipping any an import holds) and their blobs.

        Returns:
            The chain IDs removed.
        """
        with self._db() as conn:
            unused = [
                r[0]
                for r in conn.execute(
                    "SELECT chain_id FROM layers WHERE chain_id NOT IN "
                    "(SELECT chain_id FROM snapshot_layers)"
                )
            ]
        removed: list[str] = []
        for chain_id in unused:
            with self._lock(oci.digest_hex(chain_id), wait=False) as mine:
                if not mine:
                    continue
                with self._db(write=True) as conn:
                    if conn.execute(
                        "SELECT 1 FROM snapshot_layers WHERE chain_id = ?", (chain_id,)
                    ).fetchone():
                        continue
                    blob = conn.execute(
                        "SELECT blob_digest FROM layers WHERE chain_id = ?", (chain_id,)
                    ).fetchone()
                    conn.execute("DELETE FROM layers WHERE chain_id = ?", (chain_id,))
                    shared = (
                        blob is not None
                        and conn.execute(
                            "SELECT 1 FROM layers WHERE blob_digest = ?", (blob[0],)
                        ).fetchone()
                    )
                # The row is gone first: a crash from here on leaves garbage for reclaim().
                self._discard(self._layer_path(chain_id))
                if blob is not None and blob[0] is not None and not shared:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._blob_path(blob[0]))
                removed.append(chain_id)
        return removed

    def _discard(self, path: Path) -> None:
        """Move a directory out of sight in one rename, then delete it."""
        trash = Path(tempfile.mkdtemp(dir=self.staging_dir))
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash / "x")
        _rmtree(trash)

    def reclaim(self) -> None:
        """Remove what crashed imports left. Only safe while no other process has the store
        open, which the constructor checks (exclusive ``store.lock``) before calling it."""
        for d in (self.staging_dir, self.runs_dir):
            for entry in d.iterdir():
                _rmtree(entry)
        for entry in self.locks_dir.iterdir():
            entry.unlink()
        with self._db() as conn:
            known = {oci.digest_hex(r[0]) for r in conn.execute("SELECT chain_id FROM layers")}
            blobs = {r[0] for r in conn.execute("SELECT blob_digest FROM layers") if r[0]}
        for entry in self.layers_dir.iterdir():
            if entry.name not in known:
                log.info("reclaiming layer directory %s left by an interrupted import", entry)
                self._discard(entry)
        self.gc()
        for alg_dir in self.blobs_dir.iterdir():
            for blob in alg_dir.iterdir():
                if f"{alg_dir.name}:{blob.name}" not in blobs:
                    blob.unlink()

    # --- runs and commit -----------------------------------------------------------------------

    def new_run_dir(self) -> Path:
        """A scratch directory with empty ``upper/`` and ``work/`` on the store's file system
        (overlayfs needs both on one file system; commit renames ``upper/`` into a layer).
        Remove it with :meth:`remove_run_dir`."""
        path = Path(tempfile.mkdtemp(dir=self.runs_dir))
        (path / "upper").mkdir()
        (path / "work").mkdir()
        return path

    def remove_run_dir(self, path: Path) -> None:
        """Delete a directory made by :meth:`new_run_dir` (and nothing else).

        Raises:
            UsageError: ``path`` is not a run directory of this store.
        """
        if path.parent != self.runs_dir or not path.name:
            raise UsageError(f"{path} is not a run directory of {self.state_dir}")
        _rmtree(path)

    def commit_upper(self, parent_id: str, upper: Path) -> SnapshotInfo:
        """Make a run's overlay upper directory a new layer on top of ``parent_id``.

        ``upper`` (from :meth:`new_run_dir`, no longer mounted) is moved, not copied, into the
        store: overlay whiteouts and opaque directories are already the store's layer format,
        and its diff ID is the digest of the OCI layer tar they convert to (``.wh.`` files).

        Raises:
            SnapshotNotFoundError: no such parent.
            SnapshotError: ``upper`` is not on the store's file system.
        """
        parent = self.get(parent_id)
        tar = layertar.write_layer(upper)
        size = _tree_size(upper)
        config = json.loads(self.config_blob(parent.id))
        config["rootfs"]["diff_ids"].append(tar.digest)
        if isinstance(config.get("history"), list) and config["history"]:
            config["history"].append({"created": _now(), "created_by": "runtimed commit"})
        new = _NewLayer(path=upper, diff_id=tar.digest, size=size, entries=tar.entries)
        diff_ids = [layer.diff_id for layer in parent.layers] + [tar.digest]
        with contextlib.ExitStack() as held:
            try:
                layer = self._install_layer(held, new, chain_id=oci.chain_ids(diff_ids)[-1])
            except OSError as exc:
                raise SnapshotError(
                    f"commit {upper}: {exc.strerror}", details={"upper": str(upper)}
                ) from exc
            resolved = _Resolved(
                config=oci.canonical_json(config),
                platform=parent.platform,
                platform_source=parent.platform_source,
            )
            return self._commit(
                resolved, [*parent.layers, layer], source=f"commit on {parent.id}", source_keys=()
            )

    # --- export --------------------------------------------------------------------------------

    def export(self, refs: Sequence[str], dest: Path, *, fmt: ExportFormat) -> None:
        """Write snapshots to ``dest`` (which must not exist), all or nothing.

        ``tar``: one snapshot as a flattened root filesystem tarball. ``oci``: an OCI image
        layout; one snapshot gives an index with its manifest tagged ``latest``, several (of
        different platforms) one multi-platform image: ``index.json`` tags a nested image index
        listing one manifest per platform, as ``docker buildx`` writes it. Kept blobs are
        written as imported, other layers gzipped; either way a layout imports back to the
        same snapshot ids (an id covers diff IDs, not blob digests).

        Raises:
            UsageError: ``dest`` exists, no snapshot given, several for a tar, or two for the
                same platform.
            SnapshotNotFoundError: a snapshot does not exist.
            SnapshotError: writing failed.
        """
        if not refs:
            raise UsageError("export: name at least one snapshot")
        if dest.exists() or dest.is_symlink():
            raise UsageError(f"export: {dest} exists", details={"path": str(dest)})
        infos = [self.get(ref) for ref in refs]
        if fmt is ExportFormat.TAR and len(infos) != 1:
            raise UsageError("export --format tar takes exactly one snapshot (a tar is one root)")
        platforms = [str(i.platform) for i in infos]
        if len(set(platforms)) != len(platforms):
            raise UsageError(
                f"export: several snapshots for one platform ({', '.join(platforms)})",
                hint="a multi-platform image holds one snapshot per platform",
            )
        try:
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        except OSError as exc:
            raise SnapshotError(f"export to {dest}: {exc.strerror}") from exc
        try:
            if fmt is ExportFormat.TAR:
                with open(tmp / "rootfs.tar", "wb") as out:
                    layertar.write_merged(self.layer_paths(infos[0].id), out)
                    os.fsync(out.fileno())
                os.rename(tmp / "rootfs.tar", dest)
            else:
                self._write_layout(infos, tmp)
                os.rename(tmp, dest)
        except OSError as exc:
            raise SnapshotError(f"export to {dest}: {exc}", details={"path": str(dest)}) from exc
        finally:
            _rmtree(tmp)

    def _write_layout(self, infos: Sequence[SnapshotInfo], root: Path) -> None:
        blobs = root / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        manifests = [self._write_image(info, blobs) for info in infos]
        (root / "oci-layout").write_bytes(oci.format_oci_layout())
        latest = ((oci.REF_NAME, "latest"),)
        if len(manifests) == 1:
            top = oci.Descriptor(
                media_type=oci.OCI_MANIFEST,
                digest=manifests[0].digest,
                size=manifests[0].size,
                platform=manifests[0].platform,
                annotations=latest,
            )
        else:
            nested = _write_blob(blobs, oci.format_index(manifests))
            top = oci.Descriptor(
                media_type=oci.OCI_INDEX, digest=nested.digest, size=nested.size, annotations=latest
            )
        (root / "index.json").write_bytes(oci.format_index([top]))

    def _write_image(self, info: SnapshotInfo, blobs: Path) -> oci.Descriptor:
        layers = [self._write_layer_blob(layer, blobs) for layer in info.layers]
        config = _write_blob(blobs, self.config_blob(info.id), media_type=oci.OCI_CONFIG)
        manifest = oci.format_manifest(config=config, layers=layers)
        written = _write_blob(blobs, manifest, media_type=oci.OCI_MANIFEST)
        return oci.Descriptor(
            media_type=oci.OCI_MANIFEST,
            digest=written.digest,
            size=written.size,
            platform=info.platform,
        )

    def _write_layer_blob(self, layer: LayerInfo, blobs: Path) -> oci.Descriptor:
        """The layer as imported when its blob is an OCI one. Any other layer (committed by a
        run, imported from a directory, or kept as xz or bzip2, which OCI has no media type
        for) is written as its uncompressed tar gzipped, as an image builder pushes it: the
        manifest names the gzip blob's digest, the config the tar's, its diff ID (checked, so
        a changed layer directory cannot go unnoticed)."""
        compression = layer.blob_compression
        if layer.blob_digest is not None and compression in _LAYER_MEDIA_TYPES:
            target = blobs / oci.digest_hex(layer.blob_digest)
            if not target.exists():
                shutil.copyfile(self._blob_path(layer.blob_digest), target)
            return oci.Descriptor(
                media_type=_LAYER_MEDIA_TYPES[compression],
                digest=layer.blob_digest,
                size=os.stat(target).st_size,
            )
        tmp = blobs / f".{oci.digest_hex(layer.diff_id)}.tmp"
        with open(tmp, "wb") as out:
            blob = layertar.HashingWriter(out)
            # mtime=0 and no file name: the same layer always gives the same blob digest.
            with gzip.GzipFile(
                fileobj=blob, mode="wb", compresslevel=EXPORT_GZIP_LEVEL, mtime=0
            ) as tar_out:
                if layer.blob_digest is not None and compression is not None:
                    blob_path = self._blob_path(layer.blob_digest)
                    diff_id = _decompress_blob(blob_path, compression, tar_out)
                else:
                    diff_id = layertar.write_layer(self._layer_path(layer.chain_id), tar_out).digest
        if diff_id != layer.diff_id:
            raise SnapshotError(
                f"layer {layer.chain_id}: re-created tar hashes to {diff_id}, "
                f"not its diff ID {layer.diff_id} (was the layer directory changed?)",
                details={"chain_id": layer.chain_id},
            )
        os.rename(tmp, blobs / oci.digest_hex(blob.digest))
        return oci.Descriptor(media_type=oci.OCI_LAYER_GZIP, digest=blob.digest, size=blob.size)

    # --- views ---------------------------------------------------------------------------------

    def mount_view(self, ref: str, target: Path) -> SnapshotInfo:
        """Mount the snapshot's merged tree read-only on the empty directory ``target``.

        Raises:
            SnapshotNotFoundError: no such snapshot.
            UsageError: ``target`` is not an empty directory.
            SnapshotError: the mount failed.
        """
        info = self.get(ref)
        target = target.absolute()
        if not target.is_dir() or any(target.iterdir()):
            raise UsageError(f"mount: {target} is not an empty directory")
        names = [oci.digest_hex(layer.chain_id) for layer in info.layers]
        empty = self.state_dir / "empty"
        empty.mkdir(mode=0o555, exist_ok=True)
        if len(names) < 2:  # overlayfs needs two lower directories when there is no upper
            names.insert(0, "../empty")
        # Recorded first, so that remove() refuses from the moment the mount may exist.
        with self._db(write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO views VALUES (?, ?)", (str(target), info.id))
        try:
            view.mount_overlay(names, target, cwd=self.layers_dir)
        except SnapshotError:
            with self._db(write=True) as conn:
                conn.execute("DELETE FROM views WHERE path = ?", (str(target),))
            raise
        return info

    def unmount_view(self, target: Path) -> None:
        """Unmount a view made by :meth:`mount_view`.

        Raises:
            UsageError: ``target`` is not a view of this store.
            SnapshotError: ``umount`` failed (busy).
        """
        target = target.absolute()
        with self._db() as conn:
            row = conn.execute("SELECT 1 FROM views WHERE path = ?", (str(target),)).fetchone()
        if row is None:
            raise UsageError(f"unmount: {target} is not a snapshot view of {self.state_dir}")
        if os.path.ismount(target):
            view.umount(target)
        with self._db(write=True) as conn:
            conn.execute("DELETE FROM views WHERE path = ?", (str(target),))


class ExportFormat(enum.StrEnum):
    OCI = "oci"
    TAR = "tar"


def _write_blob(blobs: Path, data: bytes, *, media_type: str = oci.OCI_INDEX) -> oci.Descriptor:
    digest = oci.sha256_digest(data)
    (blobs / oci.digest_hex(digest)).write_bytes(data)
    return oci.Descriptor(media_type=media_type, digest=digest, size=len(data))


def _decompress_blob(blob: Path, compression: Compression, out: SupportsWrite[bytes]) -> str:
    """Decompress an xz or bzip2 blob (no OCI media type) into ``out``; the tar's digest."""
    if compression not in (Compression.XZ, Compression.BZIP2):
        raise InternalError(f"no decompressor for kept {compression} blob {blob}")
    h = hashlib.sha256()
    with _DECOMPRESSORS[compression](blob) as data:
        while chunk := data.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    return "sha256:" + h.hexdigest()


def _tree_size(root: Path) -> int:
    """The bytes of regular files below ``root``, as an unpack counts them (sandbox.fstree: a
    run's upper may nest deeper than os.walk, which recurses in Python 3.11, can go)."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return sum(
            st.st_size for _, _, _, st in fstree.walk_tree(root_fd) if stat.S_ISREG(st.st_mode)
        )
    finally:
        os.close(root_fd)


def _check_named_digest(name: str, data: bytes) -> None:
    """``docker save`` names a config by its digest (``<hex>.json``): hold it to that."""
    stem = Path(name).name.removesuffix(".json")
    if re.fullmatch(r"[0-9a-f]{64}", stem) and oci.sha256_digest(data) != f"sha256:{stem}":
        raise InvalidArchiveError(f"{name}: content does not match the digest in its name")


def detect_root_platform(root: Path) -> rootplatform.DetectedPlatform | None:
    """Read the candidate binaries of an unpacked root (symlinks resolved inside it only).

    Raises:
        SnapshotError: the root itself cannot be opened.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        loaders: list[tuple[str, str]] = []
        for d in rootplatform.LOADER_DIRS:
            with contextlib.suppress(OSError, KernelError):
                fd = syscalls.openat2(
                    root_fd, d, os.O_RDONLY | os.O_DIRECTORY, syscalls.RESOLVE_IN_ROOT
                )
                try:
                    loaders += [(d, n) for n in os.listdir(fd)]
                finally:
                    os.close(fd)
        heads: list[tuple[str, bytes]] = []
        for path in rootplatform.candidate_paths(loaders):
            with contextlib.suppress(OSError, KernelError):
                fd = syscalls.openat2(
                    root_fd,
                    path,
                    os.O_RDONLY | os.O_NONBLOCK,
                    syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS,
                )
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        heads.append((path, os.pread(fd, rootplatform.HEAD_BYTES, 0)))
                finally:
                    os.close(fd)
        return rootplatform.detect_platform(heads)
    finally:
        os.close(root_fd)
