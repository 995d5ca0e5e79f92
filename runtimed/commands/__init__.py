"""IO: the command groups of ``runtimectl``; each module has ``register(subparsers)``.

To add a group, write ``runtimed/commands/<group>.py`` and list it in COMMAND_MODULES.
Options several groups share are declared once, in ``runtimed/commands/options.py``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

from runtimed.commands import binfmt_cmd, run_cmd, snapshot_cmd

COMMAND_MODULES: Final[tuple[ModuleType, ...]] = (binfmt_cmd, snapshot_cmd, run_cmd)
