"""IO: ctypes binding of ``sandbox/native/layerdecode.c``, which decodes a zstd layer stream
from an fd into a given buffer (and, if asked, hashes the compressed bytes), without the GIL.

Built by setup.py next to this package (``sandbox/native/layerdecode.so``, linked against
libzstd and OpenSSL's libcrypto). ctypes releases the GIL for the length of each call, so a
whole chunk is read and decoded while the other threads run.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Final

from runtimed.errors import InternalError, InvalidArchiveError
from sandbox import syscalls

LIBRARY: Final = Path(__file__).parent / "native" / "layerdecode.so"
_DIGEST_SIZE: Final = hashlib.sha256().digest_size

_lib = ctypes.CDLL(str(LIBRARY))
_lib.layerdecode_new.restype = ctypes.c_void_p
_lib.layerdecode_new.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_size_t,
]
_lib.layerdecode_read.restype = ctypes.c_ssize_t
_lib.layerdecode_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_lib.layerdecode_digest.restype = ctypes.c_int
_lib.layerdecode_digest.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.layerdecode_error.restype = ctypes.c_char_p
_lib.layerdecode_error.argtypes = [ctypes.c_void_p]
_lib.layerdecode_errno.restype = ctypes.c_int
_lib.layerdecode_errno.argtypes = [ctypes.c_void_p]
_lib.layerdecode_free.restype = None
_lib.layerdecode_free.argtypes = [ctypes.c_void_p]

Buffer = ctypes.Array[ctypes.c_char]

BLOCK_MAX: Final = 128 * 1024
"""ZSTD_BLOCKSIZE_MAX: the shortest region :meth:`ZstdDecoder.read_into` accepts."""


def new_buffer(size: int) -> Buffer:
    """A buffer :meth:`ZstdDecoder.read_into` can fill (``memoryview`` reads it).

    Anonymous memory, whose pages the kernel zeroes when they are first written: a ctypes
    array of its own is zeroed whole when it is made (~14 ms and 5,000 page faults for the
    20 MiB ring, at the start of every layer's helper, however small the layer)."""
    return (ctypes.c_char * size).from_buffer(mmap.mmap(-1, size))


class ZstdDecoder:
    """One zstd stream on ``fd``, whose first bytes ``head`` the caller has read already.

    Every frame is read to its end (checksums checked); anything but a frame where one would
    start, skippable frames included, is trailing garbage. Use it from one thread at a time
    and :meth:`close` it from the thread that reads: a read blocked in the kernel still holds
    the native state.

    A frame whose window is at most ``history_max`` bytes is decoded straight into the
    caller's regions, which must then be laid out as in a ring (see :meth:`read_into`).
    """

    def __init__(
        self,
        fd: int,
        head: bytes,
        *,
        hash_compressed: bool,
        invalid: Callable[[str], InvalidArchiveError],
        history_max: int,
    ) -> None:
        self._invalid = invalid
        handle = _lib.layerdecode_new(fd, head, len(head), int(hash_compressed), history_max)
        if not handle:
            raise InternalError("layerdecode: out of memory")
        self._handle: int | None = handle
        self._hash_compressed = hash_compressed

    def read_into(self, ring: Buffer, start: int, size: int) -> int:
        """Decode into ``ring[start:start + size]``: the bytes decoded (fewer than ``size``
        only at the end of the stream or before a block that might not fit), 0 at the clean
        end. The region (at least :data:`BLOCK_MAX` long) follows the previous one or starts
        the ring, and leaves the last ``history_max`` bytes decoded before it intact.

        Raises:
            InvalidArchiveError: corrupt or truncated frame, trailing garbage (from ``invalid``).
            KernelError: reading the fd failed.
        """
        if start < 0 or size < BLOCK_MAX or start + size > len(ring):
            raise InternalError(f"layerdecode: region {start}+{size} of a ring of {len(ring)}")
        got: int = _lib.layerdecode_read(self._handle, ctypes.addressof(ring) + start, size)
        if got >= 0:
            return got
        errno = _lib.layerdecode_errno(self._handle)
        if errno:
            raise syscalls.kernel_error(errno, syscall="read")
        raise self._invalid(_lib.layerdecode_error(self._handle).decode())

    def digest(self) -> str | None:
        """``sha256:…`` of the compressed bytes with ``hash_compressed``, else None: call once,
        after :meth:`read_into` returned 0."""
        if not self._hash_compressed:
            return None
        digest = ctypes.create_string_buffer(_DIGEST_SIZE)
        if _lib.layerdecode_digest(self._handle, digest) != 0:
            raise InternalError("layerdecode: sha256 of the compressed bytes failed")
        return f"sha256:{digest.raw.hex()}"

    def close(self) -> None:
        """Free the native state (idempotent)."""
        if self._handle is not None:
            _lib.layerdecode_free(self._handle)
            self._handle = None
