"""Unit tests of the mountinfo parser."""

from __future__ import annotations

import pytest

from binfmt.mountinfo import mount_at, parse_mountinfo
from runtimed.errors import BinfmtError

SAMPLE = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
47 22 0:40 / /proc/sys/fs/binfmt_misc rw,relatime shared:5 - autofs systemd-1 rw,fd=30
63 47 0:39 / /proc/sys/fs/binfmt_misc rw,nosuid,nodev,noexec - binfmt_misc binfmt_misc rw
70 27 0:50 / /tmp/with\\040space rw - tmpfs my\\134src rw
"""


def test_mountinfo_parses_fields_and_escapes() -> None:
    entries = parse_mountinfo(SAMPLE)
    assert [e.fs_type for e in entries] == ["proc", "autofs", "binfmt_misc", "tmpfs"]
    assert entries[3].mount_point == "/tmp/with space"
    assert entries[3].source == "my\\src"
    assert "noexec" in entries[2].options
    assert entries[2].parent_id == 47


@pytest.mark.parametrize(
    ("point", "fs_type"),
    [
        ("/proc/sys/fs/binfmt_misc", "binfmt_misc"),  # the mount on top of the automount
        ("/proc", "proc"),
        ("/tmp/with space", "tmpfs"),
        ("/proc/sys", None),
    ],
)
def test_mountinfo_mount_at_returns_the_top_mount(point: str, fs_type: str | None) -> None:
    found = mount_at(parse_mountinfo(SAMPLE), point)
    assert (found.fs_type if found else None) == fs_type


@pytest.mark.parametrize("line", ["22 27 0:21 / /proc rw", "x y 0:21 / /proc rw - proc proc rw"])
def test_mountinfo_malformed_line_is_refused(line: str) -> None:
    with pytest.raises(BinfmtError, match="mountinfo line 1"):
        parse_mountinfo(line)
