"""Snapshots and Exec through the real daemon: import by descriptor, native and emulated runs
with streamed output, refusals, disconnects, SIGTERM with running execs, kill -9 and restart."""

from __future__ import annotations

import base64
import os
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import psutil
import pytest
import trio
import varlink

from runtimed.client import ExecOutput, ExecResult, SyncClient, open_client
from runtimed.errors import (
    DaemonUnavailableError,
    InvalidParamsError,
    InvalidSpecError,
    Json,
    NoEmulatorError,
    NonLinuxExecError,
    SnapshotNotFoundError,
)
from tests.e2e.test_daemon import Daemon, start_daemon
from tests.support import busybox

pytestmark = pytest.mark.slow

GONE_TIMEOUT: Final = 15.0


def rootfs_tar(directory: Path, arch: str) -> Path:
    tar = directory / f"busybox-{arch}.tar"
    with tarfile.open(tar, "w") as out:
        out.add(busybox(arch), "bin/busybox")
    return tar


def import_tar(client: SyncClient, tar: Path) -> str:
    with tar.open("rb") as f:
        snapshot = client.import_snapshot(f.fileno())
    assert isinstance(snapshot["id"], str)
    return snapshot["id"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("exec")
    tars = {arch: rootfs_tar(tmp, arch) for arch in ("amd64", "arm64")}
    running = start_daemon(tmp)
    running.wait_ready()
    client = running.client()
    yield running, {arch: import_tar(client, tar) for arch, tar in tars.items()}
    assert running.stop() == 0


def busybox_spec(snapshot: str, *args: str, **extra: Json) -> dict[str, Json]:
    return {"snapshot": snapshot, "args": ["/bin/busybox", *args], **extra}


def processes_with(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def test_daemon_exec_import_lists_and_inspects(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, snapshots = served
    client = daemon.client()
    listed = {s["id"]: s["platform"] for s in client.list_snapshots() if isinstance(s, dict)}
    assert listed[snapshots["arm64"]] == "linux/arm64"
    assert listed[snapshots["amd64"]] == "linux/amd64"
    assert client.inspect_snapshot(snapshots["arm64"])["platform"] == "linux/arm64"
    with pytest.raises(SnapshotNotFoundError):
        client.inspect_snapshot("sha256:" + "1" * 64)


def test_daemon_exec_import_from_a_pipe(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, snapshots = served
    tar = daemon.state.parent / "busybox-arm64.tar"
    read, write = os.pipe()

    def feed() -> None:
        with open(write, "wb") as out:
            out.write(tar.read_bytes())

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        assert daemon.client().import_snapshot(read)["id"] == snapshots["arm64"]
    finally:
        feeder.join()
        os.close(read)


@pytest.mark.parametrize(
    ("path", "flags"),
    [
        ("/", os.O_RDONLY | os.O_DIRECTORY),  # a tree the daemon would walk with root's rights
        ("/etc/shadow", os.O_PATH),  # names a file without granting read access
        ("/dev/null", os.O_WRONLY),
    ],
)
def test_daemon_exec_import_refuses_descriptors_it_must_not_read(
    served: tuple[Daemon, dict[str, str]], path: str, flags: int
) -> None:
    daemon, _ = served
    fd = os.open(path, flags)
    try:
        with pytest.raises(InvalidParamsError) as info:
            daemon.client().import_snapshot(fd)
        assert info.value.details["parameter"] == "fileDescriptor"
    finally:
        os.close(fd)


def test_daemon_exec_export_refuses_a_read_only_descriptor(
    served: tuple[Daemon, dict[str, str]], tmp_path: Path
) -> None:
    daemon, snapshots = served
    target = tmp_path / "ro.tar"
    target.write_bytes(b"")
    fd = os.open(target, os.O_RDONLY)
    try:
        with pytest.raises(InvalidParamsError):
            daemon.client().export_snapshots([snapshots["amd64"]], fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("arch", "machine", "mode"),
    [("amd64", b"x86_64\n", "native"), ("arm64", b"aarch64\n", "emulated")],
)
def test_daemon_exec_native_and_emulated(
    served: tuple[Daemon, dict[str, str]], arch: str, machine: bytes, mode: str
) -> None:
    daemon, snapshots = served
    outcome = daemon.client().exec(busybox_spec(snapshots[arch], "uname", "-m"))
    assert outcome.stdout == machine
    assert outcome.result["exit_code"] == 0
    report = outcome.result["report"]
    assert isinstance(report, dict)
    assert report["mode"] == mode
    assert report["confirmed"] is True
    if mode == "emulated":
        assert str(report["interpreter"]).endswith("qemu-aarch64-static")


async def test_daemon_exec_streams_output_in_order(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, snapshots = served
    script = "echo one; echo two >&2; echo three; exit 3"
    events = []
    async with (
        open_client(daemon.path) as client,
        client.open_exec(busybox_spec(snapshots["arm64"], "sh", "-c", script)) as stream,
    ):
        events = [event async for event in stream]
    out = [e for e in events if isinstance(e, ExecOutput)]
    assert b"".join(e.data for e in out if e.stream == "stdout") == b"one\nthree\n"
    assert b"".join(e.data for e in out if e.stream == "stderr") == b"two\n"
    final = events[-1]
    assert isinstance(final, ExecResult)
    assert final.result["exit_code"] == 3


@pytest.mark.parametrize(
    ("platform", "error"),
    [("windows/amd64", NonLinuxExecError), ("linux/s390x", NoEmulatorError)],
)
def test_daemon_exec_refusals(
    served: tuple[Daemon, dict[str, str]], platform: str, error: type[Exception]
) -> None:
    daemon, snapshots = served
    with pytest.raises(error):
        daemon.client().exec(busybox_spec(snapshots["amd64"], "true", platform=platform))


def test_daemon_exec_invalid_spec(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, snapshots = served
    with pytest.raises(InvalidSpecError):
        daemon.client().exec({"snapshot": snapshots["amd64"], "args": "not a list"})


def test_daemon_exec_reference_client_streams(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, snapshots = served
    spec = busybox_spec(snapshots["arm64"], "echo", "hello")
    with (
        varlink.Client(address=f"unix:{daemon.path}") as client,
        client.open("io.runtimed") as conn,
    ):
        replies = list(conn.Exec(spec, _more=True))
    assert replies[0]["stream"] == "stdout"
    assert base64.b64decode(replies[0]["data"]) == b"hello\n"
    assert replies[-1]["result"]["exit_code"] == 0


async def test_daemon_exec_disconnect_kills_the_tree(served: tuple[Daemon, dict[str, str]]) -> None:
    daemon, snapshots = served
    marker = "4242.5"
    script = f"/bin/busybox sleep {marker} & echo started; /bin/busybox sleep {marker}"
    async with (
        open_client(daemon.path) as client,
        client.open_exec(busybox_spec(snapshots["amd64"], "sh", "-c", script)) as stream,
    ):
        async for event in stream:
            assert event == ExecOutput(stream="stdout", data=b"started\n")
            break
        tree = processes_with(f"sleep {marker}")
        assert len(tree) == 2
    # Leaving the block closed the connection: the daemon kills the whole tree.
    _, alive = await trio.to_thread.run_sync(lambda: psutil.wait_procs(tree, GONE_TIMEOUT))
    assert alive == []
    async with open_client(daemon.path) as client:
        assert (await client.get_info())["product"] == "runtimed"


def test_daemon_exec_sigterm_with_running_execs_exits_0(tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path, "amd64")
    running = start_daemon(tmp_path)
    running.wait_ready()
    snapshot = import_tar(running.client(), tar)
    marker = "4243.5"
    started = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            async with (
                open_client(running.path) as client,
                client.open_exec(
                    busybox_spec(snapshot, "sh", "-c", f"echo started; /bin/busybox sleep {marker}")
                ) as stream,
            ):
                async for _ in stream:
                    started.set()

        try:
            trio.run(main)
        except BaseException as exc:
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert started.wait(60)
    tree = processes_with(f"sleep {marker}")
    assert len(tree) == 1
    assert running.stop(signal.SIGTERM) == 0
    thread.join(30)
    _, alive = psutil.wait_procs(tree, GONE_TIMEOUT)
    assert alive == []
    assert len(errors) == 1
    assert isinstance(errors[0], DaemonUnavailableError)


def test_daemon_exec_restart_after_kill_9_keeps_state(tmp_path: Path) -> None:
    tar = rootfs_tar(tmp_path, "arm64")
    first = start_daemon(tmp_path)
    first.wait_ready()
    snapshot = import_tar(first.client(), tar)
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = start_daemon(tmp_path)
    second.wait_ready()
    client = second.client()
    assert [s["id"] for s in client.list_snapshots() if isinstance(s, dict)] == [snapshot]
    assert client.exec(busybox_spec(snapshot, "uname", "-m")).stdout == b"aarch64\n"
    client.remove_snapshot(snapshot)
    assert client.list_snapshots() == []
    # The spare built on the removed snapshot (its overlay would keep the layers' files) goes:
    # the daemon's spawner is its only child left.
    children = _children_once_settled(second)
    assert second.stop() == 0
    assert len(children) == 1


def _children_once_settled(daemon: Daemon) -> list[psutil.Process]:
    """The daemon's child processes once only one is left, or after :data:`GONE_TIMEOUT`."""
    deadline = time.monotonic() + GONE_TIMEOUT
    while True:
        children = psutil.Process(daemon.proc.pid).children()
        if len(children) <= 1 or time.monotonic() > deadline:
            return children
        time.sleep(0.05)


@pytest.mark.parametrize("fmt", ["tar", "oci"])
def test_daemon_exec_export_writes_to_the_descriptor(
    served: tuple[Daemon, dict[str, str]], tmp_path: Path, fmt: str
) -> None:
    daemon, snapshots = served
    target = tmp_path / f"export.{fmt}.tar"
    with target.open("wb") as out:
        size = daemon.client().export_snapshots([snapshots["arm64"]], out.fileno(), fmt=fmt)
    assert size == target.stat().st_size > 0
    with tarfile.open(target) as archive:
        names = archive.getnames()
    if fmt == "tar":
        assert "bin/busybox" in [n.lstrip("./") for n in names]
    else:
        assert "index.json" in names
        # An OCI layout of our own export imports back to the same snapshot.
        assert import_tar(daemon.client(), target) == snapshots["arm64"]


def test_daemon_exec_sighup_reloads_the_emulator_set(tmp_path: Path) -> None:
    running = start_daemon(tmp_path, config="emulators = []\n")
    running.wait_ready()
    client = running.client()
    assert "linux/arm64" not in str(client.get_platforms()["emulated"])
    config = tmp_path / "runtimed.toml"
    config.write_text("emulators = [")
    running.proc.send_signal(signal.SIGHUP)
    assert running.notifications().startswith("STATUS=reload refused")
    config.write_text('emulators = ["linux/arm64"]\n')
    running.proc.send_signal(signal.SIGHUP)
    assert running.notifications().startswith("STATUS=serving")
    assert "linux/arm64" in str(client.get_platforms()["emulated"])
    assert running.stop() == 0


def test_daemon_exec_multi_platform_export_imports_back_per_platform(
    served: tuple[Daemon, dict[str, str]], tmp_path: Path
) -> None:
    daemon, snapshots = served
    client = daemon.client()
    target = tmp_path / "multi.oci.tar"
    with target.open("wb") as out:
        size = client.export_snapshots(
            [snapshots["amd64"], snapshots["arm64"]], out.fileno(), fmt="oci"
        )
    assert size == target.stat().st_size
    for arch in ("amd64", "arm64"):
        with target.open("rb") as f:
            imported = client.import_snapshot(f.fileno(), platform=f"linux/{arch}")
        assert imported["id"] == snapshots[arch]
    assert client.collect_garbage() == []  # every layer is still used
