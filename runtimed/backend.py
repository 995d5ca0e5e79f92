"""IO: the daemon's capabilities: binfmt_misc (binfmt.*), the snapshot store and the sandbox.

Implements :class:`runtimed.handlers.Backend` with the real modules. Their APIs are
synchronous; every call goes through ``trio.to_thread`` (blocking work never runs on the event
loop). One :class:`sandbox.store.Store` serves every call (it opens a database connection per
operation, so worker threads may share it); opened at start-up, it reclaims what a crash left
(staging and run directories, unreferenced layers) and then holds ``store.lock`` shared until
the daemon exits.

Files come from clients as descriptors: the daemon reads a regular file through
``/proc/self/fd/N`` (the inode the client opened, not a path it named) and spools a pipe to a
private file first; directories are refused, because following a client's directory tree
with root's rights would open whatever its symlinks point to.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from binfmt import detect, installer, kernel
from binfmt.diagnose import diagnose
from binfmt.install import ActionKind, Plan
from binfmt.platform import normalize, parse_platform
from binfmt.qemu import target_for_platform
from binfmt.report import PlatformReport
from runtimed.config import Config
from runtimed.errors import (
    InvalidParamsError,
    Json,
    RuntimedError,
    SnapshotError,
)
from runtimed.handlers import OutputSink, ProgressSink
from sandbox.launch import Runners, RunResult, open_run, open_runners
from sandbox.spec import ExecSpec
from sandbox.store import ExportFormat, Store

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

COPY_CHUNK: Final = 1024 * 1024
CLIENT_STREAM: Final = "client stream"


class DaemonBackend:
    """The capabilities behind the method table.

    Args:
        config: The current configuration (re-read on each call, so SIGHUP takes effect).
    """

    def __init__(self, config: Callable[[], Config]) -> None:
        self.config = config
        self._report: PlatformReport | None = None
        self._store: Store | None = None
        self._runners: Runners | None = None

    @asynccontextmanager
    async def open_runners(self) -> AsyncIterator[None]:
        """Keep a pool of sandbox runners for the daemon's lifetime: a spare started ahead of
        the next exec, clean-ups after each exec in the background (finished on exit)."""
        async with open_runners() as runners:
            self._runners = runners
            try:
                yield
            finally:
                self._runners = None

    @contextmanager
    def open_state(self) -> Iterator[Store]:
        """Open the store (which recovers the state directory) for the daemon's lifetime."""
        with Store(self.config().state_dir) as store:
            self._store = store
            try:
                yield store
            finally:
                self._store = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimedError("the snapshot store is not open")
        return self._store

    # --- platforms and binfmt_misc --------------------------------------------------------

    async def refresh_platforms(self) -> PlatformReport:
        """Probe again (after handlers changed) and keep the report for GetPlatforms."""
        self._report = await trio.to_thread.run_sync(
            detect.platform_report, self.config().binfmt_misc
        )
        return self._report

    async def get_platforms(self) -> dict[str, Json]:
        report = self._report or await self.refresh_platforms()
        return report.to_json()

    async def check_binfmt(self) -> dict[str, Json]:
        facts, report = await trio.to_thread.run_sync(
            detect.gather_facts, self.config().binfmt_misc
        )
        self._report = report
        return diagnose(facts, report).to_json()

    async def install_emulators(
        self, platforms: list[str] | None, *, force: bool
    ) -> dict[str, Json]:
        path = self.config().binfmt_misc
        result = await trio.to_thread.run_sync(
            lambda: install_handlers(path, platforms, force=force)
        )
        return self._changed(result.plan, result.skipped, await self.refresh_platforms())

    async def uninstall_emulators(self, platforms: list[str] | None) -> dict[str, Json]:
        path = self.config().binfmt_misc

        def uninstall() -> Plan:
            host = detect.host_platform()
            chosen = (
                None
                if platforms is None
                else [normalize(parse_platform(p, host=host)) for p in platforms]
            )
            return installer.toggle(path, ActionKind.REMOVE, chosen, force=False)

        plan = await trio.to_thread.run_sync(uninstall)
        return self._changed(plan, [], await self.refresh_platforms())

    @staticmethod
    def _changed(
        plan: Plan, skipped: Sequence[tuple[str, str]], report: PlatformReport
    ) -> dict[str, Json]:
        return {
            "changes": [c.to_json() for c in plan.changes],
            "skipped": [{"platform": p, "why": why} for p, why in skipped],
            "report": report.to_json(),
        }

    # --- snapshots ------------------------------------------------------------------------

    async def import_snapshot(
        self, fd: int, *, platform: str | None, source: str | None, progress: ProgressSink
    ) -> dict[str, Json]:
        def report(line: str) -> None:
            trio.from_thread.run(progress, {"message": line})

        def run() -> dict[str, Json]:
            store = self.store
            name = source or client_source_name(fd)
            with readable_source(fd, store.staging_dir) as path:
                info = store.import_source(path, platform=platform, progress=report, name=name)
                return info.to_json()

        return await trio.to_thread.run_sync(run)

    async def list_snapshots(self) -> list[Json]:
        def run() -> list[Json]:
            return [info.to_json() for info in self.store.list()]

        return await trio.to_thread.run_sync(run)

    async def inspect_snapshot(self, snapshot_id: str) -> dict[str, Json]:
        def run() -> dict[str, Json]:
            return self.store.get(snapshot_id).to_json()

        return await trio.to_thread.run_sync(run)

    async def remove_snapshot(self, snapshot_id: str) -> None:
        def run() -> None:
            self.store.remove(snapshot_id)

        await trio.to_thread.run_sync(run)
        if self._runners is not None:
            # A spare built on the snapshot holds its layers' files (its overlay) until it goes.
            self._runners.discard_spares()

    async def export_snapshots(self, snapshot_ids: list[str], fd: int, *, fmt: str) -> int:
        def run() -> int:
            scratch = Path(tempfile.mkdtemp(dir=self.store.staging_dir, prefix="export-"))
            try:
                dest = scratch / "out"
                self.store.export(snapshot_ids, dest, fmt=ExportFormat(fmt))
                return write_to_fd(dest, fd)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

        return await trio.to_thread.run_sync(run)

    async def collect_garbage(self) -> list[str]:
        return await trio.to_thread.run_sync(self.store.gc)

    # --- execution ------------------------------------------------------------------------

    async def exec(self, spec: Mapping[str, Json], output: OutputSink) -> dict[str, Json]:
        start = trio.current_time()
        request = ExecSpec.from_json(dict(spec))
        report = self._report or await self.refresh_platforms()
        result = await self._run(request, report, output)
        summary = result.report.summary()
        log.info(
            "exec exited %d after %.3f s: %s",
            result.exit_code,
            trio.current_time() - start,
            summary,
        )
        return {**result.to_json(), "summary": summary}

    async def _run(
        self,
        request: ExecSpec,
        report: PlatformReport,
        output: OutputSink,
    ) -> RunResult:
        async with open_run(request, self.store, report, runners=self._runners) as execution:
            async for chunk in execution.output:
                await output(str(chunk.stream), chunk.data)
            return await execution.wait()


