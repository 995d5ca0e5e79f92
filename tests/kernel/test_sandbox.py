"""The sandbox end to end on the real kernel: the native runner over a busybox root.

Each test builds a root from the cached static busybox, prepares a run with a snapshot source
over that directory, and runs it through ``sandbox.launch`` (the runner is a subprocess; no
namespace work happens inside pytest).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import trio

from binfmt.platform import Platform
from binfmt.report import PlatformReport
from runtimed.errors import Json, KernelError, SandboxError
from sandbox import cgroups, launch
from sandbox.launch import (
    OutputChunk,
    PreparedRun,
    RunResult,
    Stream,
    open_execution,
    open_run,
    open_runners,
    prepare_run,
)
from sandbox.plan import BindMount
from sandbox.spec import ExecSpec
from tests.support import busybox, our_children, require, require_root

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

AMD64 = Platform(os="linux", architecture="amd64")
APPLETS = [
    "sh",
    "cat",
    "echo",
    "env",
    "false",
    "grep",
    "hostname",
    "id",
    "kill",
    "ls",
    "mkdir",
    "mount",
    "ps",
    "pwd",
    "setsid",
    "sleep",
    "touch",
    "true",
    "uname",
    "wc",
    "head",
    "ifconfig",
    "yes",
    "dd",
]
PASSWD = "root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:b:/home/build:/bin/sh\n"
GROUP = "root:x:0:\nbuild:x:1000:\nwheel:x:10:build\n"


@dataclass(frozen=True)
class ImageConfig:
    env: tuple[str, ...] = ("FROM_IMAGE=1",)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ("sh",)
    working_dir: str = ""
    user: str = ""


@dataclass(frozen=True)
class Snapshot:
    id: str
    platform: Platform
    config: ImageConfig = field(default_factory=ImageConfig)


class DirectorySource:
    """A snapshot source over one plain directory (the store's interface, no store)."""

    def __init__(self, root: Path, scratch: Path, platform: Platform = AMD64) -> None:
        self.root = root
        self.scratch = scratch
        self.platform = platform
        self.committed: list[Path] = []
        self.runs_dir = scratch / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def get(self, ref: str) -> Snapshot:
        return Snapshot(id=ref, platform=self.platform)

    def resolve(self, ref: str) -> str:
        return ref

    def layer_paths(self, snapshot_id: str) -> list[Path]:
        return [self.root]

    def new_run_dir(self) -> Path:
        path = self.runs_dir / uuid.uuid4().hex[:12]
        (path / "upper").mkdir(parents=True)
        (path / "work").mkdir()
        return path

    def remove_run_dir(self, path: Path) -> None:
        shutil.rmtree(path)

    def commit_upper(self, parent_id: str, upper: Path) -> Snapshot:
        kept = self.scratch / f"commit-{len(self.committed)}"
        shutil.copytree(upper, kept, symlinks=True)
        self.committed.append(kept)
        return Snapshot(id=f"{parent_id}+{len(self.committed)}", platform=self.platform)


def make_busybox_root(path: Path, debian_arch: str = "amd64") -> Path:
    (path / "bin").mkdir(parents=True)
    shutil.copy(busybox(debian_arch), path / "bin" / "busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    (path / "etc").mkdir()
    (path / "etc" / "passwd").write_text(PASSWD)
    (path / "etc" / "group").write_text(GROUP)
    (path / "tmp").mkdir(mode=0o1777)
    return path


@dataclass
class Outcome:
    result: RunResult
    chunks: list[OutputChunk]

    def text(self, stream: Stream) -> str:
        return b"".join(c.data for c in self.chunks if c.stream is stream).decode()

    @property
    def stdout(self) -> str:
        return self.text(Stream.STDOUT)

    @property
    def stderr(self) -> str:
        return self.text(Stream.STDERR)


async def run_in_sandbox(
    source: DirectorySource, argv: Sequence[str], report: PlatformReport, **request: Json
) -> Outcome:
    spec = ExecSpec.from_json({"snapshot": "snap", "args": list(argv), **request})
    async with open_run(spec, source, report) as execution:
        chunks = [chunk async for chunk in execution.output]
        result = await execution.wait()
    return Outcome(result=result, chunks=chunks)


NATIVE_REPORT = PlatformReport(host=AMD64, native=frozenset({AMD64}), native_source="test")


@pytest.fixture
def source(tmp_path: Path) -> DirectorySource:
    require_root()
    require(os.uname().machine == "x86_64", "the native busybox fixture is amd64")
    return DirectorySource(make_busybox_root(tmp_path / "root"), tmp_path)


async def test_sandbox_native_busybox_runs_and_is_reported_native(
    source: DirectorySource,
) -> None:
    out = await run_in_sandbox(source, ["uname", "-m"], NATIVE_REPORT)
    assert out.stdout == "x86_64\n"
    assert out.result.exit_code == 0
    report = out.result.report
    assert report.mode == "native"
    assert report.confirmed
    assert report.interpreter is None
    assert report.emulated == {}
    assert report.native.processes == 1  # uname, seen by PID 1 if too short to sample


async def test_sandbox_isolation_default_profile(source: DirectorySource) -> None:
    script = (
        "echo pid=$$; ls /proc | grep -c '^[0-9]'; "
        "cat /proc/timer_list /proc/keys /proc/kcore 2>/dev/null | wc -c; ls /sys/firmware; "
        "touch /sys/x 2>&1; grep CapEff /proc/self/status; hostname; ls /sys/class/net; "
        "cat /etc/hostname; (echo x > /proc/sys/kernel/hostname) 2>&1; ls /dev/pts"
    )
    out = await run_in_sandbox(source, ["sh", "-c", script], NATIVE_REPORT, hostname="box1")
    lines = out.stdout.splitlines()
    assert lines[0] == "pid=2"  # PID 1 is the sandbox's init, the shell comes next
    assert int(lines[1]) <= 4  # init, sh, ls, grep: no host process is visible
    assert lines[2] == "0"  # Docker's masked paths read as /dev/null, /sys/firmware empty
    assert "Read-only file system" in lines[3]
    cap_eff = int(lines[4].split()[1], 16)
    assert cap_eff == 0xA80425FB  # Docker's 14 capabilities
    assert not cap_eff & (1 << 21)  # no CAP_SYS_ADMIN
    assert lines[5] == "box1"
    assert lines[6] == "lo"  # network none: a new namespace with only loopback
    assert lines[7] == "box1"
    assert "Read-only file system" in lines[8]
    assert lines[9] == "ptmx"  # a new devpts instance, empty but for ptmx


async def test_sandbox_command_gets_only_stdio_and_default_signals(
    source: DirectorySource,
) -> None:
    # Nothing of the launcher's or the runner's leaks into the command: no other descriptor
    # (the status pipe would let it forge its own report) and no ignored signal (the Python
    # launcher ignores SIGPIPE; inherited, it would change how pipelines end).
    out = await run_in_sandbox(source, ["ls", "/proc/self/fd"], NATIVE_REPORT)
    assert out.stdout.split() == ["0", "1", "2", "3"]  # 3: the directory ls reads
    out = await run_in_sandbox(source, ["grep", "Sig[IB]", "/proc/self/status"], NATIVE_REPORT)
    assert out.stdout.split() == ["SigBlk:", "0" * 16, "SigIgn:", "0" * 16]


async def test_sandbox_host_network_sees_host_interfaces(source: DirectorySource) -> None:
    out = await run_in_sandbox(source, ["ls", "/sys/class/net"], NATIVE_REPORT, network="host")
    assert sorted(out.stdout.split()) == sorted(os.listdir("/sys/class/net"))


@pytest.mark.parametrize(
    ("script", "code", "signum"),
    [("exit 7", 7, None), ("true", 0, None), ("kill -9 $$", 137, 9), ("kill -TERM $$", 143, 15)],
)
async def test_sandbox_exit_codes_and_signals(
    source: DirectorySource, script: str, code: int, signum: int | None
) -> None:
    out = await run_in_sandbox(source, ["sh", "-c", script], NATIVE_REPORT)
    assert (out.result.exit_code, out.result.signal) == (code, signum)
    assert not out.result.timed_out


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_sandbox_timeout_kills_setsid_grandchild(source: DirectorySource) -> None:
    script = "setsid sleep 987651 & sleep 987652"
    with trio.fail_after(10):
        out = await run_in_sandbox(source, ["sh", "-c", script], NATIVE_REPORT, timeout=0.5)
    assert out.result.timed_out
    assert not out.result.cancelled
    assert out.result.signal == 15  # SIGTERM through PID 1 first
    assert _processes_with("98765") == []


@pytest.mark.slow
async def test_sandbox_timeout_holds_while_nobody_reads_the_output(
    source: DirectorySource,
) -> None:
    # More output than the pipe and the output channel hold: the launcher waits for a reader
    # of its output, and the timeout must stop the command all the same.
    script = "while :; do echo 987657 a line of output; done"
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", script], "timeout": 0.3})
    with trio.fail_after(10):
        async with open_run(spec, source, NATIVE_REPORT) as execution:
            await trio.sleep(1.5)  # nobody reads
            left = _processes_with("987657")
            async for _ in execution.output:
                pass
            result = await execution.wait()
    assert left == []
    assert result.timed_out
    assert result.signal == 15


async def test_sandbox_pids_limit_contains_a_fork_bomb(source: DirectorySource) -> None:
    script = "i=0; while [ $i -lt 64 ]; do sleep 30 & i=$((i+1)); done; echo spawned"
    with trio.fail_after(20):
        out = await run_in_sandbox(source, ["sh", "-c", script], NATIVE_REPORT, pids=16, timeout=5)
    assert "can't fork" in out.stderr or "Resource temporarily unavailable" in out.stderr
    assert _processes_with("sleep 30") == []


async def test_sandbox_memory_limit_kills_the_hog(source: DirectorySource) -> None:
    out = await run_in_sandbox(
        source,
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        NATIVE_REPORT,
        memory=32 << 20,
    )
    assert out.result.signal == 9
    assert out.result.oom_kills >= 1
    assert out.result.resources.peak_memory is not None
    assert out.result.resources.peak_memory <= 32 << 20


async def test_sandbox_streams_stdout_and_stderr_separately_as_produced(
    source: DirectorySource,
) -> None:
    script = "echo one; echo err1 >&2; echo two; sleep 0.6; echo three; echo err2 >&2"
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", script]})
    arrivals: list[tuple[float, OutputChunk]] = []
    async with open_run(spec, source, NATIVE_REPORT) as execution:
        async for chunk in execution.output:
            arrivals.append((trio.current_time(), chunk))
        end = trio.current_time()
        await execution.wait()
    stdout = b"".join(c.data for _, c in arrivals if c.stream is Stream.STDOUT)
    stderr = b"".join(c.data for _, c in arrivals if c.stream is Stream.STDERR)
    assert stdout == b"one\ntwo\nthree\n"
    assert stderr == b"err1\nerr2\n"
    first = next(t for t, c in arrivals if c.stream is Stream.STDOUT)
    assert end - first >= 0.5  # "one" arrived while the command still ran


async def test_sandbox_user_switch_by_name(source: DirectorySource) -> None:
    out = await run_in_sandbox(
        source,
        ["sh", "-c", "id; grep CapEff /proc/self/status; echo $HOME"],
        NATIVE_REPORT,
        user="build",
    )
    lines = out.stdout.splitlines()
    assert lines[0].startswith("uid=1000(build) gid=1000(build) groups=10(wheel)")
    assert lines[1].split()[1] == "0000000000000000"
    assert lines[2] == "/home/build"


async def test_sandbox_bind_mounts_ro_and_rw(source: DirectorySource, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "in.txt").write_text("input")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = "cat /src/in.txt; touch /src/x 2>&1; echo made > /out/result"
    out = await run_in_sandbox(
        source,
        ["sh", "-c", script],
        NATIVE_REPORT,
        mounts=[
            {"source": str(src), "destination": "/src", "readonly": True},
            {"source": str(out_dir), "destination": "/out"},
        ],
    )
    assert out.stdout.startswith("input")
    assert "Read-only file system" in out.stdout
    assert (out_dir / "result").read_text() == "made\n"
    assert not (src / "x").exists()


async def test_sandbox_stdin_env_cwd_and_commit(source: DirectorySource) -> None:
    script = "cat; echo $FROM_IMAGE$EXTRA; pwd; echo data > /made"
    out = await run_in_sandbox(
        source,
        ["sh", "-c", script],
        NATIVE_REPORT,
        stdin={"data": "aGVsbG8K"},
        env={"EXTRA": "2"},
        cwd="/work/new",
        commit=True,
    )
    assert out.stdout == "hello\n12\n/work/new\n"
    assert out.result.snapshot == "snap+1"
    assert (source.committed[0] / "made").read_text() == "data\n"
    assert not (source.root / "made").exists()  # the snapshot itself is untouched
    assert not list((source.scratch / "runs").iterdir())  # run directory removed


async def test_sandbox_nothing_left_after_runner_sigkill(source: DirectorySource) -> None:
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", "echo up; sleep 987653"]})
    async with open_run(spec, source, NATIVE_REPORT) as execution:
        async for chunk in execution.output:
            assert chunk.data == b"up\n"
            cgroup_dirs = list(execution.group.dirs)
            (runner,) = our_children()  # the runner, started by this process
            runner.kill()
        result = await execution.wait()
        workspace = execution.prepared.plan.workspace
    assert result.signal == 9
    assert _processes_with("987653") == []
    assert not any(d.exists() for d in cgroup_dirs)
    assert not await trio.to_thread.run_sync(_mounted_anywhere, workspace)


def _mounted_anywhere(path: str) -> bool:
    """Whether any process's mount namespace still has a mount mentioning ``path``."""
    for mountinfo in Path("/proc").glob("[0-9]*/mountinfo"):
        try:
            if path in mountinfo.read_text():
                return True
        except OSError:
            continue
    return False


async def test_sandbox_hostile_symlink_cannot_place_mounts_on_the_host(
    source: DirectorySource, tmp_path: Path
) -> None:
    host_dir = tmp_path / "host-etc"
    host_dir.mkdir()
    etc = source.root / "etc"
    shutil.rmtree(etc)
    etc.symlink_to(host_dir)  # absolute: outside the root when followed on the host
    with pytest.raises(KernelError, match=r"/etc/resolv\.conf") as info:
        await run_in_sandbox(source, ["true"], NATIVE_REPORT, user="0")
    assert info.value.errno_name == "ENOENT"  # resolved inside the root, where it dangles
    assert list(host_dir.iterdir()) == []


async def test_sandbox_symlink_mount_point_is_replaced_in_the_run(
    source: DirectorySource,
) -> None:
    (source.root / "proc").symlink_to("/proc")  # as debootstrap's first stage leaves it
    out = await run_in_sandbox(source, ["sh", "-c", "ls -d /proc/self/fd"], NATIVE_REPORT)
    assert out.stdout == "/proc/self/fd\n"
    assert (source.root / "proc").is_symlink()  # the snapshot keeps its symlink


async def test_sandbox_concurrent_runs_are_separate_and_reaped(source: DirectorySource) -> None:
    outcomes: dict[int, Outcome] = {}

    async def one(n: int) -> None:
        spec = ExecSpec.from_json(
            {"snapshot": "s", "args": ["sh", "-c", f"echo run{n}; echo err{n} >&2; exit {n}"]}
        )
        async with open_run(spec, source, NATIVE_REPORT) as execution:
            chunks = [chunk async for chunk in execution.output]
            outcomes[n] = Outcome(result=await execution.wait(), chunks=chunks)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(one, n)
    # Every run's runner was reaped when it ended: no zombie stays behind.
    assert our_children(recursive=True) == []
    for n, out in outcomes.items():
        assert (out.stdout, out.stderr, out.result.exit_code) == (f"run{n}\n", f"err{n}\n", n)


async def test_sandbox_each_run_gets_a_fresh_network_namespace_with_lo_up(
    source: DirectorySource,
) -> None:
    # One network namespace per run, never shared, never the daemon's own: runs that overlap
    # cannot share one.
    script = "ls -l /proc/self/ns/net; ifconfig lo | grep -c UP; ls /sys/class/net; sleep 0.3"
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", script]})
    seen: list[list[str]] = []

    async def one() -> None:
        async with open_run(spec, source, NATIVE_REPORT) as execution:
            chunks = [chunk.data async for chunk in execution.output]
            assert (await execution.wait()).exit_code == 0
            seen.append(b"".join(chunks).decode().splitlines())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    namespaces = {lines[0].rsplit(" ", 1)[-1] for lines in seen}
    assert len(namespaces) == 3
    assert os.readlink("/proc/self/ns/net") not in namespaces
    assert [lines[1:] for lines in seen] == [["1", "lo"]] * 3


async def test_sandbox_runners_hand_a_spare_its_limits_and_clean_up_after(
    source: DirectorySource,
) -> None:
    args: list[Json] = ["sh", "-c", "echo $$; exec sleep 60"]
    spec = ExecSpec.from_json({"snapshot": "s", "args": args, "pids": 9})
    groups: list[str] = []
    left: list[Path] = []
    async with open_runners() as runners:
        for _ in range(3):
            async with open_run(spec, source, NATIVE_REPORT, runners=runners) as execution:
                first = await execution.output.receive()
                # The command runs (its sleep): its cgroups have the limit.
                pids_max = [d / "pids.max" for d in execution.group.dirs]
                assert [p.read_text() for p in pids_max if p.exists()] == ["9\n"]
                left += execution.group.dirs
                execution.cancel()
                chunks = [first.data] + [chunk.data async for chunk in execution.output]
                result = await execution.wait()
                groups.append(execution.group.name)
            assert (result.signal, b"".join(chunks)) == (signal.SIGTERM, b"2\n")
            await _settled(runners)
    # The first run started its own runner; the next ones took the spare started meanwhile.
    assert not groups[0].startswith("runtimed-spare-")
    assert all(name.startswith("runtimed-spare-") for name in groups[1:])
    # Closing the pool waited for every clean-up and discarded the last spare.
    assert not any(path.exists() for path in left)
    assert our_children(recursive=True) == []
    assert not any(p.name.startswith("runtimed-spare-") for p in _cgroup_dirs())


@pytest.mark.parametrize(
    ("controller", "limit", "files", "written"),
    [
        ("cpu", {"cpus": 0.5}, ("cpu.cfs_quota_us", "cpu.max"), "50000"),
        ("pids", {"pids": 9}, ("pids.max",), "9"),
    ],
)
async def test_sandbox_runners_a_limit_never_takes_a_spare_outside_its_cgroup(
    source: DirectorySource,
    controller: str,
    limit: dict[str, Json],
    files: tuple[str, ...],
    written: str,
) -> None:
    # A spare joins a v1 cpu or pids cgroup only when the run before it had such a limit: a
    # run that asks for one must not take a spare outside it (its limit would bind nothing).
    plain = ExecSpec.from_json({"snapshot": "s", "args": ["true"]})
    args: list[Json] = ["sh", "-c", "echo up; exec sleep 60"]
    limited = ExecSpec.from_json({"snapshot": "s", "args": args, **limit})
    groups = []
    async with open_runners() as runners:
        for spec in (plain, plain, limited, limited):
            async with open_run(spec, source, NATIVE_REPORT, runners=runners) as execution:
                if spec is limited:
                    # While it runs (its sleep): the runner removes its cgroups after.
                    assert (await execution.output.receive()).data == b"up\n"
                    assert execution.group.has(controller)
                    paths = [d / name for d in execution.group.dirs for name in files]
                    assert written in [p.read_text().split()[0] for p in paths if p.exists()]
                    execution.cancel()
                async for _ in execution.output:
                    pass
                result = await execution.wait()
                groups.append(execution.group)
            assert result.signal == (None if spec is plain else signal.SIGTERM)
            await _settled(runners)
    names = [group.name for group in groups]
    assert names[1].startswith("runtimed-spare-")
    # The spare made after a run without a limit is in that controller's cgroup only where
    # it comes with the others (cgroup v2): elsewhere the limited run starts its own.
    assert names[2].startswith("runtimed-spare-") == groups[1].has(controller)
    assert names[3].startswith("runtimed-spare-")  # made after a limited run: in it


async def _settled(
    runners: launch.Runners, *, running: int = 0, besides: int | None = None
) -> None:
    """Wait until the pool builds no spare and its runners are the spares it keeps (and
    ``running`` runs' own): the last run's runner reaped, discarded spares gone. A fixed sleep
    is too short on a busy host, where each of a shape's spares, built one after the other,
    can take a good part of a second. Polled: the processes are seen through psutil."""

    def settled() -> bool:
        kept = sum(map(len, runners._spares.values()))
        return (
            not runners._making and len(_pool_runners(runners, besides=besides)) == running + kept
        )

    with trio.fail_after(30):
        while not settled():  # noqa: ASYNC110 (no event tells when a runner is reaped)
            await trio.sleep(0.01)


def _pool_runners(runners: launch.Runners, *, besides: int | None = None) -> list[psutil.Process]:
    """This process's children other than the pool's spawner (and the runner ``besides``):
    runners forked for the pool, spares among them."""
    return [p for p in our_children() if p.pid not in (runners.spawner.pid, besides)]


async def _idle_with_spares(
    runners: launch.Runners, source: DirectorySource
) -> tuple[bytes, cgroups.Hierarchies]:
    """The pool as after a first run of ``true`` and an idle spell: its spares built. The
    sandbox's key and cgroup hierarchies."""
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["true"]})
    prepared, encoded = await runners.prepare(spec, source, NATIVE_REPORT)
    assert encoded is not None
    runners.ended(encoded.shape, prepared.hierarchies)  # as after a first run
    await _settled(runners)
    await trio.sleep(0.3)  # and the host is idle
    return encoded.shape, prepared.hierarchies


