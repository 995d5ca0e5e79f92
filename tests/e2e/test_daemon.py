"""The real daemon on a socket in tmp_path, inside a private user+mount namespace with its own
binfmt_misc instance, driven by runtimed.client and by the reference varlink client."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import pytest
import varlink

from runtimed.client import SyncClient
from runtimed.errors import DaemonUnavailableError, Json, NativePlatformError
from runtimed.session import add_session_arguments, run_session
from tests.support import require, require_private_binfmt, run_private_binfmt, tool

pytestmark = pytest.mark.slow

READY_TIMEOUT: Final = 60.0
EXIT_TIMEOUT: Final = 30.0
CONFIG: Final = 'emulators = ["linux/arm64"]\nshutdown_grace = 2\n'
# Mount a fresh binfmt_misc instance, then become the daemon (same pid: signals reach it).
INNER: Final = (
    'BM=$(mktemp -d) && mount -t binfmt_misc none "$BM" && '
    'exec "$RUNTIMED" --config "$1" --binfmt-misc "$BM" --state-dir "$2" --socket "$3"'
)
NAMESPACE: Final = ("unshare", "--user", "--map-root-user", "--mount", "--")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    path: Path
    state: Path
    log: Path
    notify: socket.socket
    copier: threading.Thread | None = None

    def client(self) -> SyncClient:
        return SyncClient(self.path)

    def notifications(self, timeout: float = READY_TIMEOUT) -> str:
        self.notify.settimeout(timeout)
        return str(self.notify.recv(4096), "utf-8")

    def wait_ready(self) -> str:
        waited = 0.0
        while waited < READY_TIMEOUT:
            try:
                message = self.notifications(timeout=1.0)
            except TimeoutError:
                waited += 1.0
                if self.proc.poll() is not None:
                    break
                continue
            if "READY=1" in message:
                return message
        pytest.fail(f"daemon not ready (exit status {self.proc.poll()}):\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(EXIT_TIMEOUT)
        finally:
            self.notify.close()
            if self.copier is not None:
                self.copier.join(EXIT_TIMEOUT)
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def daemon_command(tmp: Path, config: str) -> tuple[list[str], Path, Path]:
    cfg = tmp / "runtimed.toml"
    cfg.write_text(config)
    state, sock = tmp / "state", tmp / "rt.sock"
    return [*NAMESPACE, "sh", "-c", INNER, "sh", str(cfg), str(state), str(sock)], state, sock


def start_daemon(
    tmp: Path,
    *,
    config: str = CONFIG,
) -> Daemon:
    require_private_binfmt()
    argv, state, sock = daemon_command(tmp, config)
    notify_path = tmp / f"notify-{len(list(tmp.glob('notify-*')))}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log = tmp / "daemon.log"
    env = {**os.environ, "RUNTIMED": str(tool("runtimed")), "NOTIFY_SOCKET": str(notify_path)}
    with log.open("ab") as err:
        proc = subprocess.Popen(argv, stderr=err, env=env)
    return Daemon(proc=proc, path=sock, state=state, log=log, notify=notify)


def start_activated_daemon(tmp: Path, listen: Path) -> Daemon:
    """The daemon under systemd-socket-activate, returned once that listens on ``listen``."""
    activate = require_tool("systemd-socket-activate")
    require_private_binfmt()
    argv, state, sock = daemon_command(tmp, CONFIG)
    notify_path = tmp / "notify-activated"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = {**os.environ, "RUNTIMED": str(tool("runtimed")), "NOTIFY_SOCKET": str(notify_path)}
    command = [activate, "-l", str(listen), "--fdname=varlink", "-E", "NOTIFY_SOCKET", "-E"]
    proc = subprocess.Popen([*command, "RUNTIMED", *argv], stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    log = tmp / "daemon.log"
    # "Listening on <path> as 3." comes before any connection can be accepted; the rest of
    # stderr (the daemon's log) is copied to the log file by a thread.
    first = proc.stderr.readline()
    assert b"Listening on" in first, first
    copier = threading.Thread(target=_copy, args=(proc.stderr, log), daemon=True)
    copier.start()
    return Daemon(proc=proc, path=sock, state=state, log=log, notify=notify, copier=copier)


def _copy(stream: IO[bytes], log: Path) -> None:
    with log.open("ab", buffering=0) as out:
        for line in stream:
            out.write(line)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # Not under pytest's 0700 temp root: a client running as nobody must reach the socket.
    tmp = Path(tempfile.mkdtemp(prefix="runtimed-e2e-"))
    tmp.chmod(0o711)
    try:
        running = start_daemon(tmp)
        running.wait_ready()
        yield running
        assert running.stop() == 0
    finally:
        shutil.rmtree(tmp)


def test_daemon_e2e_get_platforms_reports_the_configured_emulator(daemon: Daemon) -> None:
    report = daemon.client().get_platforms()
    emulated = report["emulated"]
    assert isinstance(emulated, dict)
    emulator = emulated["linux/arm64"]
    assert isinstance(emulator, dict)
    assert str(emulator["interpreter"]).endswith("qemu-aarch64-static")
    assert str(report["host"]).startswith("linux/amd64")


def test_daemon_e2e_reference_varlink_client(daemon: Daemon) -> None:
    with varlink.Client(address=f"unix:{daemon.path}") as client:
        assert "io.runtimed" in client.get_interfaces()
        with client.open("io.runtimed") as conn:
            report = conn.GetPlatforms()["report"]
            assert "linux/arm64" in report["emulated"]
            with pytest.raises(varlink.VarlinkError) as info:
                conn.InspectSnapshot("sha256:" + "0" * 64)
            assert info.value.error() == "io.runtimed.SnapshotNotFound"


def _exchange(path: Path, data: bytes) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [json.loads(frame) for frame in received.split(b"\0") if frame]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xff\xfe garbage\0", "io.runtimed.MalformedFrame"),
        (b"[1]\0", "io.runtimed.MalformedFrame"),
        (b"{" + b" " * (8 * 1024 * 1024 + 10), "io.runtimed.MalformedFrame"),
    ],
)
def test_daemon_e2e_malformed_frames_close_only_that_connection(
    daemon: Daemon, data: bytes, error: str
) -> None:
    replies = _exchange(daemon.path, data)
    assert [r.get("error") for r in replies] == [error]
    assert daemon.client().get_info()["product"] == "runtimed"


def test_daemon_e2e_invalid_message_is_answered_and_the_connection_goes_on(
    daemon: Daemon,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.path))
        sock.sendall(b'{"method": 7}\0{"method": "org.varlink.service.GetInfo"}\0')
        received = b""
        while received.count(b"\0") < 2:
            received += sock.recv(65536)
    first, second = (json.loads(f) for f in received.split(b"\0")[:2])
    assert first["error"] == "org.varlink.service.InvalidParameter"
    assert first["parameters"]["parameter"] == "method"
    assert second["parameters"]["product"] == "runtimed"


# Imports first (the interpreter may live where nobody cannot read), then drop to nobody, then
# connect: SO_PEERCRED records the credentials of connect().
NOBODY_CLIENT: Final = """
import json, os, socket, sys
from runtimed.interface import error_from_reply
os.setgroups([int(g) for g in sys.argv[2:]]); os.setgid(65534); os.setuid(65534)
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.connect(sys.argv[1])
    sock.sendall(b'{"method":"io.runtimed.ListSnapshots"}\\0')
    reply = json.loads(sock.recv(65536).split(b"\\0")[0])