def install_handlers(
    path: Path, platforms: Sequence[str] | None, *, force: bool
) -> installer.InstallResult:
    """Register QEMU handlers for ``platforms`` (None: every foreign one QEMU is installed
    for; the rest are skipped with the reason). Mounts binfmt_misc at ``path`` if needed.

    Raises:
        PlatformError: a platform does not parse.
        UnsupportedPlatformError: QEMU cannot emulate a named platform.
        NativePlatformError: a named platform runs natively here.
        InterpreterNotFoundError: no QEMU for a named platform.
        HandlerConflictError: another tool's handler is in the way and ``force`` is not set.
        KernelError: binfmt_misc refused a write.
    """
    kernel.ensure_mounted(path)
    host = detect.host_platform()
    targets = (
        None
        if platforms is None
        else [target_for_platform(parse_platform(p, host=host)) for p in platforms]
    )
    return installer.install(path, targets, force=force, credential=False)


def client_source_name(fd: int) -> str:
    """What a snapshot imported from a client's descriptor records as its source: the path
    the client opened, as the kernel names the open file (read by readlink, never opened by
    that name), or ``client stream`` for a pipe or an unlinked file."""
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return CLIENT_STREAM
    return name if name.startswith("/") and not name.endswith(" (deleted)") else CLIENT_STREAM


@contextmanager
def readable_source(fd: int, spool_dir: Path) -> Iterator[Path]:
    """A path the store can open for a client's descriptor; pipes are spooled first.

    Raises:
        InvalidParamsError: the descriptor is a directory or a device.
    """
    require_access(fd, readable=True)
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        # The client opened this file for reading, so reopening the same inode through /proc
        # gives the daemon no access the client did not have.
        yield Path(f"/proc/self/fd/{fd}")
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        raise InvalidParamsError(
            "fileDescriptor must be a regular file or a pipe",
            details={"parameter": "fileDescriptor"},
            hint="pass an archive (tar, OCI layout tar, docker save), not a directory",
        )
    out, name = tempfile.mkstemp(dir=spool_dir, prefix="spool-")
    try:
        with os.fdopen(out, "wb") as spool:
            try:
                while chunk := os.read(fd, COPY_CHUNK):
                    spool.write(chunk)
            except OSError as exc:
                raise SnapshotError(
                    f"import: reading the client's descriptor failed: {exc.strerror}"
                ) from exc
        yield Path(name)
    finally:
        os.unlink(name)


def require_access(fd: int, *, readable: bool) -> None:
    """Refuse a descriptor the client could not read (or write) through itself.

    An O_PATH descriptor names a file without granting access to it: reopened or used with
    root's rights it would hand the client any file on the host.

    Raises:
        InvalidParamsError: the descriptor is O_PATH or opened in the wrong direction.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    mode = flags & os.O_ACCMODE
    allowed = (os.O_RDONLY, os.O_RDWR) if readable else (os.O_WRONLY, os.O_RDWR)
    if flags & os.O_PATH or mode not in allowed:
        raise InvalidParamsError(
            f"fileDescriptor must be opened for {'reading' if readable else 'writing'}",
            details={"parameter": "fileDescriptor"},
        )


def write_to_fd(dest: Path, fd: int) -> int:
    """Copy an exported file into a client's descriptor; an exported directory (an OCI
    layout) is streamed as a tar, never written to disk a second time.

    Returns:
        The number of bytes written.

    Raises:
        InvalidParamsError: the descriptor is not open for writing.
        SnapshotError: writing to the descriptor failed.
    """
    require_access(fd, readable=False)
    sink = _FdSink(fd)
    if dest.is_dir():
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(dest.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(dest)), recursive=False)
    else:
        with dest.open("rb") as src:
            while chunk := src.read(COPY_CHUNK):
                sink.write(chunk)
    return sink.written


class _FdSink(io.RawIOBase):
    """A write-only file object over a client's descriptor that counts what it wrote."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            try:
                done = os.write(self.fd, view)
            except OSError as exc:
                raise SnapshotError(
                    f"export: writing to the client's descriptor failed: {exc.strerror}",
                    details={"written": self.written},
                ) from exc
            self.written += done
            view = view[done:]
        return size