@pytest.mark.parametrize("emulated", [False, True])
async def test_sandbox_runners_build_the_next_spare_during_an_emulated_run(
    source: DirectorySource, emulated: bool
) -> None:
    # After an idle spell, the spare replacing the one a native run took is built once that
    # run ended (built meanwhile, it slows a short run down); an emulated run outlasts a
    # build, so its replacement is built while it runs (built after it, the spare's first
    # cgroup move after the idle spell, an RCU grace period, fell on the next run's path).
    async with open_runners() as runners:
        key, hierarchies = await _idle_with_spares(runners, source)
        assert len(_pool_runners(runners)) == launch.SPARES_PER_SHAPE
        spare = await runners.take(key, hierarchies, limited=frozenset(), emulated=emulated)
        assert spare is not None
        try:
            runners.running(key, hierarchies)
            await trio.sleep(0.3)
            await _settled(runners, besides=spare.runner.pid)
            others = len(_pool_runners(runners, besides=spare.runner.pid))
            assert others == launch.SPARES_PER_SHAPE - (0 if emulated else 1)
            runners.ended(key, hierarchies)
            await _settled(runners, besides=spare.runner.pid)
            # As many spares as before, whenever the replacement was built.
            others = len(_pool_runners(runners, besides=spare.runner.pid))
            assert others == launch.SPARES_PER_SHAPE
        finally:
            await launch._discard_spare(spare)
    assert our_children(recursive=True) == []


