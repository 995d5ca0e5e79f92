"""IO: ``runtimectl snapshot import|ls|inspect|rm|gc|export|mount|unmount``: the rootfs
snapshot store, through the daemon (``--socket``, or ``--embedded`` for one in this command).

Files cross the socket as descriptors this command opens with the invoking user's rights, so
the root daemon never opens a path we name:

- ``import FILE`` passes the file read-only. ``import DIR`` (a root directory or an OCI
  layout directory) is written as a tar by :func:`sandbox.layertar.write_layer` into an
  anonymous temporary file (``$TMPDIR``) first, which is then passed: a tree that cannot be
  read completely fails here, before the daemon sees anything, instead of arriving as a
  truncated stream the daemon would import. The daemon sniffs what it got (tarball, OCI
  layout tar), as it does for any file, and records as the snapshot's source the absolute
  path the user named (ImportSnapshot's ``source``, sent when it is printable). The tar is
  the layer format, so a 0/0 character device (overlayfs' whiteout) in the tree becomes an
  OCI whiteout, which a first layer drops.
- ``export -o PATH`` creates PATH itself (``O_EXCL``: an existing PATH is a usage error) and
  passes it for writing. ``--format oci`` writes an OCI layout *directory* at PATH unless PATH
  ends in ``.tar``: the daemon writes the layout as a tar into a temporary file next to PATH,
  which is unpacked into a fresh directory renamed into place, so PATH is all or nothing.

``mount``/``unmount`` stay in this process on the store at ``--state-dir`` (as root): the
daemon never mounts at a path a client names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from runtimed.client import Client
from runtimed.commands.options import add_state_dir_argument
from runtimed.errors import InvalidArchiveError, Json, RpcError, SnapshotError, UsageError
from runtimed.interface import is_source_name
from runtimed.session import add_session_arguments, run_session
from sandbox import fstree, layertar
from sandbox.archive import parse_member_path
from sandbox.store import ExportFormat, Store

TAR_SUFFIX: Final = ".tar"


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    add_state_dir_argument(parser)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON for tools")


def _remote(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    _common(parser, json_flag=json_flag)
    add_session_arguments(parser)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``snapshot`` and its subcommands to ``runtimectl``."""
    group = sub.add_parser("snapshot", help="import, inspect, export and mount rootfs snapshots")
    actions = group.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    imp = actions.add_parser(
        "import",
        help="import a directory, a tarball (any compression), an OCI layout (dir or tar) "
        "or a docker save archive",
    )
    imp.add_argument("source", type=Path, metavar="SOURCE")
    imp.add_argument(
        "--platform",
        metavar="P",
        help="image index: the platform to pick (default: the host's); tarball or directory: "
        "the platform to record instead of detecting it from its ELF binaries",
    )
    _remote(imp)
    imp.set_defaults(func=_import)

    ls = actions.add_parser("ls", help="list snapshots")
    _remote(ls)
    ls.set_defaults(func=_ls)

    inspect = actions.add_parser("inspect", help="show a snapshot: platform, layers, config")
    inspect.add_argument("id", metavar="ID")
    _remote(inspect)
    inspect.set_defaults(func=_inspect)

    rm = actions.add_parser("rm", help="remove snapshots (layers others use stay)")
    rm.add_argument("ids", nargs="+", metavar="ID")
    _remote(rm)
    rm.set_defaults(func=_rm)

    gc = actions.add_parser("gc", help="delete layers no snapshot uses")
    _remote(gc)
    gc.set_defaults(func=_gc)

    export = actions.add_parser(
        "export", help="write snapshots as a rootfs tarball or a (multi-platform) OCI layout"
    )
    export.add_argument("ids", nargs="+", metavar="ID")
    export.add_argument("--format", choices=[f.value for f in ExportFormat], default="oci")
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="PATH",
        help="must not exist; with --format oci a layout directory, or a layout tar when "
        "PATH ends in .tar",
    )
    _remote(export, json_flag=False)
    export.set_defaults(func=_export)

    mount = actions.add_parser(
        "mount", help="mount a snapshot read-only at DIR (overlay; in this process, as root)"
    )
    mount.add_argument("id", metavar="ID")
    mount.add_argument("dir", type=Path, metavar="DIR")
    _common(mount, json_flag=False)
    mount.set_defaults(func=_mount)

    unmount = actions.add_parser("unmount", help="unmount a view made by snapshot mount")
    unmount.add_argument("dir", type=Path, metavar="DIR")
    _common(unmount, json_flag=False)
    unmount.set_defaults(func=_unmount)