if "error" in reply:
    exc = error_from_reply(reply["error"], reply["parameters"])
    print(type(exc).__name__, exc.details.get("uid"))
else:
    print("allowed", len(reply["parameters"]["snapshots"]))
"""


def run_as_nobody(socket_path: Path, *groups: int) -> list[str]:
    require(os.geteuid() == 0, "needs root to setuid() to nobody")
    # Open the socket file itself, so the daemon's peer check is what decides.
    os.chmod(socket_path, 0o666)
    out = subprocess.run(
        [sys.executable, "-c", NOBODY_CLIENT, str(socket_path), *map(str, groups)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.split()


def test_daemon_e2e_peer_outside_the_group_is_refused_and_logged(daemon: Daemon) -> None:
    try:
        # Outside the daemon's user namespace nobody is unmapped: it shows as overflowuid.
        assert run_as_nobody(daemon.path) == ["PermissionDeniedError", "65534"]
    finally:
        os.chmod(daemon.path, 0o600)
    assert "refused: pid" in daemon.log.read_text()


def test_daemon_e2e_supplementary_group_member_is_allowed() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="runtimed-e2e-"))
    tmp.chmod(0o711)
    try:
        # gid 0 is the one group mapped into the daemon's user namespace; nobody with root as
        # a supplementary group is let in through SO_PEERGROUPS.
        running = start_daemon(tmp, config=CONFIG + 'group = "root"\n')
        running.wait_ready()
        try:
            assert run_as_nobody(running.path, 0) == ["allowed", "0"]
        finally:
            assert running.stop() == 0
    finally:
        shutil.rmtree(tmp)


def test_daemon_e2e_socket_mode_without_group_is_owner_only(daemon: Daemon) -> None:
    assert daemon.path.stat().st_mode & 0o777 == 0o600


def test_daemon_e2e_sigterm_exits_0_and_removes_its_socket(tmp_path: Path) -> None:
    # gid 0 is the one group mapped into the daemon's user namespace.
    running = start_daemon(tmp_path, config=CONFIG + 'group = "root"\n')
    running.wait_ready()
    mode = running.path.stat()
    assert (mode.st_mode & 0o777, mode.st_gid) == (0o660, 0)
    assert running.stop(signal.SIGTERM) == 0
    assert not running.path.exists()
    log = running.log.read_text()
    assert "<6>received SIGTERM" in log
    assert "<6>stopped" in log


def test_daemon_e2e_restart_after_kill_9_replaces_the_stale_socket(tmp_path: Path) -> None:
    first = start_daemon(tmp_path)
    first.wait_ready()
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert first.path.is_socket()  # left behind
    with pytest.raises(DaemonUnavailableError):
        first.client().get_info()
    second = start_daemon(tmp_path)
    second.wait_ready()
    assert second.client().list_snapshots() == []
    assert "replacing stale socket" in second.log.read_text()
    assert second.stop() == 0


def test_daemon_e2e_second_daemon_on_a_live_socket_refuses(daemon: Daemon, tmp_path: Path) -> None:
    argv, _, _ = daemon_command(tmp_path, CONFIG)
    argv[-1] = str(daemon.path)
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RUNTIMED": str(tool("runtimed"))},
        check=False,
    )
    assert out.returncode == 1
    assert f"another daemon is listening on {daemon.path}" in out.stderr
    assert daemon.client().get_info()["product"] == "runtimed"


def test_daemon_e2e_socket_activation_and_readiness(tmp_path: Path) -> None:
    listen = tmp_path / "activated.sock"
    running = start_activated_daemon(tmp_path, listen)
    try:
        # systemd-socket-activate starts the daemon on the first connection; ours waits in
        # the backlog until the daemon serves it.
        info = SyncClient(listen).get_info()
        assert info["product"] == "runtimed"
        ready = running.wait_ready()
        assert "STATUS=serving" in ready
        assert not running.path.exists()  # --socket is not used when activated
    finally:
        assert running.stop() == 0
    # A thread copies the daemon's stderr into the log; stop() joins it, so only now are no
    # lines still in flight.
    assert "socket activation: 1 socket(s) from systemd" in running.log.read_text()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"{name} is not installed (apt-get install systemd)")
    assert path is not None
    return path


def test_daemon_e2e_check_config(tmp_path: Path) -> None:
    runtimed = str(tool("runtimed"))
    good = subprocess.run(
        [runtimed, "--check-config", "--socket", str(tmp_path / "s")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text("[limits]\nconcurrent_execs = 0\n")
    bad = subprocess.run(
        [runtimed, "--check-config", "--config", str(bad_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "limits.concurrent_execs" in bad.stderr


EMBEDDED: Final = """
import sys
from pathlib import Path
import trio
from runtimed.config import Config
from runtimed.daemon import open_embedded_client