async def test_sandbox_runners_keep_a_second_spare_for_a_run_right_after(
    source: DirectorySource,
) -> None:
    # Two runs back to back after an idle spell: the second finds a spare ready too, without
    # waiting for the one that replaces the first's (built after the first run, or slowed by
    # an RCU grace period).
    async with open_runners() as runners:
        key, hierarchies = await _idle_with_spares(runners, source)
        taken = []
        try:
            for _ in range(2):
                spare = await runners.take(key, hierarchies, limited=frozenset(), emulated=False)
                assert spare is not None
                taken.append(spare)
            # Taking them started no build: the pool's runners are these two.
            assert {p.pid for p in _pool_runners(runners)} == {s.runner.pid for s in taken}
        finally:
            for spare in taken:
                await launch._discard_spare(spare)
    assert our_children(recursive=True) == []


async def test_sandbox_runners_build_the_next_spare_during_a_lasting_native_run(
    source: DirectorySource,
) -> None:
    # A native run after an idle spell builds the next spare once it has lasted a while (a
    # short one, after it ended: see above), so that an Exec right after a long build step
    # finds it ready.
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", "echo up; sleep 0.6"]})
    groups = []
    async with open_runners() as runners:
        for _ in range(2):  # the first run starts its own runner and leaves a spare
            await trio.sleep(0.3)  # the host is idle
            async with open_run(spec, source, NATIVE_REPORT, runners=runners) as execution:
                assert (await execution.output.receive()).data == b"up\n"
                await trio.sleep(0.1)  # the run has lasted: the next spares are started
                await _settled(runners, running=1)
                # This run's runner, and the spares for the next while this run sleeps.
                assert len(_pool_runners(runners)) == 1 + launch.SPARES_PER_SHAPE
                async for _chunk in execution.output:
                    pass
                assert (await execution.wait()).exit_code == 0
                groups.append(execution.group.name)
    assert groups[1].startswith("runtimed-spare-")  # the second took the first's spare
    assert our_children(recursive=True) == []