# --- the daemon's snapshot objects, for people -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Snapshot:
    """The fields of a snapshot object (``SnapshotInfo.to_json()``) this command shows."""

    raw: dict[str, Json]

    @classmethod
    def from_json(cls, obj: Json) -> _Snapshot:
        """Raises: RpcError: the daemon's object lacks a field of the right type."""
        if not isinstance(obj, dict):
            raise RpcError("the daemon sent a snapshot that is not an object")
        snapshot = cls(raw=obj)
        for name in ("id", "platform", "platform_source", "created", "source"):
            snapshot.text(name)
        snapshot.size()
        snapshot.layers()
        return snapshot

    def text(self, name: str) -> str:
        value = self.raw.get(name)
        if not isinstance(value, str):
            raise RpcError(f"the daemon's snapshot lacks a valid {name!r}")
        return value

    def size(self) -> int:
        value = self.raw.get("size")
        if not isinstance(value, int):
            raise RpcError("the daemon's snapshot lacks a valid 'size'")
        return value

    def layers(self) -> list[dict[str, Json]]:
        value = self.raw.get("layers")
        if not isinstance(value, list) or not all(isinstance(layer, dict) for layer in value):
            raise RpcError("the daemon's snapshot lacks a valid 'layers'")
        return [layer for layer in value if isinstance(layer, dict)]

    def config(self) -> dict[str, Json]:
        value = self.raw.get("config")
        return value if isinstance(value, dict) else {}

    @property
    def short_id(self) -> str:
        return self.text("id").partition(":")[2][:12]


def _print_json(value: Json) -> None:
    print(json.dumps(value, indent=2))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _describe(snapshot: _Snapshot) -> str:
    config = snapshot.config()
    lines = [
        f"id:        {snapshot.text('id')}",
        f"platform:  {snapshot.text('platform')} ({snapshot.text('platform_source')})",
        f"created:   {snapshot.text('created')}",
        f"source:    {snapshot.text('source')}",
        f"size:      {_human(snapshot.size())}",
        f"env:       {json.dumps(config.get('env', []))}",
        f"entrypoint: {json.dumps(config.get('entrypoint', []))}",
        f"cmd:       {json.dumps(config.get('cmd', []))}",
        f"workdir:   {config.get('working_dir') or '/'}",
        f"user:      {config.get('user') or '(root)'}",
        f"layers:    {len(snapshot.layers())}",
    ]
    for layer in snapshot.layers():
        size, entries = layer.get("size"), layer.get("entries")
        lines.append(
            f"  {layer.get('chain_id')}  {_human(size if isinstance(size, int) else 0):>10}  "
            f"{entries if isinstance(entries, int) else '?'} entries  "
            f"diff {str(layer.get('diff_id'))[:19]}"
        )
    return "\n".join(lines)


class _Progress:
    """One self-overwriting status line on a terminal's stderr; silent otherwise."""

    def __init__(self) -> None:
        self.active = sys.stderr.isatty()
        self._shown = False

    async def __call__(self, progress: dict[str, Json]) -> None:
        line = progress.get("message")
        if self.active and isinstance(line, str):
            sys.stderr.write(f"\r\x1b[K{line[:120]}")
            sys.stderr.flush()
            self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# --- import ------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_import_source(source: Path) -> Iterator[IO[bytes]]:
    """A readable file of what to import, opened with this user's rights.

    A file is opened as it is; a directory is written as a tar into an anonymous temporary
    file (complete, or not at all).

    Raises:
        SnapshotError: the source cannot be read.
    """
    try:
        if not source.is_dir():
            with source.open("rb") as file:
                yield file
            return
        with tempfile.TemporaryFile(prefix="runtimectl-import-") as spool:
            layertar.write_layer(source, spool)
            spool.flush()
            spool.seek(0)
            yield spool
    except OSError as exc:
        raise SnapshotError(
            f"import {source}: {exc.strerror or exc}", details={"source": str(source)}
        ) from exc


def _import(args: argparse.Namespace) -> int:
    progress = _Progress()
    # The daemon sees only a descriptor (an anonymous spool file for a directory): tell it
    # what the user named, when the name can travel (printable, not too long).
    name = str(args.source.absolute())
    with open_import_source(args.source) as source:

        async def call(client: Client) -> dict[str, Json]:
            return await client.import_snapshot(
                source.fileno(),
                platform=args.platform,
                source=name if is_source_name(name) else None,
                progress=progress,
            )

        try:
            snapshot = _Snapshot.from_json(run_session(args, call))
        finally:
            progress.done()
    if args.json:
        _print_json(snapshot.raw)
    else:
        print(snapshot.text("id"))
        print(f"platform: {snapshot.text('platform')} ({snapshot.text('platform_source')})")
    return 0


# --- ls, inspect, rm, gc -------------------------------------------------------------------------


