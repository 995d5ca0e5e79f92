"""IO: directory trees by descriptor, never following a symlink: remove one at any depth,
walk one in order.

``shutil.rmtree`` and ``os.fwalk`` recurse in Python 3.11 and hold a descriptor per level; an
archive can build a tree 2048 levels deep in one name (deeper through symlinks), and removing
it would end in RecursionError and leave staging behind.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

_DIR_READ: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def clear(parent: int, name: str) -> None:
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
        clear(parent, path.name)
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