async def test_sandbox_runners_keep_a_spare_per_sandbox(
    source: DirectorySource, tmp_path: Path
) -> None:
    # A multi-platform build alternates between its platforms' roots: each root keeps the
    # spares built after its last run, for up to SPARES_KEPT roots; a removal lets them all
    # go.
    roots = [source] + [
        DirectorySource(make_busybox_root(tmp_path / f"root{i}"), tmp_path / f"s{i}")
        for i in range(launch.SPARES_KEPT)
    ]
    took: list[bool] = []
    async with open_runners() as runners:
        for n in [0, 1] * 3 + list(range(len(roots))):
            # Snapshot n, in roots[n] (the pool remembers plans by request and snapshot ID).
            spec = ExecSpec.from_json({"snapshot": f"s{n}", "args": ["true"]})
            async with open_run(spec, roots[n], NATIVE_REPORT, runners=runners) as execution:
                async for _ in execution.output:
                    pass
                assert (await execution.wait()).exit_code == 0
                took.append(execution.group.name.startswith("runtimed-spare-"))
            await _settled(runners)
        # Alternating, every run after the first of its root took that root's spare.
        assert took[:6] == [False, False, True, True, True, True]
        assert took[6:] == [True, True] + [False] * (len(roots) - 2)
        # The oldest root's went.
        assert len(_pool_runners(runners)) == launch.SPARES_KEPT * launch.SPARES_PER_SHAPE
        spec = ExecSpec.from_json({"snapshot": "s1", "args": ["true"]})
        async with open_run(spec, roots[1], NATIVE_REPORT, runners=runners) as execution:
            async for _ in execution.output:
                pass
        # Its root's next spare is being built now; it goes as well once it is.
        runners.discard_spares()
        await _settled(runners)
    assert our_children(recursive=True) == []