def _ls(args: argparse.Namespace) -> int:
    listed = run_session(args, lambda client: client.list_snapshots())
    if args.json:
        _print_json(listed)
        return 0
    print(f"{'ID':<12}  {'PLATFORM':<16}  {'SIZE':>10}  LAYERS  {'CREATED':<25}  SOURCE")
    for snapshot in map(_Snapshot.from_json, listed):
        print(
            f"{snapshot.short_id:<12}  {snapshot.text('platform'):<16}  "
            f"{_human(snapshot.size()):>10}  {len(snapshot.layers()):>6}  "
            f"{snapshot.text('created'):<25}  {snapshot.text('source')}"
        )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    snapshot = _Snapshot.from_json(run_session(args, lambda c: c.inspect_snapshot(args.id)))
    if args.json:
        _print_json(snapshot.raw)
    else:
        print(_describe(snapshot))
    return 0


def _rm(args: argparse.Namespace) -> int:
    async def remove(client: Client) -> list[Json]:
        removed: list[Json] = []
        for ref in args.ids:
            # Resolve the prefix first, so the id printed is the one removed.
            snapshot_id = _Snapshot.from_json(await client.inspect_snapshot(ref)).text("id")
            await client.remove_snapshot(snapshot_id)
            removed.append(snapshot_id)
            if not args.json:
                print(f"removed {snapshot_id}")
        return removed

    removed = run_session(args, remove)
    if args.json:
        _print_json(removed)
    return 0


def _gc(args: argparse.Namespace) -> int:
    removed = run_session(args, lambda client: client.collect_garbage())
    if args.json:
        _print_json(removed)
    else:
        print(f"removed {len(removed)} unused layer(s)")
    return 0


# --- export ------------------------------------------------------------------------------------


def _exists(dest: Path) -> UsageError:
    return UsageError(f"export: {dest} exists", details={"path": str(dest)})


def _export_file(args: argparse.Namespace, dest: Path) -> None:
    """The daemon writes into ``dest``, created here; removed again if the export fails."""
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise _exists(dest) from None
    except OSError as exc:
        raise SnapshotError(f"export to {dest}: {exc.strerror}") from exc
    try:
        run_session(args, lambda c: c.export_snapshots(args.ids, fd, fmt=args.format))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _export_layout_dir(args: argparse.Namespace, dest: Path) -> None:
    """The daemon's layout tar, unpacked into a fresh directory that replaces an empty
    placeholder at ``dest`` (rename(2) over an empty directory is atomic)."""
    try:
        dest.mkdir()
    except FileExistsError:
        raise _exists(dest) from None
    except OSError as exc:
        raise SnapshotError(f"export to {dest}: {exc.strerror}") from exc
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with tempfile.TemporaryFile(dir=dest.parent) as archive:
            fd = archive.fileno()
            run_session(args, lambda c: c.export_snapshots(args.ids, fd, fmt=args.format))
            archive.seek(0)
            _unpack_layout(archive, staging)
        os.rename(staging, dest)
    except BaseException:
        fstree.remove_path(staging)
        dest.rmdir()
        raise


def _unpack_layout(archive: IO[bytes], dest: Path) -> None:
    """Unpack the daemon's OCI layout tar into the fresh, empty directory ``dest``.

    A layout holds only directories and regular files, so nothing else is accepted, and names
    stay below ``dest`` (``..`` is refused, a leading ``/`` dropped). With no symlink ever made
    there, no name can lead out. (``extractall(filter="data")`` would do much the same, but
    Debian 12's Python, 3.11.2, predates extraction filters.)

    Raises:
        SnapshotError: the archive is not a layout tar we can unpack.
    """
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            for member in tar:
                _unpack_member(tar, member, dest)
    except (tarfile.TarError, OSError, InvalidArchiveError) as exc:
        raise SnapshotError(f"export: unpacking the daemon's layout into {dest}: {exc}") from exc


def _unpack_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    path = dest.joinpath(*parse_member_path(member.name))
    if member.isdir():
        path.mkdir(parents=True, exist_ok=True)
        return
    source = tar.extractfile(member) if member.isreg() else None
    if source is None:
        raise InvalidArchiveError(
            f"archive member {member.name!r}: not a directory or a regular file",
            details={"entry": member.name},
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with source, path.open("xb") as out:  # O_EXCL: a name met twice is refused
        shutil.copyfileobj(source, out)


def _export(args: argparse.Namespace) -> int:
    dest: Path = args.output
    if ExportFormat(args.format) is ExportFormat.OCI and dest.suffix != TAR_SUFFIX:
        _export_layout_dir(args, dest)
    else:
        _export_file(args, dest)
    print(f"exported {len(args.ids)} snapshot(s) to {dest} ({args.format})")
    return 0


# --- mount, unmount (local) ----------------------------------------------------------------------


def _mount(args: argparse.Namespace) -> int:
    with Store(args.state_dir) as store:
        info = store.mount_view(args.id, args.dir)
    print(f"mounted {info.short_id} ({info.platform}) read-only at {args.dir}")
    return 0


def _unmount(args: argparse.Namespace) -> int:
    with Store(args.state_dir) as store:
        store.unmount_view(args.dir)
    return 0
