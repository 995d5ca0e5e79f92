"""IO: one layer stream read to its end: compression sniffed, decoded member by member,
hashed (the diff_id, and the compressed bytes unless their digest is known) and bounded by
:class:`UnpackLimits`.

:class:`LayerStream` is the forward-only, seekable file object the tar parser in
``sandbox.unpack`` reads from. Concatenated members are legal (gzip members, RFC 1952 2.2;
zstd frames, RFC 8878 3; xz streams; bzip2 streams); anything else after the last one is
garbage, NUL padding and zstd skippable frames included. Decoding and hashing run in two
daemon threads of a bounded pipeline (decoder -> hasher -> parser), so they overlap with
parsing and writing as GNU tar's separate decompressor process does: start a stream only
after any ``unshare``, which needs a single-threaded process. zlib, lzma, bz2 and hashlib
release the GIL while they work; zstd, the fastest codec and so the one where the GIL hand-offs
cost most, is read and decoded in one native call per chunk (``sandbox.layerdecode``), straight
into the chunk when the frame's window allows. Every chunk is a writable region of one ring
that the decoder reuses once the parser has given the chunk back (:meth:`LayerStream.window`
hands them to the native writer of ``sandbox.layerwrite``).
"""

from __future__ import annotations

import bz2
import collections
import hashlib
import lzma
import os
import queue
import threading
import zlib
from collections.abc import Callable
from typing import Final, Protocol, TypeVar

from runtimed.errors import InternalError, InvalidArchiveError, LimitExceededError
from sandbox import syscalls
from sandbox.archive import MAGIC, SNIFF_BYTES, Compression, UnpackLimits, sniff_compression
from sandbox.layerdecode import BLOCK_MAX, ZstdDecoder, new_buffer

# Decoded chunks of 2 MiB rather than 1: half the decompress calls and queue hand-offs, each of
# which needs the GIL back from the parsing thread. The parser waited 110-157 ms for data per
# import of a Debian rootfs tar.zst instead of 239 (medians, in-process, alternating), and
# the helper's wall time dropped by 4-13% over three sets of 8-10 alternating runs.
CHUNK: Final = 2 * 1024 * 1024
_QUEUE_CHUNKS: Final = 8
# The ring the chunks are decoded into. A zstd frame whose window is at most _HISTORY_MAX is
# decoded straight into it (larger ones go through libzstd's own window; zstd -19 has an 8
# MiB window, -3, the default, 2 MiB for a stream of unknown size), and the frame refers back
# to that window. A region starts where the last one ended or, when the ring's end is less
# than a block away, at its start, and is at most a CHUNK long: it overwrites only bytes
# decoded more than _RING - CHUNK - BLOCK_MAX ago, never the window. Beyond that, about six
# chunks can be in flight between decoder, hasher and parser (a fixed pool of six before).
_HISTORY_MAX: Final = 8 * 1024 * 1024
_RING: Final = _HISTORY_MAX + 6 * CHUNK + 2 * BLOCK_MAX
_STOP_POLL: Final = 0.1  # seconds between checks of the stop flag while a queue or the ring is full


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
    Compression.XZ: lambda: lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
    Compression.BZIP2: bz2.BZ2Decompressor,
}
_DECOMPRESS_ERRORS: Final = (zlib.error, lzma.LZMAError, OSError, EOFError)
_EMPTY: Final = memoryview(b"")


_Item = memoryview | BaseException | None
_T = TypeVar("_T")