async def test_sandbox_runners_replace_a_spare_that_died(source: DirectorySource) -> None:
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", "echo ok"]})
    async with open_runners() as runners:
        for kill_spares in (False, True, False):
            if kill_spares:
                # The spares built after the last run: runners of ours nobody uses yet.
                spares = _pool_runners(runners)
                assert len(spares) == launch.SPARES_PER_SHAPE
                for spare in spares:
                    spare.kill()
                    await trio.to_thread.run_sync(spare.wait)
            async with open_run(spec, source, NATIVE_REPORT, runners=runners) as execution:
                chunks = [chunk.data async for chunk in execution.output]
                result = await execution.wait()
            assert (result.exit_code, b"".join(chunks)) == (0, b"ok\n")
            await _settled(runners)


async def test_sandbox_runners_remember_a_plan_until_the_report_changes(
    source: DirectorySource, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["true"]})
    other_report = dataclasses.replace(NATIVE_REPORT)
    seen = []
    async with open_runners() as runners:
        for report in (NATIVE_REPORT, NATIVE_REPORT, other_report):
            async with open_run(spec, source, report, runners=runners) as execution:
                async for _ in execution.output:
                    pass
                assert (await execution.wait()).exit_code == 0
                seen.append(execution.prepared)
        committing = dataclasses.replace(spec, commit=True)
        async with open_run(committing, source, NATIVE_REPORT, runners=runners) as execution:
            async for _ in execution.output:
                pass
            assert (await execution.wait()).snapshot is not None
    assert seen[0] is seen[1]  # decided and planned once
    assert seen[2] is not seen[1]  # the platforms changed: decided again
    assert execution.prepared.run_dir is not None  # a commit gets a run directory of its own
    # The commit's plan, encoded with its own cgroups, is never taken for a spare's key.
    assert "no spare runner" not in caplog.text


