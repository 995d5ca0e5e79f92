"""IO: read the merged view of a snapshot's layers without mounting it.

Before a sandbox exists, the launcher needs a few files of the root it will show: the
entrypoint (for :mod:`sandbox.mode`) and ``/etc/passwd``/``/etc/group`` (user names). This
resolves paths the way the overlay will: the topmost layer holding a name wins, a whiteout
(0/0 character device, or a ``user.overlay.whiteout`` xattr) hides lower layers, an opaque
directory (``user.overlay.opaque``) stops the search below it, and symlinks are followed
inside the root (an absolute target restarts at the root's top, ``..`` stops at ``/``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Final

MAX_SYMLINKS: Final = 40  # path_resolution(7)
_OPAQUE: Final = ("user.overlay.opaque", "trusted.overlay.opaque")
_WHITEOUT: Final = ("user.overlay.whiteout", "trusted.overlay.whiteout")


def _xattr(path: Path, names: Sequence[str]) -> bool:
    for name in names:
        try:
            os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        return True
    return False


class LayeredRoot:
    """The layers of a snapshot, lowest first, read as the overlay would show them."""

    def __init__(self, layers: Sequence[Path]) -> None:
        self.layers = list(reversed(layers))  # topmost first

    def _find(self, parts: Sequence[str]) -> Path | None:
        """The host path holding ``parts`` (no symlink resolved), or None."""
        for layer in self.layers:
            candidate = layer.joinpath(*parts)
            try:
                st = os.lstat(candidate)
            except OSError:
                st = None
            if st is not None:
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    return None
                if _xattr(candidate, _WHITEOUT):
                    return None
                return candidate
            if any(_xattr(layer.joinpath(*parts[:i]), _OPAQUE) for i in range(1, len(parts))):
                return None
        return None

    def resolve(self, path: str) -> Path | None:
        """The host path of ``path`` inside the root, symlinks followed, or None if missing."""
        pending = [p for p in path.split("/") if p and p != "."]
        current: list[str] = []
        last: Path | None = None  # the host path of ``current``, when known
        hops = 0
        while pending:
            name = pending.pop(0)
            if name == "..":
                current, last = current[:-1], None
                continue
            found = self._find([*current, name])
            if found is None:
                return None
            if found.is_symlink():
                hops += 1
                if hops > MAX_SYMLINKS:
                    return None
                target = os.readlink(found)
                if target.startswith("/"):
                    current, last = [], None
                pending = [p for p in target.split("/") if p and p != "."] + pending
                continue
            current.append(name)
            last = found
        if not current:
            return self.layers[0] if self.layers else None
        return last if last is not None else self._find(current)

    def is_executable(self, path: str) -> bool:
        found = self.resolve(path)
        if found is None:
            return False
        st = os.stat(found)
        return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)

    def read_head(self, path: str, size: int) -> bytes:
        found = self.resolve(path)
        if found is None:
            return b""
        with open(found, "rb") as file:
            return file.read(size)

    def read_text(self, path: str) -> str:
        """A text file of the root, or "" when it does not exist."""
        return self.read_head(path, 1 << 20).decode(errors="replace")
