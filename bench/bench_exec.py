"""Benchmark (not a test): per-exec cost of our sandbox against bubblewrap, crun and
``unshare … chroot``, natively (amd64 busybox) and emulated (arm64 busybox under QEMU).

Run as root: ``.venv/bin/python bench/bench_exec.py [--runs N]``. It installs ``bubblewrap``
and ``crun`` from Debian if missing, imports two busybox roots into a scratch store, then
re-executes itself in a private user+mount namespace with its own binfmt_misc instance
(``runtimectl binfmt install linux/arm64`` there: the host's binfmt_misc is never touched), so
every contender runs under the same conditions. Each round runs every contender once, in
turn, for the same command; the table shows per-exec medians and the median of the paired
per-round ratios ours/peer (below 1.0: we are faster).

Ours is measured the way the daemon runs it: ``sandbox.launch.open_run`` from a live trio
process with a pool of runners (``open_runners``: a spare runner started ahead, already in
fresh cgroups; clean-up in the background): snapshot lookup, mode decision, limits, overlay
and mounts, output read, result with the execution report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from binfmt.detect import platform_report
from binfmt.report import PlatformReport
from peers import ensure_tools
from runtimed.errors import Json
from sandbox.launch import Runners, open_run, open_runners
from sandbox.spec import ExecSpec
from sandbox.store import Store
from vmsteal import StealMeter

CACHE = Path(os.environ.get("RUNTIMED_TEST_CACHE", "/var/cache/runtimed-tests"))
ARCHES = {"amd64": "linux/amd64", "arm64": "linux/arm64"}
COMMANDS = {"true": ["/bin/true"], "uname -m": ["/bin/uname", "-m"]}
PEERS = ("bwrap", "crun", "unshare+chroot")


def make_root(path: Path, arch: str) -> Path:
    (path / "bin").mkdir(parents=True)
    shutil.copy(CACHE / "busybox" / arch / "busybox", path / "bin" / "busybox")
    for applet in ("sh", "true", "uname"):
        (path / "bin" / applet).symlink_to("busybox")
    for name in ("etc", "proc", "dev", "sys", "tmp"):
        (path / name).mkdir()
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return path


def make_bundle(path: Path, root: Path, argv: list[str]) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["crun", "spec"], cwd=path, check=True)
    config = json.loads((path / "config.json").read_text())
    # In a user namespace: no cgroup mount, and no gid=5 on devpts (an unmapped group).
    config["mounts"] = [m for m in config["mounts"] if m["type"] != "cgroup"]
    for mount in config["mounts"]:
        if mount["type"] == "devpts":
            mount["options"] = [o for o in mount["options"] if not o.startswith("gid=")]
    config["root"] = {"path": str(root), "readonly": True}
    config["process"]["terminal"] = False
    config["process"]["args"] = argv
    (path / "config.json").write_text(json.dumps(config))
    return path


def peer_argv(
    peer: str, root: Path, bundle: Path, argv: list[str], n: int, crun_ns: str
) -> list[str]:
    if peer == "bwrap":
        return [
            *("bwrap", "--unshare-all", "--ro-bind", str(root), "/"),
            *("--proc", "/proc", "--dev", "/dev", "--", *argv),
        ]
    if peer == "crun":
        # crun 1.8 refuses this host's hybrid cgroup layout (cgroup2 with hugetlb enabled), so
        # it runs in a mount namespace where /sys/fs/cgroup/unified is covered (nsenter: ~1 ms).
        return [
            *("nsenter", f"--mount={crun_ns}", "--", "crun", "--cgroup-manager=disabled"),
            *("run", "--bundle", str(bundle), f"bench-{n}"),
        ]
    return [
        *("unshare", "--mount", "--pid", "--fork", "--uts", "--ipc", "--net", "--"),
        *("chroot", str(root), *argv),
    ]


def run_quiet(cmd: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


async def run_ours(
    runners: Runners, store: Store, snapshot: str, argv: list[str], report: PlatformReport
) -> float:
    spec = ExecSpec.from_json({"snapshot": snapshot, "args": list[Json](argv)})
    start = time.perf_counter()
    async with open_run(spec, store, report, runners=runners) as execution:
        async for _ in execution.output:
            pass
        result = await execution.wait()
    elapsed = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"ours: {argv} exited {result.exit_code}")
    return elapsed


async def inner(args: argparse.Namespace) -> None:
    work = Path(args.work)
    report = platform_report(Path(args.binfmt_misc))
    store = Store(work / "state")
    snapshots = json.loads((work / "snapshots.json").read_text())
    meter = StealMeter()
    async with open_runners() as runners:
        rows = await measure(args, runners, store, snapshots, report, work)
    steal = meter.read()
    print(f"per-exec medians over {args.runs} rounds (ms); ratio = median of ours/peer per round")
    print(f"{'platform':14} {'command':9} {'ours':>7} " + " ".join(f"{p:>15}" for p in PEERS))
    for platform, label, times in rows:
        ours = times["ours"]
        cells = []
        for peer in PEERS:
            ratio = statistics.median(o / p for o, p in zip(ours, times[peer], strict=True))
            cells.append(f"{statistics.median(times[peer]) * 1e3:6.1f} x{ratio:5.2f}")
        median = statistics.median(ours) * 1e3
        print(f"{platform:14} {label:9} {median:7.1f} " + " ".join(f"{c:>15}" for c in cells))
    print(steal.describe())


Row = tuple[str, str, dict[str, list[float]]]


async def measure(
    args: argparse.Namespace,
    runners: Runners,
    store: Store,
    snapshots: dict[str, str],
    report: PlatformReport,
    work: Path,
) -> list[Row]:
    rows: list[Row] = []
    counter = 0
    cover = "mount -t tmpfs none /sys/fs/cgroup/unified && exec sleep infinity"
    holder = subprocess.Popen(["unshare", "--mount", "--", "sh", "-c", cover])  # noqa: ASYNC220
    await trio.sleep(0.5)  # the tmpfs is mounted by then
    crun_ns = f"/proc/{holder.pid}/ns/mnt"
    for arch, platform in ARCHES.items():
        root = work / "roots" / arch
        for label, argv in COMMANDS.items():
            bundle = work / "bundles" / f"{arch}-{label.replace(' ', '_')}"
            times: dict[str, list[float]] = {"ours": [], **{p: [] for p in PEERS}}
            for _ in range(args.runs + 1):  # the first round warms caches and is dropped
                ours = await run_ours(runners, store, snapshots[arch], argv, report)
                round_times = {"ours": ours}
                for peer in PEERS:
                    counter += 1
                    cmd = peer_argv(peer, root, bundle, argv, counter, crun_ns)
                    round_times[peer] = await trio.to_thread.run_sync(timed, run_quiet(cmd))
                for key, value in round_times.items():
                    times[key].append(value)
            rows.append((platform, label, {k: v[1:] for k, v in times.items()}))
    holder.kill()
    holder.wait()
    return rows


def outer(args: argparse.Namespace) -> None:
    ensure_tools({"bwrap": "bubblewrap", "crun": "crun"})
    work = Path(tempfile.mkdtemp(prefix="bench-exec-", dir="/var/tmp"))
    try:
        snapshots = {}
        with Store(work / "state") as store:
            for arch, platform in ARCHES.items():
                root = make_root(work / "roots" / arch, arch)
                snapshots[arch] = store.import_source(root, platform=platform).id
                for label, argv in COMMANDS.items():
                    make_bundle(work / "bundles" / f"{arch}-{label.replace(' ', '_')}", root, argv)
        (work / "snapshots.json").write_text(json.dumps(snapshots))
        script = (
            'BM=$(mktemp -d) && mount -t binfmt_misc none "$BM" && '
            '"$0" binfmt install --binfmt-misc "$BM" linux/arm64 >/dev/null && '
            'exec "$1" "$2" --inner --binfmt-misc "$BM" --work "$3" --runs "$4"'
        )
        runtimectl = Path(sys.executable).parent / "runtimectl"
        subprocess.run(
            [
                *("unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c", script),
                *(str(runtimectl), sys.executable, __file__, str(work), str(args.runs)),
            ],
            check=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--binfmt-misc", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        trio.run(inner, args)
    else:
        outer(args)


if __name__ == "__main__":
    main()