def _cgroup_dirs() -> list[Path]:
    return [d for root in Path("/sys/fs/cgroup").iterdir() for d in root.glob("**/runtimed-*")]


async def test_sandbox_cancel_stops_the_command_with_sigterm(source: DirectorySource) -> None:
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["sh", "-c", "echo up; sleep 987654"]})
    async with open_run(spec, source, NATIVE_REPORT) as execution:
        async for _ in execution.output:
            execution.cancel()  # after the first chunk: the command runs
        result = await execution.wait()
    assert result.cancelled
    assert not result.timed_out
    assert result.signal == 15
    assert _processes_with("987654") == []


async def test_sandbox_caller_cancellation_leaves_nothing_behind(
    source: DirectorySource,
) -> None:
    spec = ExecSpec.from_json(
        {"snapshot": "s", "args": ["sh", "-c", "setsid sleep 987655 & echo up; sleep 987656"]}
    )
    with trio.move_on_after(10) as scope:
        async with open_run(spec, source, NATIVE_REPORT) as execution:
            async for _ in execution.output:
                scope.cancel()  # the daemon's client went away
                dirs = list(execution.group.dirs)
                await trio.sleep(5)
    assert scope.cancelled_caught
    assert _processes_with("98765") == []
    assert not any(d.exists() for d in dirs)


