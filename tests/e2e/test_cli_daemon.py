"""``runtimectl`` against the real daemon over ``--socket``: the daemon runs in a private
user+mount namespace with its own binfmt_misc (tests.e2e.test_daemon.start_daemon, emulating
linux/arm64); runtimectl runs outside it, as a user would, and passes files as descriptors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from runtimed.client import DEFAULT_SOCKET
from runtimed.errors import ConfigError, ExitArea
from runtimed.session import configured_socket
from tests.e2e.test_daemon import Daemon, start_daemon
from tests.kernel.store_images import busybox_root, gnu_tar, tar_names
from tests.support import runtimectl, tool

pytestmark = pytest.mark.slow


@dataclass
class Served:
    daemon: Daemon
    amd64: str
    arm64: str

    def ctl(
        self, *args: str | Path, command: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """``runtimectl ARGS --socket S [-- COMMAND]``."""
        return runtimectl(
            *args, "--socket", self.daemon.path, *(("--", *command) if command else ())
        )

    def run(
        self, snapshot: str, *command: str, flags: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        return self.ctl("run", "--snapshot", snapshot, *flags, command=command)


def imported(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert isinstance(info, dict)
    return info


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("cli")
    running = start_daemon(tmp)
    running.wait_ready()
    served = Served(daemon=running, amd64="", arm64="")
    # A directory (tarred client-side) and a GNU tar tarball, each passed as a descriptor.
    directory = busybox_root(tmp / "root-amd64", "amd64")
    tarball = gnu_tar(busybox_root(tmp / "root-arm64", "arm64"), tmp / "arm64.tar.gz", "-z")
    served.amd64 = imported(served.ctl("snapshot", "import", directory, "--json"))["id"]
    served.arm64 = imported(served.ctl("snapshot", "import", tarball, "--json"))["id"]
    yield served
    assert running.stop() == 0


def test_cli_daemon_imports_a_directory_and_a_tarball(served: Served) -> None:
    listed = served.ctl("snapshot", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    platforms = {s["id"]: (s["platform"], s["platform_source"]) for s in json.loads(listed.stdout)}
    assert platforms == {
        served.amd64: ("linux/amd64", "detected from /bin/busybox"),
        served.arm64: ("linux/arm64", "detected from /bin/busybox"),
    }
    # runtimectl sends the path the user named as the source: a directory arrives as an
    # anonymous tar, which the daemon could only call "client stream".
    sources = {s["id"]: s["source"] for s in json.loads(listed.stdout)}
    assert sources[served.arm64].endswith("/arm64.tar.gz")
    assert sources[served.amd64].endswith("/root-amd64")
    inspected = served.ctl("snapshot", "inspect", served.arm64[7:19])
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.stdout.startswith(f"id:        {served.arm64}\nplatform:  linux/arm64 ")


@pytest.mark.parametrize(
    ("arch", "machine", "how"),
    [
        ("amd64", "x86_64", "native"),
        ("arm64", "aarch64", "emulated by /usr/bin/qemu-aarch64-static"),
    ],
)
def test_cli_daemon_runs_native_and_emulated_with_streams_and_status(
    served: Served, arch: str, machine: str, how: str
) -> None:
    snapshot = getattr(served, arch)
    script = "uname -m; echo err >&2; exit 7"
    done = served.run(snapshot, "sh", "-c", script, flags=("-v", "--report", "-"))
    assert done.returncode == 7
    assert done.stdout == f"{machine}\n"
    err, summary, report = done.stderr.split("\n", 2)
    assert err == "err"
    assert summary.startswith(f"runtimectl: exit 7; linux/{arch}: {how}, confirmed; processes: ")
    result = json.loads(report)
    assert result["exit_code"] == 7
    assert result["report"]["mode"] == how.split()[0]


def test_cli_daemon_streams_live_and_a_killed_client_ends_the_tree(served: Served) -> None:
    marker = "4244.5"
    argv = [str(tool("runtimectl")), "run", "--snapshot", served.amd64, "--socket"]
    argv += [str(served.daemon.path), "--", "sh", "-c", f"echo started; sleep {marker}"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as client:
        try:
            assert client.stdout is not None
            # The first line arrives while the command still runs: output is relayed live.
            assert client.stdout.readline() == "started\n"
            tree = [
                p
                for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0] == "sleep" and marker in p.info["cmdline"]
            ]
            assert len(tree) == 1
        finally:
            client.kill()
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == []


def test_cli_daemon_reports_a_signal_as_128_plus_n(served: Served) -> None:
    done = served.run(served.amd64, "sh", "-c", "kill -9 $$")
    assert done.returncode == 128 + 9


def test_cli_daemon_refuses_windows_with_exit_6(served: Served) -> None:
    done = served.run(served.amd64, "true", flags=("--platform", "windows/amd64"))
    assert done.returncode == int(ExitArea.PLATFORM) == 6
    assert done.stderr.startswith("runtimectl: error: ")
    assert "Traceback" not in done.stderr


def test_cli_daemon_platforms_json(served: Served) -> None:
    done = served.ctl("platforms", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["host"].startswith("linux/amd64")
    assert report["emulated"]["linux/arm64"]["interpreter"] == "/usr/bin/qemu-aarch64-static"
    text = served.ctl("platforms")
    assert "linux/arm64            emulated   runtimed-aarch64" in text.stdout
    remote = served.ctl("check-binfmt", "--remote", "--json")
    assert remote.returncode in (0, 1), remote.stderr
    assert "linux/arm64" in json.loads(remote.stdout)["platforms"]["emulated"]


def test_cli_daemon_exports_a_layout_directory_that_imports_back(
    served: Served, tmp_path: Path
) -> None:
    layout = tmp_path / "multi"
    exported = served.ctl(
        "snapshot", "export", served.amd64, served.arm64, "--format", "oci", "-o", layout
    )
    assert exported.returncode == 0, exported.stderr
    assert (layout / "oci-layout").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["multi"]  # no staging left
    again = served.ctl("snapshot", "export", served.amd64, "--format", "oci", "-o", layout)
    assert again.returncode == int(ExitArea.USAGE)
    back = served.ctl("snapshot", "import", layout, "--platform", "linux/arm64", "--json")
    assert imported(back)["id"] == served.arm64

    rootfs = tmp_path / "rootfs.tar"
    tar = served.ctl("snapshot", "export", served.arm64, "--format", "tar", "-o", rootfs)
    assert tar.returncode == 0, tar.stderr
    assert "bin/busybox" in tar_names(rootfs)
    missing = served.ctl(
        "snapshot", "export", "sha256:" + "1" * 64, "--format", "tar", "-o", tmp_path / "x.tar"
    )
    assert missing.returncode == int(ExitArea.NOT_FOUND)
    assert not (tmp_path / "x.tar").exists()


def test_cli_daemon_rm_and_gc(served: Served, tmp_path: Path) -> None:
    root = busybox_root(tmp_path / "root", "amd64", extra={"etc/extra": "only here\n"})
    snapshot = imported(served.ctl("snapshot", "import", root, "--json"))["id"]
    removed = served.ctl("snapshot", "rm", snapshot[7:19], "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout) == [snapshot]
    gone = served.ctl("snapshot", "inspect", snapshot, "--json")
    assert gone.returncode == int(ExitArea.NOT_FOUND)
    assert json.loads(gone.stdout)["error"]["code"] == "snapshot.SnapshotNotFound"
    assert served.ctl("snapshot", "gc").returncode == 0


def test_cli_daemon_unreachable_names_the_fix(tmp_path: Path) -> None:
    done = runtimectl("platforms", "--socket", tmp_path / "none.sock", timeout=60)
    assert done.returncode == int(ExitArea.FAILURE)
    assert "--embedded" in done.stderr.splitlines()[-1]


def test_cli_daemon_default_socket_comes_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "runtimed.toml"
    assert configured_socket(config) == DEFAULT_SOCKET  # no file
    config.write_text('socket = "/run/elsewhere/rt.sock"\n')
    assert configured_socket(config) == Path("/run/elsewhere/rt.sock")
    config.write_text("socket = 3\n")
    with pytest.raises(ConfigError):
        configured_socket(config)
