"""IO: the ``runtimed`` daemon entry point (wiring, signals, readiness)."""

from __future__ import annotations

import sys


def main() -> None:
    print("runtimed: the daemon is not built yet (see the daemon issue)", file=sys.stderr)
    sys.exit(1)