async def test_sandbox_runner_reports_the_use_and_removes_the_cgroups_itself(
    source: DirectorySource,
) -> None:
    # A group the caller owns: the launcher never removes it, so only the runner can have.
    spec = ExecSpec.from_json(
        {"snapshot": "s", "args": ["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"]}
    )
    prepared = await trio.to_thread.run_sync(prepare_run, spec, source, NATIVE_REPORT)
    group = cgroups.create(f"test-{uuid.uuid4().hex[:8]}", prepared.hierarchies)
    dirs = list(group.dirs)
    try:
        async with open_execution(prepared, source=source, group=group) as execution:
            async for _ in execution.output:
                pass
            result = await execution.wait()
        assert result.exit_code == 0
        assert group.dirs == []  # forgotten: the runner exited 0 after removing them
        assert not any(d.exists() for d in dirs)
        # What it used, read by the runner once PID 1 was reaped.
        assert result.resources.cpu_seconds is not None
        assert result.resources.cpu_seconds > 0
        assert result.resources.peak_memory is not None
        assert result.resources.peak_memory > 0
    finally:
        group.remove()


async def _drain(prepared: PreparedRun) -> RunResult:
    async with open_execution(prepared) as execution:
        async for _ in execution.output:
            pass
        return await execution.wait()


