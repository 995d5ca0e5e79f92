"""The layer helpers' fork server (``sandbox.helperserver``) with real processes: helpers come
from one server, a dead server is replaced, a helper whose plan is under way dies with its
server, the server ends with its caller and is out of reach of its terminal, a forked caller
gets a server of its own, and a malformed request gets an error, not a fork.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtimed.errors import SnapshotError
from sandbox import helperserver
from sandbox.archive import UnpackLimits
from sandbox.unpack import LayerHelper
from tests.kernel.test_unpack import ENDED, SMALL, process_state

pytestmark = pytest.mark.kernel

GONE_WITHIN = 10.0  # seconds


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + GONE_WITHIN
    while process_state(pid) not in ENDED:
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.01)


def test_helperserver_helpers_come_from_one_server(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with LayerHelper(fd) as first, LayerHelper(fd) as second:
            server = helperserver.server_pid()
            assert server is not None
            assert parent_of(server) == os.getpid()
            assert parent_of(first.pid) == parent_of(second.pid) == server
            assert first.pid != second.pid
    finally:
        os.close(fd)


def test_helperserver_dead_server_is_replaced(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(SMALL)
    fd = os.open(blob, os.O_RDONLY)
    try:
        LayerHelper(fd).close()  # a server runs
        old = helperserver.server_pid()
        assert old is not None
        os.kill(old, signal.SIGKILL)
        wait_gone(old)
        (tmp_path / "layer").mkdir()
        with LayerHelper(fd) as helper:
            result = helper.apply(parents=(), dest=tmp_path / "layer")
        assert helperserver.server_pid() not in (None, old)
        assert result.entries == 2
        assert (tmp_path / "layer" / "a").read_bytes() == b"a" * 5000
    finally:
        os.close(fd)


def test_helperserver_helper_dies_with_its_server(tmp_path: Path) -> None:
    """A helper reading a stream that never ends is killed when its server goes."""
    read_end, write_end = os.pipe()
    (tmp_path / "layer").mkdir()
    failures: list[BaseException] = []
    try:
        with LayerHelper(read_end) as helper:
            os.write(write_end, SMALL[:512])  # a header, then nothing more

            def apply() -> None:
                try:
                    helper.apply(parents=(), dest=tmp_path / "layer", limits=UnpackLimits())
                except BaseException as exc:
                    failures.append(exc)

            worker = threading.Thread(target=apply)
            worker.start()
            deadline = time.monotonic() + GONE_WITHIN
            # The stream's decoder and hasher threads: the plan is read, PDEATHSIG set.
            while len(list(Path(f"/proc/{helper.pid}/task").iterdir())) < 3:
                assert time.monotonic() < deadline, "the helper never started its stream"
                time.sleep(0.01)
            server = helperserver.server_pid()
            assert server is not None
            os.kill(server, signal.SIGKILL)
            worker.join(GONE_WITHIN)
            assert not worker.is_alive()
    finally:
        os.close(read_end)
        os.close(write_end)
    assert len(failures) == 1
    assert isinstance(failures[0], SnapshotError)
    assert "ended without a report" in failures[0].message


def test_helperserver_ends_with_its_caller(tmp_path: Path) -> None:
    """A caller that dies without a word (SIGKILL) leaves no server behind."""
    script = (
        "import os, sys\n"
        "from sandbox import helperserver\n"
        "from sandbox.unpack import LayerHelper\n"
        f"LayerHelper(os.open({os.fspath(tmp_path)!r}, os.O_RDONLY))\n"
        "print(helperserver.server_pid(), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    caller = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert caller.returncode == -signal.SIGKILL, caller.stderr
    wait_gone(int(caller.stdout))


def test_helperserver_refuses_a_malformed_request() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = subprocess.Popen(
        [sys.executable, "-I", "-m", helperserver.MODULE], stdin=theirs.fileno()
    )
    theirs.close()
    try:
        ours.send(b"junk")
        reply, fds, _, _ = socket.recv_fds(ours, 16, 1)
        assert (reply, fds) == ((-22).to_bytes(4, sys.byteorder, signed=True), [])
        with open(os.devnull, "rb") as null:
            socket.send_fds(ours, [helperserver.REQUEST], [null.fileno()])  # 1 fd, not 4
            reply, fds, _, _ = socket.recv_fds(ours, 16, 1)
        assert (reply, fds) == ((-22).to_bytes(4, sys.byteorder, signed=True), [])
    finally:
        ours.close()
        assert server.wait(GONE_WITHIN) == 0  # the end of its socket ends it


def test_helperserver_is_out_of_reach_of_its_callers_terminal(tmp_path: Path) -> None:
    """A Ctrl-C (SIGINT to the caller's process group) does not reach the server."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        LayerHelper(fd).close()
    finally:
        os.close(fd)
    server = helperserver.server_pid()
    assert server is not None
    assert os.getpgid(server) != os.getpgid(0)
    assert os.getsid(server) == server


def test_helperserver_forked_caller_gets_its_own(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        LayerHelper(fd).close()
        ours = helperserver.server_pid()
        pid = os.fork()
        if pid == 0:  # the child: a helper from a server of its own, or exit 1
            status = 1
            try:
                assert helperserver.server_pid() is None
                LayerHelper(fd).close()
                theirs = helperserver.server_pid()
                status = 0 if theirs not in (None, ours) else 1
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert helperserver.server_pid() == ours
        LayerHelper(fd).close()  # ours still answers
    finally:
        os.close(fd)
