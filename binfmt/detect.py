"""IO: what this host is and runs: its platform (uname, /proc/cpuinfo), QEMU interpreters on
disk, the native probe, the emulated probe, and the facts and platform report built from them.

Probes run in :mod:`binfmt.helper` (an exec'd single-threaded process, see its docstring); the
decisions are pure (:mod:`binfmt.report`, :mod:`binfmt.diagnose`, :mod:`binfmt.install`).

Preserve-argv0 support is decided by :func:`binfmt.install.supports_preserve_argv0` from the
interpreter's name, its ``--version`` output and the kernel release read here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from binfmt import kernel
from binfmt.diagnose import BinfmtFacts
from binfmt.elf import parse_elf
from binfmt.entry import BinfmtEntry
from binfmt.install import supports_preserve_argv0
from binfmt.platform import Platform, normalize, platform_from_uname
from binfmt.probe import probe_image
from binfmt.qemu import QEMU_TARGETS, QemuTarget, interpreter_candidates
from binfmt.report import (
    EntryFacts,
    PlatformReport,
    ProbeResult,
    build_report,
    decide_native,
    native_candidates,
)
from runtimed.errors import (
    ElfError,
    InterpreterNotFoundError,
    Json,
    RuntimedError,
    UnsupportedPlatformError,
)

log = logging.getLogger(__name__)

CPUINFO: Final = Path("/proc/cpuinfo")
# Enough of an ELF file for the header and, usually, the program headers and PT_INTERP.
ELF_HEAD_BYTES: Final = 4096
VERSION_TIMEOUT: Final = 10.0


def host_platform() -> Platform:
    """The platform of this machine: ``uname -m`` plus the CPU flags (amd64 level).

    Raises:
        UnsupportedPlatformError: a machine name we have no architecture for.
    """
    flags: frozenset[str] = frozenset()
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags = frozenset(value.split())
                break
    except OSError as exc:
        log.warning("cannot read %s (%s): the amd64 level is assumed to be v1", CPUINFO, exc)
    byteorder: Literal["little", "big"] = "big" if sys.byteorder == "big" else "little"
    return platform_from_uname(os.uname().machine, cpu_flags=flags, byteorder=byteorder)


@dataclass(frozen=True, slots=True, kw_only=True)
class Interpreter:
    """A static QEMU user-mode interpreter found on disk."""

    path: Path
    preserve_argv0: bool


def read_elf_interpreter(path: Path) -> str | None:
    """The ``PT_INTERP`` of the ELF file at ``path`` (None: static).

    Raises:
        ElfError: not an ELF file or truncated.
        OSError: it cannot be read.
    """
    with path.open("rb") as file:
        head = file.read(ELF_HEAD_BYTES)
        reads: dict[int, bytes] = {}
        info = parse_elf(head)
        while info.missing is not None:
            offset, size = info.missing
            file.seek(offset)
            reads[offset] = file.read(size)
            info = parse_elf(head, reads=reads)
    return info.interpreter


def _resolve(candidate: str) -> Path | None:
    if candidate.startswith("/"):
        return Path(candidate) if os.path.exists(candidate) else None
    found = shutil.which(candidate, path=os.environ.get("PATH", os.defpath))
    return Path(found) if found else None


def find_interpreter(target: QemuTarget) -> Interpreter:
    """The best interpreter for ``target``: the first static, executable candidate.

    Raises:
        InterpreterNotFoundError: no candidate exists, or none is a static executable.
    """
    path = _static_interpreter(target)
    return Interpreter(
        path=path,
        preserve_argv0=supports_preserve_argv0(
            path.name, qemu_version=_qemu_version(path), kernel_release=os.uname().release
        ),
    )


def _static_interpreter(target: QemuTarget) -> Path:
    """The first static, executable interpreter candidate of ``target`` (no process started).

    Raises:
        InterpreterNotFoundError: no candidate exists, or none is a static executable.
    """
    rejected: list[str] = []
    for candidate in interpreter_candidates(target):
        path = _resolve(candidate)
        if path is None:
            continue
        if not os.access(path, os.X_OK):
            rejected.append(f"{path}: not executable")
            continue
        try:
            loader = read_elf_interpreter(path)
        except (OSError, ElfError) as exc:
            rejected.append(f"{path}: {exc}")
            continue
        if loader is not None:
            rejected.append(f"{path}: dynamically linked ({loader})")
            continue
        return path
    raise InterpreterNotFoundError(
        f"no static QEMU interpreter for {target.platform} ({target.cpu})"
        + (f": {'; '.join(rejected)}" if rejected else ""),
        details={
            "platform": str(target.platform),
            "candidates": list(interpreter_candidates(target)),
        },
        hint="apt-get install qemu-user-static",
    )


def _qemu_version(path: Path) -> str:
    try:
        done = subprocess.run(
            [os.fspath(path), "--version"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s --version failed: %s", path, exc)
        return ""
    return done.stdout


def qemu_installed() -> bool:
    """Whether any QEMU target has a usable interpreter on this host."""
    for target in QEMU_TARGETS:
        try:
            _static_interpreter(target)
        except InterpreterNotFoundError:
            continue
        return True
    return False


def entry_facts(entry: BinfmtEntry) -> EntryFacts:
    """What the interpreter of ``entry`` is today (path as the kernel resolves it: absolute)."""
    path = Path(entry.interpreter)
    try:
        info = path.stat()
    except OSError:
        return EntryFacts(entry=entry, interpreter_exists=False)
    try:
        static: bool | None = read_elf_interpreter(path) is None
    except (OSError, ElfError):
        static = None
    try:
        noexec = bool(os.statvfs(path).f_flag & os.ST_NOEXEC)
    except OSError:
        noexec = False
    return EntryFacts(
        entry=entry,
        interpreter_exists=True,
        interpreter_executable=os.access(path, os.X_OK),
        interpreter_static=static,
        interpreter_noexec=noexec,
        interpreter_realpath=os.path.realpath(path),
        interpreter_id=(info.st_dev, info.st_ino),
    )


def _probe_platforms() -> list[Platform]:
    """Every Linux platform of the QEMU table, in table order, once."""
    return list(dict.fromkeys(normalize(t.platform) for t in QEMU_TARGETS))


def run_probes(
    mode: str, platforms: Sequence[Platform]
) -> tuple[dict[str, Json], list[ProbeResult]]:
    """Run the probe images of ``platforms`` through the helper in ``mode``.

    Platforms without a probe image are left out of the results.

    Raises:
        KernelError: the helper failed a system call (its errno and path).
        BinfmtError: the helper could not run or answered nonsense.
    """
    probes: list[dict[str, Json]] = []
    by_name: dict[str, Platform] = {}
    for platform in platforms:
        try:
            image = probe_image(platform)
        except UnsupportedPlatformError:
            continue
        by_name[str(platform)] = platform
        probes.append({"name": str(platform), "image": base64.b64encode(image).decode()})
    request = json.dumps({"probes": probes}).encode()
    reply = kernel.run_helper(["probe", mode], request=request)
    results: list[ProbeResult] = []
    raw = reply.get("results")
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict) or item.get("name") not in by_name:
            continue
        exe, error = item.get("exe"), item.get("error")
        results.append(
            ProbeResult(
                platform=by_name[str(item["name"])],
                ran=item.get("ran") is True,
                native=item.get("native") is True,
                exe=exe if isinstance(exe, str) else None,
                exe_id=_file_id(item.get("exe_id")),
                error=error if isinstance(error, str) else None,
            )
        )
    return reply, results


def _file_id(value: Json) -> tuple[int, int] | None:
    """``[st_dev, st_ino]`` from the helper's reply."""
    if isinstance(value, list) and len(value) == 2:
        dev, ino = value
        if isinstance(dev, int) and isinstance(ino, int):
            return dev, ino
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class NativeSet:
    """The native platforms, how they were decided, and whether the kernel gives user
    namespaces their own binfmt_misc (None when the probe could not tell)."""

    platforms: frozenset[Platform]
    source: str
    per_userns_binfmt: bool | None
    reason: str = ""


