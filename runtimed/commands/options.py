"""IO: the ``runtimectl`` options several command groups share, each declared once.

Both name a path the command itself uses and, with ``--embedded``, the daemon it starts
(:func:`runtimed.session.embedded_config` reads them from the parsed arguments).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from binfmt import kernel
from sandbox.store import DEFAULT_STATE_DIR


def add_state_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--state-dir DIR``: the snapshot store's state directory."""
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="the snapshot store's state directory, for --embedded and for snapshot "
        "mount/unmount (default: %(default)s)",
    )


def add_binfmt_misc_argument(parser: argparse.ArgumentParser) -> None:
    """``--binfmt-misc DIR``: the binfmt_misc mount to read or change."""
    parser.add_argument(
        "--binfmt-misc",
        type=Path,
        default=kernel.DEFAULT_BINFMT_MISC,
        metavar="DIR",
        help="the binfmt_misc mount to use, also by --embedded (default: %(default)s)",
    )
