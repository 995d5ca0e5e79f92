"""IO: ctypes binding of ``sandbox/native/layerwrite.c``, which writes the plain members of a
window of decoded tar bytes (files, directories, symlinks in plain headers) without the GIL.

Built by setup.py next to this package (``sandbox/native/layerwrite.so``). The native side
takes only members the Python writer in ``sandbox.unpack`` would write the very same way and
hands every other one back (its header comment lists which): Python stays the reference and
goes on where a call stopped. Parsing, planning and writing plain members in Python was the
slowest stage of a zstd import (~350-450 ms of the writer thread for a Debian rootfs).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sandbox import syscalls

LIBRARY: Final = Path(__file__).parent / "native" / "layerwrite.so"
# A window of 2 MiB holds at most 4096 members; a call stops early when a record might not
# fit (a path is under 512 bytes), and the caller calls again.
_CREATED_BYTES: Final = 256 * 1024
_DIRS: Final = 4096


class _Result(ctypes.Structure):
    _fields_ = [
        ("consumed", ctypes.c_int64),
        ("entries", ctypes.c_int64),
        ("file_bytes", ctypes.c_int64),
        ("created_len", ctypes.c_int64),
        ("dirs", ctypes.c_int64),
        ("err", ctypes.c_int32),
        ("pad", ctypes.c_int32),
    ]


_Int64s = ctypes.c_int64 * _DIRS
_lib = ctypes.CDLL(str(LIBRARY))
_lib.layerwrite_run.restype = None
_lib.layerwrite_run.argtypes = [
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.POINTER(_Int64s),
    ctypes.POINTER(_Int64s),
    ctypes.c_int64,
    ctypes.POINTER(_Result),
]
_lib.layerwrite_dir_times.restype = ctypes.c_int64
_lib.layerwrite_dir_times.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int64,
    ctypes.POINTER(ctypes.c_int64),
    ctypes.POINTER(ctypes.c_int32),
    ctypes.POINTER(ctypes.c_int32),
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    """What one call wrote from the start of its window."""

    consumed: int
    """Bytes of the whole members written (headers, data and padding)."""
    entries: int
    file_bytes: int
    created: bytes
    """The path of every member written, components joined by ``/``, each ended by NUL."""
    dirs: tuple[tuple[bytes, int], ...]
    """(path, mtime in seconds) of each directory written, in order."""
    err: int
    """The errno of the member at ``consumed`` that failed once begun; 0 if none did."""

    def last(self) -> str | None:
        """The name of the last member written (as tarfile decodes names), if any."""
        if not self.created:
            return None
        return os.fsdecode(self.created[self.created.rfind(b"\0", 0, -1) + 1 : -1])


class PlainWriter:
    """Writes plain members into the directory ``root_fd`` (see the module docstring)."""

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._created = ctypes.create_string_buffer(_CREATED_BYTES)
        self._offsets = _Int64s()
        self._mtimes = _Int64s()

    def run(self, window: memoryview, *, max_entries: int, max_bytes: int) -> Written:
        """Write the plain members at the start of ``window`` (a writable view of tar bytes
        starting at a header), at most ``max_entries`` of them and ``max_bytes`` of file data.
        """
        result = _Result()
        data = (ctypes.c_char * len(window)).from_buffer(window)
        _lib.layerwrite_run(
            ctypes.addressof(data),
            len(window),
            self._root,
            max_entries,
            max_bytes,
            self._created,
            _CREATED_BYTES,
            self._offsets,
            self._mtimes,
            _DIRS,
            ctypes.byref(result),
        )
        del data  # the window's buffer must not stay exported
        created = ctypes.string_at(self._created, result.created_len)
        dirs = tuple(
            (created[start : created.index(0, start)], self._mtimes[i])
            for i, start in enumerate(self._offsets[: result.dirs])
        )
        return Written(
            consumed=result.consumed,
            entries=result.entries,
            file_bytes=result.file_bytes,
            created=created,
            dirs=dirs,
            err=result.err,
        )


def set_dir_times(root_fd: int, dirs: Sequence[tuple[bytes, int]]) -> None:
    """Set each directory's mtime (path as the native writer reports it, ``b""`` for the root;
    nanoseconds), in this order, resolved in the directory ``root_fd`` as the writers resolve
    parents; one that is no longer a directory (replaced or removed by a later member) is
    skipped. One native call for a whole layer.

    Raises:
        KernelError: a directory could not be opened or its time set.
    """
    if not dirs:
        return
    paths = b"".join(path + b"\0" for path, _ in dirs)
    mtimes = (ctypes.c_int64 * len(dirs))(*(mtime for _, mtime in dirs))
    err, call = ctypes.c_int32(), ctypes.c_int32()
    done = _lib.layerwrite_dir_times(
        root_fd, paths, len(dirs), mtimes, ctypes.byref(err), ctypes.byref(call)
    )
    if done < len(dirs):
        path = os.fsdecode(dirs[done][0]) or "."
        syscall = "futimens" if call.value else "openat2"
        raise syscalls.kernel_error(err.value, syscall=syscall, path=path)
