"""The entry codec against the real kernel: what we format registers, and what the kernel
prints back parses to the same entry and equals our model of its status text."""

from __future__ import annotations

import pytest

from binfmt.entry import (
    BinfmtEntry,
    BinfmtFlag,
    BinfmtKind,
    format_register_line,
    format_status,
    parse_status,
)
from tests.support import run_private_binfmt

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# Register each line of $ENTRY_LINES with a single write(2), then print each entry's status
# file between markers; disable the last one first so "disabled" is covered too.
SCRIPT = r"""
"$PY" -c 'import os, sys
for line in os.environ["ENTRY_LINES"].split("\n"):
    fd = os.open(sys.argv[1], os.O_WRONLY)
    os.write(fd, os.fsencode(line))
    os.close(fd)' "$BM/register"
echo 0 > "$BM/runtimed-test-ext"
for name in runtimed-test-magic runtimed-test:colon runtimed-test-ext; do
    printf '=== %s\n' "$name"
    cat "$BM/$name"
done
"""

ENTRIES = (
    BinfmtEntry(
        name="runtimed-test-magic",
        offset=3,
        magic=b"\x7fELF\x02\x01\x01\x00\\:",
        mask=b"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff",
        interpreter="/bin/true",
        flags=frozenset({BinfmtFlag.FIX_BINARY, BinfmtFlag.PRESERVE_ARGV0}),
    ),
    BinfmtEntry(
        name="runtimed-test:colon",
        magic=b"#!runtimed",
        interpreter="/nonexistent/interp:er",
        flags=frozenset({BinfmtFlag.CREDENTIALS}),
    ),
    BinfmtEntry(
        name="runtimed-test-ext",
        kind=BinfmtKind.EXTENSION,
        magic=b"rtdtest",
        interpreter="/nonexistent/interpreter",
        enabled=False,
    ),
)


def test_entry_kernel_status_round_trip() -> None:
    lines = [format_register_line(e).decode() for e in ENTRIES]
    result = run_private_binfmt(SCRIPT, env={"ENTRY_LINES": "\n".join(lines)}, timeout=30)
    assert result.returncode == 0, result.stderr
    printed: dict[str, str] = {}
    for block in result.stdout.split("=== ")[1:]:
        name, _, text = block.partition("\n")
        printed[name] = text
    for entry in ENTRIES:
        text = printed[entry.name]
        assert text == format_status(entry)
        assert parse_status(entry.name, text) == entry