class _Decoder:
    """The producer half of :class:`LayerStream`: raw reads, decompression and the digests.

    Two threads, so that decompressing and hashing overlap with each other and with parsing
    and writing, as GNU tar's separate decompressor process does: :meth:`run` reads and
    decodes, :meth:`hash_all` hashes each decoded chunk (and the compressed bytes read, unless
    the caller knows their digest) and passes it on to the consumer. At most
    ``2 * _QUEUE_CHUNKS`` pieces (decoded chunks and compressed reads, each at most
    :data:`CHUNK` bytes) wait for the hasher and ``_QUEUE_CHUNKS`` chunks after it: a
    decompression bomb never sits in memory. Chunks are decoded (zstd natively, the other
    codecs by copying their output) or read into regions of one ring of :data:`_RING`
    bytes, which the consumer gives back in order (:meth:`recycle`) once it has read them:
    the decoder waits while the next region would overlap a chunk not given back (the ring
    is large enough that it never overlaps the window of a zstd frame decoded into it).
    """

    def __init__(self, fd: int, limits: UnpackLimits, name: str, *, hash_compressed: bool) -> None:
        self._fd = fd
        self._limits = limits
        self.name = name
        self.total = 0
        self._raw_eof = False
        self._input = b""
        while len(self._input) < SNIFF_BYTES and not self._raw_eof:
            self._input += self._read_raw(SNIFF_BYTES - len(self._input))
        self.compression = sniff_compression(self._input)
        self.hash = hashlib.sha256()
        self.raw_hash: hashlib._Hash | None = None
        # Decoder -> hasher: decoded chunks (memoryview) and compressed bytes to hash only.
        self._decoded: queue.Queue[_Item | bytes] = queue.Queue(2 * _QUEUE_CHUNKS)
        # Hasher -> consumer: decoded chunks, then None or the exception that stopped them.
        self.queue: queue.Queue[_Item] = queue.Queue(_QUEUE_CHUNKS)
        self.stopped = threading.Event()
        self._decoder: _Decompressor | None = None
        self.native: ZstdDecoder | None = None
        self._native_digest: str | None = None
        # Positions in the ring are counted from the start of the stream's first region, so
        # that position p is ring offset p % _RING and writing it overwrites p - _RING.
        self._ring = new_buffer(_RING)
        self._ring_view = memoryview(self._ring).cast("B")
        self._head = 0  # where the last chunk decoded ends
        self._out: collections.deque[tuple[int, int]] = collections.deque()  # not given back
        self._given_back = threading.Condition()
        if self.compression is Compression.ZSTD:
            self.native = ZstdDecoder(
                fd,
                self._input,
                hash_compressed=hash_compressed,
                invalid=self.invalid,
                history_max=_HISTORY_MAX,
            )
        elif hash_compressed:
            self.raw_hash = hashlib.sha256()
            if self.compression is not Compression.NONE:
                self.raw_hash.update(self._input)

    def _read_raw(self, size: int = CHUNK) -> bytes:
        try:
            data = os.read(self._fd, size)
        except OSError as exc:
            raise syscalls.oserror(exc, syscall="read") from exc
        self._raw_eof = not data
        return data

    def _read_compressed(self) -> bytes:
        data = self._read_raw()
        if self.raw_hash is not None:
            self._put(self._decoded, data)
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

    def _region(self) -> tuple[int, int]:
        """Where the next chunk goes: (position, length), waiting until it is at least
        BLOCK_MAX long."""
        with self._given_back:
            while not self.stopped.is_set():
                start = self._head
                if _RING - start % _RING < BLOCK_MAX:  # too little left before the ring's end
                    start += _RING - start % _RING
                # Writing position p overwrites p - _RING, which no chunk not given back yet
                # may hold.
                oldest = self._out[0][0] if self._out else start
                size = min(oldest + _RING - start, _RING - start % _RING, CHUNK)
                if size >= BLOCK_MAX:
                    return start, size
                self._given_back.wait(_STOP_POLL)
        raise InternalError(f"{self.name}: the stream was closed while it was decoded")

    def _produce(self) -> memoryview:
        """Up to CHUNK new uncompressed bytes in the ring; empty only at the end of the
        stream."""
        start, size = self._region()
        offset = start % _RING
        view = self._ring_view[offset : offset + size]
        got = self._produce_into(view, offset)
        if not got:
            return _EMPTY
        with self._given_back:
            self._out.append((start, start + got))
        self._head = start + got
        return view[:got]

    def _produce_into(self, view: memoryview, offset: int) -> int:
        if self.native is not None:
            got = self.native.read_into(self._ring, offset, len(view))
            if not got:
                self._native_digest = self.native.digest()
            return got
        if self.compression is Compression.NONE:
            if self._input:
                head, self._input = self._input, b""
                view[: len(head)] = head
                return len(head)
            try:
                return os.readv(self._fd, [view])
            except OSError as exc:
                raise syscalls.oserror(exc, syscall="read") from exc
        while True:
            if self._decoder is None and not self._start_member():
                return 0
            decoder = self._decoder
            assert decoder is not None
            data, at_end = b"", False
            if decoder.needs_input:
                data, self._input = self._input or self._read_compressed(), b""
                at_end = not data
            try:
                out = decoder.decompress(data, len(view))
            except _DECOMPRESS_ERRORS as exc:
                raise self.invalid(f"corrupt data: {exc}") from exc
            if decoder.eof:
                self._input = decoder.unused_data
                self._decoder = None
            if out:
                view[: len(out)] = out
                return len(out)
            # Only when no input is left *and* the decoder had nothing more to give (zlib may
            # still hold output with its input all consumed) is the member cut short.
            if at_end and self._decoder is not None:
                raise self.invalid("truncated: the stream ends inside a member")

    def recycle(self, chunk: memoryview) -> None:
        """Give the oldest chunk not given back yet (``chunk``) back to the ring: the consumer
        holds no view of it any more."""
        with self._given_back:
            start, end = self._out.popleft()
            if end - start != len(chunk):
                raise InternalError(f"{self.name}: a chunk given back out of order")
            self._given_back.notify()

    def run(self) -> None:
        """Decoder thread: every chunk, then None; or the exception that stopped it."""
        item: _Item
        try:
            while chunk := self._produce():
                self.total += len(chunk)
                if self.total > self._limits.max_bytes:
                    raise LimitExceededError(
                        f"{self.name}: more than {self._limits.max_bytes} uncompressed bytes",
                        details={"blob": self.name, "limit": "max_bytes"},
                    )
                self._put(self._decoded, chunk)
            item = None
        except BaseException as exc:  # handed to the consumer, which raises it
            item = exc
        finally:
            # Here, in the thread that reads: a read blocked on a stalled pipe keeps the
            # native state until the process exits.
            if self.native is not None:
                self.native.close()
        self._put(self._decoded, item)

    def hash_all(self) -> None:
        """Hasher thread: the diff_id over each decoded chunk, which it then hands to the
        consumer, and the compressed bytes' digest; last, the decoder's end or error."""
        while True:
            item = self._get(self._decoded)
            if self.stopped.is_set():
                return
            if isinstance(item, bytes):
                assert self.raw_hash is not None  # only sent with hash_compressed
                self.raw_hash.update(item)
                continue
            if isinstance(item, memoryview):
                self.hash.update(item)
            self._put(self.queue, item)
            if not isinstance(item, memoryview):
                return

    def digests(self) -> tuple[str, str | None]:
        """(diff_id, compressed digest or None) once both threads have ended at the end of
        the stream. An uncompressed stream is hashed once: its digest is its diff_id."""
        diff_id = _digest(self.hash)
        if self.compression is Compression.NONE:
            return diff_id, diff_id
        if self.native is not None:
            return diff_id, self._native_digest
        return diff_id, None if self.raw_hash is None else _digest(self.raw_hash)

    def _put(self, into: queue.Queue[_T], item: _T) -> None:
        while not self.stopped.is_set():
            try:
                into.put(item, timeout=_STOP_POLL)
                return
            except queue.Full:
                continue

    def _get(self, source: queue.Queue[_T]) -> _T | None:
        """The next item, or None once the consumer has stopped."""
        while not self.stopped.is_set():
            try:
                return source.get(timeout=_STOP_POLL)
            except queue.Empty:
                continue
        return None