async def main() -> None:
    config = Config(state_dir=Path(sys.argv[1]), binfmt_misc=Path(sys.argv[2]), emulators=())
    async with open_embedded_client(config) as client:
        info = await client.get_info()
        report = await client.get_platforms()
        print(info["product"], report["host"], len(await client.list_snapshots()))

trio.run(main)
"""


def test_daemon_e2e_embedded_daemon_serves_one_command(tmp_path: Path) -> None:
    out = run_private_binfmt(
        '"$PY" -c "$1" "$2" "$BM"', args=[EMBEDDED, str(tmp_path / "state")], timeout=120
    )
    assert out.returncode == 0, out.stderr
    product, host, snapshots = out.stdout.split()
    assert (product, snapshots) == ("runtimed", "0")
    assert host.startswith("linux/amd64")


def test_daemon_e2e_install_and_uninstall_emulators(daemon: Daemon) -> None:
    client = daemon.client()

    def emulated(report: Json) -> list[str]:
        assert isinstance(report, dict)
        assert isinstance(report["emulated"], dict)
        return list(report["emulated"])

    installed = client.install_emulators(["linux/s390x"])
    assert "linux/s390x" in str(installed["changes"])
    assert "linux/s390x" in emulated(installed["report"])
    assert "linux/s390x" in emulated(client.get_platforms())
    removed = client.uninstall_emulators(["linux/s390x"])
    assert "linux/s390x" not in emulated(removed["report"])
    with pytest.raises(NativePlatformError):
        client.install_emulators(["linux/amd64"])
    diagnosis = client.check_binfmt()
    assert isinstance(diagnosis["ok"], bool)
    assert isinstance(diagnosis["findings"], list)


def test_daemon_e2e_peer_reset_with_unread_reply_is_survived(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.path))
        sock.sendall(b'{"method":"org.varlink.service.GetInfo"}\0')
        sock.recv(1, socket.MSG_PEEK)  # the reply is there, and stays unread
    # Closing with unread data makes the daemon's next receive fail with ECONNRESET.
    assert daemon.client().get_info()["product"] == "runtimed"
    assert daemon.proc.poll() is None


def test_daemon_e2e_session_reaches_a_running_daemon(daemon: Daemon) -> None:
    parser = argparse.ArgumentParser()
    add_session_arguments(parser)
    args = parser.parse_args(["--socket", str(daemon.path)])
    assert run_session(args, lambda client: client.list_snapshots()) == []


SESSION_EMBEDDED: Final = """
import argparse, sys
from pathlib import Path
from runtimed.session import add_session_arguments, run_session

parser = argparse.ArgumentParser()
add_session_arguments(parser)
parser.add_argument("--state-dir", type=Path)
parser.add_argument("--binfmt-misc", type=Path)
args = parser.parse_args(sys.argv[1:])
print(run_session(args, lambda client: client.get_info())["product"])
"""


def test_daemon_e2e_session_embedded(tmp_path: Path) -> None:
    out = run_private_binfmt(
        '"$PY" -c "$1" --embedded --state-dir "$2" --binfmt-misc "$BM"',
        args=[SESSION_EMBEDDED, str(tmp_path / "state")],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["runtimed"]
