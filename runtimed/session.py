"""IO: one client session for a ``runtimectl`` command: the daemon's socket, or ``--embedded``.

A command module adds the options with :func:`add_session_arguments` and runs its work with
:func:`run_session`, so every command reaches the capabilities through the same protocol path:

    def _ls(args: argparse.Namespace) -> int:
        snapshots = run_session(args, lambda client: client.list_snapshots())
        ...

``--socket PATH`` (default: the socket of the daemon's configuration file, else the built-in
default) names a running daemon;
``--embedded`` starts this daemon in-process on a private socket for the one command (as root;
it registers no emulators at start-up and uses ``--state-dir``/``--binfmt-misc`` when the
command has them; without ``--state-dir`` its store is a throwaway temporary directory).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Final, TypeVar

import trio

from runtimed.client import DEFAULT_SOCKET, Client, open_client
from runtimed.config import DEFAULT_CONFIG_PATH, Config, parse_config
from runtimed.errors import DaemonUnavailableError, sole_exception

T = TypeVar("T")

UNAVAILABLE_HINT: Final = (
    "start the daemon (systemctl start runtimed.socket, or runtimed as root), pass --socket "
    "PATH, or --embedded to run one inside this command (as root)"
)
# The embedded daemon's socket sits in a private 0700 directory, so its allowed group adds
# nobody; naming root's group (which always exists) keeps it from warning that the default
# group "runtimed" is missing on a host without the service.
EMBEDDED_GROUP: Final = "root"


def add_session_arguments(parser: argparse.ArgumentParser) -> None:
    """``--socket PATH`` and ``--embedded``."""
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help=f"the daemon's socket (default: the socket {DEFAULT_CONFIG_PATH} names, else "
        f"{DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="run the daemon inside this command on a private socket (as root)",
    )


def configured_socket(path: Path = DEFAULT_CONFIG_PATH) -> Path:
    """The socket the daemon's configuration file names; the built-in default when there is
    no file or we may not read it.

    Raises:
        ConfigError: the file is not a valid configuration (the daemon would refuse it too).
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return DEFAULT_SOCKET
    return parse_config(text, source=str(path)).socket


def embedded_config(args: argparse.Namespace, state_dir: Path) -> Config:
    """The configuration of an embedded daemon: defaults, the command's paths, no emulators.

    ``state_dir`` serves when the command has no ``--state-dir`` of its own.
    """
    defaults = Config()
    return Config(
        state_dir=getattr(args, "state_dir", None) or state_dir,
        binfmt_misc=getattr(args, "binfmt_misc", None) or defaults.binfmt_misc,
        group=EMBEDDED_GROUP,
        emulators=(),
    )


@asynccontextmanager
async def open_session(args: argparse.Namespace) -> AsyncIterator[Client]:
    """A client of the daemon at ``args.socket``, or of an embedded one (``args.embedded``).

    Raises:
        DaemonUnavailableError: nothing listens on the socket (the hint names the fixes).
        ConfigError: no ``--socket`` and the daemon's configuration file is invalid.
        PermissionDeniedError: the socket refuses us.
    """
    if args.embedded:
        # Imported here: the embedded daemon pulls in the binfmt and sandbox packages, which a
        # client of a running daemon never needs.
        from runtimed.daemon import open_embedded_client

        try:
            # A command without snapshots (platforms, check-binfmt) gets a throwaway store
            # rather than creating the default state directory.
            with tempfile.TemporaryDirectory(prefix="runtimectl-state-") as scratch:
                config = embedded_config(args, Path(scratch))
                async with open_embedded_client(config) as client:
                    yield client
        except BaseExceptionGroup as group:
            # The embedded daemon's nursery wraps what the command raised; the command's
            # error (one line, its exit code) is what the user must see.
            raise sole_exception(group) from None
    else:
        async with AsyncExitStack() as stack:
            try:
                socket = args.socket or configured_socket()
                client = await stack.enter_async_context(open_client(socket))
            except DaemonUnavailableError as exc:
                raise DaemonUnavailableError(
                    exc.message, details=exc.details, hint=UNAVAILABLE_HINT
                ) from exc
            yield client


def run_session(args: argparse.Namespace, use: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``use(client)`` in a session (blocking; for synchronous command handlers)."""

    async def main() -> T:
        async with open_session(args) as client:
            return await use(client)

    return trio.run(main)