def native_platforms(host: Platform) -> NativeSet:
    """Decide the native set by the native probe; fall back to the compatibility table.

    The probe runs the candidates' images in a new user namespace with a fresh, empty
    binfmt_misc, so only the kernel itself can run them. Kernels before 6.7 have no such
    instance: then the table decides, and ``source`` says so.
    """
    candidates = native_candidates(host, _probe_platforms())
    try:
        reply, results = run_probes("native", candidates)
    except RuntimedError as exc:
        log.warning("native probe failed, using the compatibility table: %s", exc)
        native, source = decide_native(host, candidates, None, why_no_probe=exc.message)
        return NativeSet(
            platforms=native, source=source, per_userns_binfmt=None, reason=exc.message
        )
    if reply.get("private_binfmt_misc") is not True:
        why = str(reply.get("reason", "no private binfmt_misc instance"))
        native, source = decide_native(host, candidates, None, why_no_probe=why)
        return NativeSet(platforms=native, source=source, per_userns_binfmt=False, reason=why)
    native, source = decide_native(host, candidates, results)
    return NativeSet(platforms=native, source=source, per_userns_binfmt=True)


def _emulated_probe() -> list[ProbeResult]:
    """The emulated probe's results; if the helper cannot run, every probe failed with why."""
    try:
        return run_probes("emulated", _probe_platforms())[1]
    except RuntimedError as exc:
        log.warning("emulated probe failed: %s", exc)
        why = f"the probe runner failed: {exc.message}"
        return [
            ProbeResult(platform=p, ran=False, native=False, error=why) for p in _probe_platforms()
        ]