async def test_sandbox_runner_errors_come_back_as_our_errors(source: DirectorySource) -> None:
    spec = ExecSpec.from_json({"snapshot": "s", "args": ["true"]})
    prepared = await trio.to_thread.run_sync(prepare_run, spec, source, NATIVE_REPORT)
    bogus = dataclasses.replace(
        prepared, plan=dataclasses.replace(prepared.plan, capabilities=("CAP_BOGUS",))
    )
    # A run directory serves one mount of the overlay (its volatile work dir stays dirty).
    other = await trio.to_thread.run_sync(prepare_run, spec, source, NATIVE_REPORT)
    missing = BindMount(source="/nonexistent-runtimed-source", destination="/mnt/gone")
    failing = dataclasses.replace(
        other, plan=dataclasses.replace(other.plan, ops=(*other.plan.ops, missing))
    )
    try:
        with pytest.raises(SandboxError, match="unknown capabilities"):
            await _drain(bogus)
        # A step that fails in the runner names the op, the system call and the errno.
        with pytest.raises(KernelError) as caught:
            await _drain(failing)
        assert caught.value.syscall == "mount"
        assert caught.value.errno_name == "ENOENT"
        assert caught.value.path == "/mnt/gone"
        assert caught.value.message.startswith("bind /nonexistent-runtimed-source on /mnt/gone: ")
        assert (await _drain(prepared)).exit_code == 0
    finally:
        for run_dir in (other.run_dir, prepared.run_dir):
            if run_dir is not None:
                source.remove_run_dir(run_dir)
