"""Pure. Parse ``/proc/PID/mountinfo`` (proc(5)) to tell which filesystem is mounted where.

Used to check that a binfmt_misc directory really is a binfmt_misc mount (a plain directory at
``/proc/sys/fs/binfmt_misc`` is not) and to tell a systemd automount (``autofs``) apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtimed.errors import BinfmtError

# proc(5): the kernel escapes these characters in paths as a backslash and three octal digits.
_ESCAPES = {"\\040": " ", "\\011": "\t", "\\012": "\n", "\\134": "\\"}


@dataclass(frozen=True, slots=True, kw_only=True)
class MountEntry:
    """One line of mountinfo: where a filesystem is mounted, its type and per-mount options."""

    mount_id: int
    parent_id: int
    mount_point: str
    fs_type: str
    source: str
    options: frozenset[str]


def _unescape(field: str) -> str:
    for escaped, plain in _ESCAPES.items():
        field = field.replace(escaped, plain)
    return field


def parse_mountinfo(text: str) -> tuple[MountEntry, ...]:
    """Parse mountinfo text into entries, in the kernel's order (later mounts come later).

    Raises:
        BinfmtError: a line does not have the documented shape.
    """
    entries: list[MountEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        head, sep, tail = line.partition(" - ")
        fields = head.split(" ")
        rest = tail.split(" ")
        if not sep or len(fields) < 6 or len(rest) < 2:
            raise BinfmtError(f"mountinfo line {number} is malformed: {line!r}")
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError as exc:
            raise BinfmtError(f"mountinfo line {number} has no mount ids: {line!r}") from exc
        entries.append(
            MountEntry(
                mount_id=mount_id,
                parent_id=parent_id,
                mount_point=_unescape(fields[4]),
                fs_type=rest[0],
                source=_unescape(rest[1]),
                options=frozenset(fields[5].split(",")),
            )
        )
    return tuple(entries)


def mount_at(entries: tuple[MountEntry, ...], mount_point: str) -> MountEntry | None:
    """The mount visible at ``mount_point`` (an absolute, resolved path), or None.

    Mounts stacked on the same point are listed in mount order, so the last one is on top.
    """
    found = [entry for entry in entries if entry.mount_point == mount_point]
    return found[-1] if found else None