def gather_facts(binfmt_misc: Path) -> tuple[BinfmtFacts, PlatformReport]:
    """Everything check-binfmt and the platform report need; reads only, changes nothing.

    Raises:
        KernelError: /proc cannot be read or a probe failed a system call.
        BinfmtError: an entry's status text is not understood.
    """
    host = host_platform()
    # The two probes are independent helper processes: run the native one meanwhile.
    with ThreadPoolExecutor(max_workers=1) as pool:
        native_future = pool.submit(native_platforms, host)
        facts, report = _gather(binfmt_misc, host, native_future)
    return facts, report


def _gather(
    binfmt_misc: Path, host: Platform, native_future: Future[NativeSet]
) -> tuple[BinfmtFacts, PlatformReport]:
    supported = kernel.filesystem_supported()
    mounted = supported and kernel.is_mounted(binfmt_misc)
    enabled = False
    entries: tuple[EntryFacts, ...] = ()
    probes: list[ProbeResult] = []
    problem: str | None = None
    if not supported:
        problem = "the kernel has no binfmt_misc"
    elif not mounted:
        problem = f"binfmt_misc is not mounted on {binfmt_misc}"
    else:
        state = kernel.read_state(binfmt_misc)
        enabled = state.enabled
        entries = tuple(entry_facts(e) for e in state.entries)
        if not enabled:
            problem = f"binfmt_misc at {binfmt_misc} is disabled"
        else:
            probes = _emulated_probe()
    native = native_future.result()
    facts = BinfmtFacts(
        binfmt_misc=os.fspath(binfmt_misc),
        supported=supported,
        mounted=mounted,
        enabled=enabled,
        entries=entries,
        host=host,
        native=native.platforms,
        per_userns_binfmt=native.per_userns_binfmt,
        per_userns_reason=native.reason,
        probes=tuple(probes),
        qemu_installed=qemu_installed(),
    )
    report = build_report(
        host=host,
        native=native.platforms,
        native_source=native.source,
        platforms=_probe_platforms(),
        entries=entries,
        probes=probes,
        binfmt_problem=problem,
    )
    return facts, report


def platform_report(binfmt_misc: Path) -> PlatformReport:
    """Native, emulated (proven by probe) and unavailable platforms of this host.

    Raises:
        KernelError: /proc cannot be read or a probe failed a system call.
        BinfmtError: an entry's status text is not understood.
    """
    return gather_facts(binfmt_misc)[1]
