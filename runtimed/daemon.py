"""IO: the ``runtimed`` daemon entry point: configuration, start-up, listening, signals.

Start-up, in order: load the configuration (file, then flags); make sure binfmt_misc is mounted
and register the configured emulators; probe the platforms; recover the state directory (the
snapshot store removes what a crash left when it opens alone); listen (systemd socket
activation, or our own socket: mode 0660, group from the configuration, a stale socket file
replaced only after a failed connect); and only then tell systemd ``READY=1``.

Signals (``trio.open_signal_receiver``): SIGTERM/SIGINT stop accepting, give running calls the
configured grace period, cancel what still runs (an exec's tree is killed by the sandbox's
cancellation), send ``STOPPING=1`` and exit 0. SIGHUP re-reads the configuration and applies
what can change without a restart: limits, the allowed group, the emulator set.

Logs go to stderr in the journal's style: ``<6>message`` (syslog priority, no timestamp; the
journal adds it), with ``[request-id]`` on every line about a request.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Final

import trio

from runtimed.backend import DaemonBackend, install_handlers
from runtimed.client import Client, open_client
from runtimed.config import DEFAULT_CONFIG_PATH, Config, apply_overrides, parse_config
from runtimed.errors import ConfigError, RuntimedError, leaf_exceptions
from runtimed.handlers import ExecGate, method_table
from runtimed.server import REQUEST_ID, Peer, Server, UnixTransport, peer_allowed
from runtimed.systemd import (
    ACTIVATION_VARIABLES,
    listen_fd_is_unix_stream,
    notify,
    parse_listen_fds,
)

log = logging.getLogger(__name__)

STALE_CHECK_TIMEOUT: Final = 1.0
"""Seconds a connect to an existing socket file may take before we call it stale."""
STOP_MARGIN: Final = 5.0
"""Seconds cancelled work gets after the grace period to clean up (kill trees, unmount)."""

# syslog(3) priorities, as sd-daemon(3) reads them from "<N>" prefixes.
_PRIORITIES: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """``<priority>[request] message``, one prefix per line, no timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        request = REQUEST_ID.get()
        if request is not None:
            text = f"[{request}] {text}"
        prefix = f"<{_PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runtimed", description="The runtimed daemon.")
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help=f"(default: {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument("--socket", metavar="PATH", help="listen here (without socket activation)")
    parser.add_argument("--state-dir", metavar="DIR", help="snapshots and run state")
    parser.add_argument("--binfmt-misc", metavar="DIR", help="the binfmt_misc mount to use")
    parser.add_argument("--group", metavar="NAME", help="clients in this group may connect")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """The configuration file (if any) with the flags put over it.

    Raises:
        ConfigError: the file named by --config is missing or unreadable, or a value is invalid.
    """
    path: Path = args.config or DEFAULT_CONFIG_PATH
    try:
        text = path.read_text()
    except FileNotFoundError:
        if args.config is not None:
            raise ConfigError(f"{path}: no such file", details={"source": str(path)}) from None
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}", details={"source": str(path)}) from exc
    overrides = {
        "socket": args.socket,
        "state_dir": args.state_dir,
        "binfmt_misc": args.binfmt_misc,
        "group": args.group,
    }
    return apply_overrides(parse_config(text, source=str(path)), overrides)