class LayerStream:
    """Forward-only, seekable file object over an fd holding a possibly compressed tar stream.

    Reads the fd to its end, hashes what it returns (diff_id) and, with ``hash_compressed``,
    what it reads (compressed digest: a caller that hashed the bytes as it wrote the file
    passes False and keeps its own), and raises once the uncompressed stream grows beyond
    ``limits.max_bytes``.
    ``seek`` only moves forward (reading and hashing what it skips), which is all ``tarfile``
    needs in mode ``"r"``. The decoding runs in a thread (:class:`_Decoder`); call
    :meth:`close` when done. Start it only after any ``unshare``: it makes the process
    multi-threaded.

    Raises (from read/peek/seek/finish):
        InvalidArchiveError: truncated or corrupt compressed data, trailing garbage.
        LimitExceededError: more than ``limits.max_bytes`` uncompressed bytes.
    """

    def __init__(
        self, fd: int, limits: UnpackLimits, *, name: str = "layer", hash_compressed: bool = True
    ) -> None:
        self.name = name
        self._decoder = _Decoder(fd, limits, name, hash_compressed=hash_compressed)
        self.compression = self._decoder.compression
        self._threads = [
            threading.Thread(target=self._decoder.run, name="layer-decoder", daemon=True),
            threading.Thread(target=self._decoder.hash_all, name="layer-hasher", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self._done = False
        # The decoded bytes at hand: a chunk from the decoder (``_held``, given back once
        # consumed) or, where a read spans two chunks, a copy of the two joined (None).
        self._buf = _EMPTY
        self._held: memoryview | None = None
        self._off = 0
        self._pos = 0

    @property
    def diff_id(self) -> str:
        """The sha256 of the decoded stream, once :meth:`finish` has returned."""
        return self._decoder.digests()[0]

    @property
    def compressed_digest(self) -> str | None:
        """The digest of the bytes read; None for a compressed stream read without
        ``hash_compressed``. An uncompressed stream's is its diff_id."""
        return self._decoder.digests()[1]

    def _next_chunk(self) -> memoryview:
        """The next chunk (empty at the end). The current one goes back to the decoder:
        nothing may read a view of it after this."""
        if self._held is not None:
            self._decoder.recycle(self._held)
            self._held = None
        self._buf, self._off = _EMPTY, 0
        if self._done:
            return _EMPTY
        item = self._decoder.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item is None:
            self._done = True
            return _EMPTY
        self._buf = self._held = item
        return item

    def _fill(self, size: int) -> None:
        while len(self._buf) - self._off < size:
            rest = bytearray(self._buf[self._off :])
            data = self._next_chunk()
            if not rest:
                if not data:
                    break
                continue
            rest += data
            self._buf = memoryview(rest)
            if data:
                self._decoder.recycle(data)
                self._held = None
            else:
                break

    def peek(self, size: int) -> bytes:
        """The next ``size`` bytes (fewer at the end) without consuming them."""
        if self._off + size > len(self._buf):
            self._fill(size)
        return bytes(self._buf[self._off : self._off + size])

    def read(self, size: int = -1) -> bytes:
        """The next ``size`` bytes; fewer only at the end of the stream."""
        if size < 0:
            chunks = []
            while chunk := self.read(CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        self._fill(size)
        out = bytes(self._buf[self._off : self._off + size])
        self._off += len(out)
        self._pos += len(out)
        return out

    def window(self) -> memoryview:
        """The decoded bytes at hand from here on (the next chunk's when none are; empty at
        the end), without consuming them: a writable view, valid until the next call on this
        stream."""
        if self._off >= len(self._buf):
            self._next_chunk()
        return self._buf[self._off :]

    def read_some(self, size: int) -> memoryview:
        """Between 1 and ``size`` bytes (empty only at the end), a view into the current
        chunk: neither joined with the next one nor copied, and valid only until the next
        call on this stream (its buffer is reused)."""
        if self._off >= len(self._buf):
            self._next_chunk()
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
        # Most seeks (a header's padding, the header peeked at) stay in the current chunk.
        if target - self._pos <= len(self._buf) - self._off:
            self._off += target - self._pos
            self._pos = target
            return target
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
