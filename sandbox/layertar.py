"""IO: write a stored layer directory (or the merged view of several) as a tar stream.

A stored layer is in overlayfs representation (``Documentation/filesystems/overlayfs.rst``):
a whiteout is a character device 0/0 and an opaque directory carries the ``user.overlay.opaque``
xattr (the layers are mounted with ``userxattr``). Two ways out:

- :func:`write_layer` gives the OCI layer tar of one directory (image-spec ``layer.md``):
  whiteouts become ``.wh.NAME`` files and an opaque directory gets a ``.wh..wh..opq`` entry.
  Its bytes are deterministic (sorted names, numeric owners, no user/group names, whole-second
  mtimes), so the digest of the stream is a stable diff ID: it is how a run's upper directory
  or an imported directory gets its diff ID, and how export re-creates a layer whose original
  blob the store did not keep.
- :func:`write_merged` flattens a snapshot: the tree a read-only overlay mount of the layers
  would show, computed by walking the layers top-down with overlayfs' rules (a whiteout or a
  non-directory hides what is below, an opaque directory stops the descent), without mounting.

Layer directories belong to the store (read-only after commit), so a plain walk that never
follows symlinks is enough here; the untrusted side is the unpacking, in ``sandbox.unpack``.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

from sandbox import fstree

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, SupportsWrite

# Documentation/filesystems/overlayfs.rst, "User xattr": with the ``userxattr`` mount option
# overlayfs reads its xattrs from the user.overlay. namespace.
OPAQUE_XATTR: Final = "user.overlay.opaque"
OVERLAY_XATTR_PREFIX: Final = "user.overlay."
WHITEOUT_PREFIX: Final = ".wh."
OPAQUE_MARKER: Final = ".wh..wh..opq"
# Kept from the layer, as the unpacker keeps them; trusted.* never reaches a stored layer.
_KEPT_XATTR_PREFIXES: Final = ("security.capability", "user.")


@dataclass(frozen=True, slots=True, kw_only=True)
class TarDigest:
    """The sha256 digest (``sha256:<hex>``), length and member count of a tar stream written."""

    digest: str
    size: int
    entries: int


class HashingWriter(io.RawIOBase):
    """A write-only file object that hashes what passes through to ``sink`` (if any)."""

    def __init__(self, sink: SupportsWrite[ReadableBuffer] | None) -> None:
        super().__init__()
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.size += view.nbytes
        if self._sink is not None:
            self._sink.write(view)
        return view.nbytes

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of what was written so far."""
        return "sha256:" + self._hash.hexdigest()

    def result(self, entries: int) -> TarDigest:
        return TarDigest(digest=self.digest, size=self.size, entries=entries)