def resolve_group(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("group %s does not exist: only root may connect", name)
        return None


def bind_socket(path: Path, gid: int | None) -> socket.socket:
    """Our own listening socket: mode 0660 and group ``gid`` (0600 without a group).

    Raises:
        ConfigError: the path is taken by something that is not a socket, or a daemon
            answers on it, or binding fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{path} exists and is not a socket", details={"key": "socket"})
        if _answers(path):
            raise ConfigError(
                f"another daemon is listening on {path}",
                details={"key": "socket"},
                hint="stop it first, or pass --socket PATH",
            )
        log.info("replacing stale socket %s", path)
        path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    mode = 0o660 if gid is not None else 0o600
    try:
        # fchmod before bind sets the mode of the inode bind creates (minus the umask), so
        # the socket is never more open than intended; chmod after bind undoes the umask.
        os.fchmod(sock.fileno(), mode)
        sock.bind(os.fspath(path))
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        os.chmod(path, mode, follow_symlinks=False)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"listen on {path}: {exc.strerror}", details={"key": "socket"}) from exc
    return sock


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(STALE_CHECK_TIMEOUT)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # a timeout or EACCES: someone is there, do not take it away
    return True


def activated_sockets(env: Mapping[str, str]) -> list[socket.socket]:
    """The listening sockets systemd passed, if any (the variables are removed after).

    Raises:
        ConfigError: a passed descriptor is not a listening AF_UNIX stream socket.
    """
    fds = parse_listen_fds(env, pid=os.getpid())
    for name in ACTIVATION_VARIABLES:
        os.environ.pop(name, None)
    sockets = []
    for listen in fds:
        if not listen_fd_is_unix_stream(listen.fd):
            raise ConfigError(
                f"socket activation: fd {listen.fd} ({listen.name}) is not a listening Unix "
                "stream socket",
                details={"key": "LISTEN_FDS"},
            )
        os.set_inheritable(listen.fd, False)
        sockets.append(socket.socket(fileno=listen.fd))
    return sockets


@dataclass
class Daemon:
    """The running daemon's state, shared by start-up, the signal loop and the handlers."""

    load: Callable[[], Config]
    """Reads the configuration again (SIGHUP); raises ConfigError."""
    config: Config
    env: Mapping[str, str]
    allowed_gid: int | None = field(init=False)
    backend: DaemonBackend = field(init=False)
    server: Server[trio.SocketStream] = field(init=False)
    gate: ExecGate = field(init=False)
    own_socket: Path | None = field(init=False, default=None)
    state: contextlib.ExitStack = field(init=False, default_factory=contextlib.ExitStack)

    def __post_init__(self) -> None:
        self.allowed_gid = resolve_group(self.config.group)
        self.backend = DaemonBackend(lambda: self.config)
        self.gate = ExecGate(lambda: self.config.limits)
        description = resources.files("runtimed").joinpath("io.runtimed.varlink").read_text()
        self.server = Server(
            method_table(
                self.backend,
                description=description,
                limits=lambda: self.config.limits,
                gate=self.gate,
            ),
            limits=lambda: self.config.limits,
            authorize=self.authorize,
            transport_for=UnixTransport,
        )

    def authorize(self, peer: Peer) -> bool:
        return peer_allowed(peer, self.allowed_gid)

    async def start(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prepare, listen, serve; reports started once the socket accepts."""
        await self.install_emulators()
        report = await self.backend.refresh_platforms()
        log.info(
            "host %s: %d native, %d emulated, %d unavailable platforms",
            report.host,
            len(report.native),
            len(report.emulated),
            len(report.unavailable),
        )
        await trio.to_thread.run_sync(self.recover)
        try:
            # Runners started ahead of the execs, and their clean-ups, for the daemon's life.
            async with self.backend.open_runners():
                await self.listen_and_serve(task_status)
        finally:
            self.state.close()

    async def listen_and_serve(self, task_status: trio.TaskStatus[None]) -> None:
        sockets = activated_sockets(self.env)
        if sockets:
            log.info("socket activation: %d socket(s) from systemd", len(sockets))
        else:
            sockets = [bind_socket(self.config.socket, self.allowed_gid)]
            self.own_socket = self.config.socket
            log.info("listening on %s", self.config.socket)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        await self.server.serve(listeners, task_status=task_status)

    def recover(self) -> None:
        """Clean what a crash left in the state directory and keep it claimed while we run."""
        store = self.state.enter_context(self.backend.open_state())
        log.info("snapshot store at %s: %d snapshots", store.state_dir, store.count())

    async def install_emulators(self) -> None:
        wanted = self.config.emulators
        if wanted == ():
            return
        path = self.config.binfmt_misc
        try:
            result = await trio.to_thread.run_sync(
                lambda: install_handlers(
                    path, None if wanted is None else list(wanted), force=False
                )
            )
        except RuntimedError as exc:
            log.warning("emulators not installed: %s", exc)
            return
        for change in result.plan.changes:
            log.debug("emulator %s: %s (%s)", change.platform, change.outcome, change.entry)
        for platform, why in result.skipped:
            log.debug("emulator %s skipped: %s", platform, why)

    async def reload(self) -> None:
        try:
            config = self.load()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            notify(self.env, STATUS=f"reload refused: {exc.message}; {self.status()}")
            return
        for key in ("socket", "state_dir", "binfmt_misc"):
            if getattr(config, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect at the next start", key)
                config = apply_overrides(config, {key: str(getattr(self.config, key))})
        self.config = config
        self.allowed_gid = resolve_group(config.group)
        setup_logging(config.log_level)
        await self.install_emulators()
        await self.backend.refresh_platforms()
        log.info("configuration reloaded")
        notify(self.env, STATUS=self.status())

    def status(self) -> str:
        return (
            f"serving: {self.server.connections} connections, {self.gate.running} execs "
            f"(limit {self.config.limits.concurrent_execs})"
        )

    async def stop(self) -> None:
        notify(self.env, STOPPING="1", STATUS=f"stopping: {self.server.running_calls} calls")
        log.info("stopping: %d calls running", self.server.running_calls)
        await self.server.drain(self.config.shutdown_grace)

    def remove_own_socket(self) -> None:
        if self.own_socket is not None:
            self.own_socket.unlink(missing_ok=True)


async def serve(daemon: Daemon) -> None:
    """Run the daemon until SIGTERM/SIGINT (one root nursery)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            started = trio.Event()

            async def run() -> None:
                await nursery.start(daemon.start)
                started.set()
                notify(daemon.env, READY="1", STATUS=daemon.status())
                log.info("ready")

            nursery.start_soon(run)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if started.is_set():
                        await daemon.reload()
                    continue
                log.info("received %s", signal.Signals(signum).name)
                if started.is_set():
                    with trio.move_on_after(daemon.config.shutdown_grace + STOP_MARGIN):
                        await daemon.stop()
                nursery.cancel_scope.cancel()
                break
    daemon.remove_own_socket()


@contextlib.asynccontextmanager
async def open_embedded_client(config: Config) -> AsyncIterator[Client]:
    """This daemon, in-process on a private socket, and a client connected to it.

    For ``runtimectl --embedded``: one command goes through the same protocol path as with a
    running daemon. The socket lives in a fresh 0700 directory, so only this process (and
    root) can reach it; ``config.socket`` is ignored. Leaving the block stops the daemon.

    Raises:
        RuntimedError: start-up failed (the store cannot be opened, the socket not bound).
    """
    with tempfile.TemporaryDirectory(prefix="runtimed-embedded-") as private:
        config = replace(config, socket=Path(private) / "runtimed.sock")
        daemon = Daemon(load=lambda: config, config=config, env={})
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.start)
            try:
                async with open_client(config.socket) as client:
                    yield client
            finally:
                await daemon.stop()
                nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"runtimed: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.check_config:
        print(f"runtimed: configuration OK (socket {config.socket}, state {config.state_dir})")
        sys.exit(0)
    setup_logging(config.log_level)
    daemon = Daemon(load=partial(load_config, args), config=config, env=dict(os.environ))
    try:
        trio.run(serve, daemon)
    except* RuntimedError as group:
        for error in leaf_exceptions(group):
            log.error("%s", error)
        sys.exit(1)
    log.info("stopped")
