"""Pure. User namespace ID maps (user_namespaces(7), "User and group ID mappings").

The hermetic sandbox's user namespace is identity-mapped: every ID the creating namespace
has is the same ID inside, so file ownership in the snapshot's layers means the same thing
on both sides. The map is written by the parent (in the creating namespace), one line per
range of the parent's own map: ``<id> <id> <count>``.
"""

from __future__ import annotations

from runtimed.errors import SandboxError

MAX_LINES = 340  # the kernel's limit since Linux 4.15


def identity_map(own_map: str) -> str:
    """The identity map of the ranges in ``own_map`` (the text of ``/proc/self/uid_map``).

    Raises:
        SandboxError: a malformed map line.
    """
    lines = []
    for line in own_map.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise SandboxError(f"malformed ID map line {line!r}")
        inside, _, count = fields
        lines.append(f"{inside} {inside} {count}")
    if not lines or len(lines) > MAX_LINES:
        raise SandboxError(f"ID map with {len(lines)} lines cannot be mirrored")
    return "\n".join(lines) + "\n"