def is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _xattrs(path: Path) -> dict[str, str]:
    """The xattrs a layer tar carries, as PAX ``SCHILY.xattr.*`` records (bytes kept exactly)."""
    out: dict[str, str] = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        if name.startswith(OVERLAY_XATTR_PREFIX) or not name.startswith(_KEPT_XATTR_PREFIXES):
            continue
        value = os.getxattr(path, name, follow_symlinks=False)
        # tarfile writes undecodable PAX values back byte for byte (hdrcharset=BINARY).
        out["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return out


def _tarinfo(name: str, path: Path, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    info.pax_headers = _xattrs(path)
    return info


def _marker(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


class _Writer:
    """Adds entries to a tar stream, turning repeated inodes into hard links; counts them."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self._tar = tar
        self._links: dict[tuple[int, int], str] = {}
        self.entries = 0

    def _addfile(self, info: tarfile.TarInfo, data: BinaryIO | None = None) -> None:
        self._tar.addfile(info, data)
        self.entries += 1

    def add(self, name: str, path: Path, st: os.stat_result) -> None:
        info = _tarinfo(name, path, st)
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            self._addfile(info)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self._links:
                info.type, info.linkname = tarfile.LNKTYPE, self._links[key]
                self._addfile(info)
                return
            self._links[key] = name
            info.size = st.st_size
            with open(path, "rb") as data:
                self._addfile(info, data)
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            self._addfile(info)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self._addfile(info)
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
            self._addfile(info)
        # Sockets cannot be archived (GNU tar skips them too).

    def add_marker(self, name: str) -> None:
        self._addfile(_marker(name))


def _open_tar(out: HashingWriter) -> tarfile.TarFile:
    return tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)


def _sorted_entries(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _walk_layer(root: Path, writer: _Writer) -> None:
    # Descriptor-based and iterative (sandbox.fstree): a hostile layer can nest deeper than
    # Python's recursion limit and than PATH_MAX.
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dir_fd, rel, name, st in fstree.walk_tree(root_fd):
            if is_whiteout(st):
                writer.add_marker(rel[: len(rel) - len(name)] + WHITEOUT_PREFIX + name)
                continue
            path = Path(f"/proc/self/fd/{dir_fd}/{name}")
            writer.add(rel, path, st)
            if stat.S_ISDIR(st.st_mode) and is_opaque(path):
                writer.add_marker(f"{rel}/{OPAQUE_MARKER}")
    finally:
        os.close(root_fd)


def write_layer(layer: Path, sink: SupportsWrite[ReadableBuffer] | None = None) -> TarDigest:
    """Write the OCI layer tar of one stored layer directory to ``sink`` (or only hash it).

    Returns:
        The digest and length of the uncompressed stream (the layer's diff ID) and its number
        of members, whiteout and opaque markers included, as an unpack of it counts them.

    Raises:
        OSError: reading the layer failed (the store translates it).
    """
    out = HashingWriter(sink)
    with _open_tar(out) as tar:
        writer = _Writer(tar)
        _walk_layer(layer, writer)
    return out.result(writer.entries)


def _merged_children(
    layers: Sequence[Path], rel: str
) -> Iterator[tuple[str, Path, os.stat_result, list[Path]]]:
    """The visible entries of directory ``rel`` over ``layers`` (top first), sorted by name.

    Yields (name, path in its top-most layer, its stat, the layers a sub-directory draws from).
    """
    top: dict[str, tuple[Path, os.stat_result]] = {}
    hidden: set[str] = set()
    for layer in layers:
        directory = layer / rel if rel else layer
        for name in _sorted_entries(directory):
            if name in top or name in hidden:
                continue
            path = directory / name
            st = os.lstat(path)
            if is_whiteout(st):
                hidden.add(name)
            else:
                top[name] = (path, st)
    for name in sorted(top):
        path, st = top[name]
        sources: list[Path] = []
        if stat.S_ISDIR(st.st_mode):
            child_rel = f"{rel}/{name}" if rel else name
            sources = _dir_sources(layers, child_rel)
        yield name, path, st, sources


def _dir_sources(layers: Sequence[Path], rel: str) -> list[Path]:
    """The layers (top first) whose ``rel`` directory merges into the view (overlayfs rules)."""
    sources: list[Path] = []
    for layer in layers:
        try:
            st = os.lstat(layer / rel)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            break  # a whiteout or a non-directory hides everything below
        sources.append(layer)
        if is_opaque(layer / rel):
            break
    return sources


def _walk_merged(layers: Sequence[Path], writer: _Writer) -> None:
    stack = [iter([("", _merged_children(layers, ""))])]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        rel, children = item
        stack.append(_merged_level(rel, children, writer))


def _merged_level(
    rel: str,
    children: Iterator[tuple[str, Path, os.stat_result, list[Path]]],
    writer: _Writer,
) -> Iterator[tuple[str, Iterator[tuple[str, Path, os.stat_result, list[Path]]]]]:
    """Write one directory's entries; yield each sub-directory to descend into, in order."""
    for name, path, st, sources in children:
        child_rel = f"{rel}/{name}" if rel else name
        writer.add(child_rel, path, st)
        if sources:
            yield child_rel, _merged_children(sources, child_rel)


def write_merged(layers: Sequence[Path], sink: SupportsWrite[ReadableBuffer]) -> TarDigest:
    """Write the flattened tree of ``layers`` (lowest first, as ``lowerdir`` lists them reversed).

    Raises:
        OSError: reading a layer failed (the store translates it).
    """
    out = HashingWriter(sink)
    with _open_tar(out) as tar:
        writer = _Writer(tar)
        _walk_merged(_dir_sources(list(reversed(layers)), ""), writer)
    return out.result(writer.entries)
