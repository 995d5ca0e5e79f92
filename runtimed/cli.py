"""IO: ``runtimectl``, the command-line client. The only module (with daemon.py) that prints.

Each command group lives in ``runtimed/commands/<group>.py`` and exposes
``register(subparsers)``; a registered command sets ``func(args) -> int`` as its handler. Errors
of the project's hierarchy print one clear line (plus the hint) and map to exit codes through
:data:`runtimed.errors.ExitArea`; ``--json`` commands print the error as a JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from runtimed.commands import COMMAND_MODULES
from runtimed.errors import RuntimedError


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors, which is the exit code we document for them."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="runtimectl", description="Control the runtimed build runtime.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.WARNING,
        format="runtimectl: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        status: int = args.func(args)
    except RuntimedError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.to_json()}, indent=2))
        else:
            print(f"runtimectl: error: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"runtimectl: hint: {exc.hint}", file=sys.stderr)
        return int(exc.exit_area)
    except KeyboardInterrupt:
        return 130
    return status


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
