"""IO: ``runtimectl snapshot import|ls|inspect|rm|gc|export|mount|unmount``: the rootfs
snapshot store.

Until the daemon's protocol carries snapshot calls, every subcommand needs ``--embedded``: it
opens the store at ``--state-dir`` in this process (as root, like the daemon would). Once the
daemon routes them, ``--embedded`` will start a daemon in-process for the one command, so
scripts keep working unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from runtimed.errors import DaemonUnavailableError, Json
from sandbox.store import DEFAULT_STATE_DIR, ExportFormat, SnapshotInfo, Store

EMBEDDED_HELP = (
    "run against the store in this process (needs root); required until the daemon's "
    "protocol carries snapshot calls, after which it starts a daemon in-process for the "
    "one command"
)


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="the store's state directory (default: %(default)s)",
    )
    parser.add_argument("--embedded", action="store_true", help=EMBEDDED_HELP)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON for tools")


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
    _common(imp)
    imp.set_defaults(func=_import)

    ls = actions.add_parser("ls", help="list snapshots")
    _common(ls)
    ls.set_defaults(func=_ls)

    inspect = actions.add_parser("inspect", help="show a snapshot: platform, layers, config")
    inspect.add_argument("id", metavar="ID")
    _common(inspect)
    inspect.set_defaults(func=_inspect)

    rm = actions.add_parser("rm", help="remove snapshots (layers others use stay)")
    rm.add_argument("ids", nargs="+", metavar="ID")
    _common(rm)
    rm.set_defaults(func=_rm)

    gc = actions.add_parser("gc", help="delete layers no snapshot uses")
    _common(gc)
    gc.set_defaults(func=_gc)

    export = actions.add_parser(
        "export", help="write snapshots as a rootfs tarball or a (multi-platform) OCI layout"
    )
    export.add_argument("ids", nargs="+", metavar="ID")
    export.add_argument("--format", choices=[f.value for f in ExportFormat], default="oci")
    export.add_argument("-o", "--output", type=Path, required=True, metavar="PATH")
    _common(export, json_flag=False)
    export.set_defaults(func=_export)

    mount = actions.add_parser("mount", help="mount a snapshot read-only at DIR (overlay)")
    mount.add_argument("id", metavar="ID")
    mount.add_argument("dir", type=Path, metavar="DIR")
    _common(mount, json_flag=False)
    mount.set_defaults(func=_mount)

    unmount = actions.add_parser("unmount", help="unmount a view made by snapshot mount")
    unmount.add_argument("dir", type=Path, metavar="DIR")
    _common(unmount, json_flag=False)
    unmount.set_defaults(func=_unmount)


def _store(args: argparse.Namespace) -> Store:
    if not args.embedded:
        raise DaemonUnavailableError(
            "the daemon does not serve snapshot calls yet",
            hint="pass --embedded to use the store in this process (as root)",
        )
    return Store(args.state_dir)


def _print_json(value: Json) -> None:
    print(json.dumps(value, indent=2))


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class _Progress:
    """One self-overwriting status line on a terminal's stderr; silent otherwise."""

    def __init__(self) -> None:
        self.active = sys.stderr.isatty()
        self._shown = False

    def __call__(self, line: str) -> None:
        if self.active:
            sys.stderr.write(f"\r\x1b[K{line[:120]}")
            sys.stderr.flush()
            self._shown = True

    def done(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _import(args: argparse.Namespace) -> int:
    progress = _Progress()
    with _store(args) as store:
        try:
            info = store.import_source(args.source, platform=args.platform, progress=progress)
        finally:
            progress.done()
    if args.json:
        _print_json(info.to_json())
    else:
        print(info.id)
        print(f"platform: {info.platform} ({info.platform_source})")
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _store(args) as store:
        infos = store.list()
    if args.json:
        _print_json([info.to_json() for info in infos])
        return 0
    print(f"{'ID':<12}  {'PLATFORM':<16}  {'SIZE':>10}  LAYERS  {'CREATED':<25}  SOURCE")
    for info in infos:
        print(
            f"{info.short_id:<12}  {info.platform!s:<16}  {_human(info.size):>10}  "
            f"{len(info.layers):>6}  {info.created:<25}  {info.source}"
        )
    return 0


def _describe(info: SnapshotInfo) -> str:
    config = info.config
    lines = [
        f"id:        {info.id}",
        f"platform:  {info.platform} ({info.platform_source})",
        f"created:   {info.created}",
        f"source:    {info.source}",
        f"size:      {_human(info.size)}",
        f"env:       {json.dumps(list(config.env))}",
        f"entrypoint: {json.dumps(list(config.entrypoint))}",
        f"cmd:       {json.dumps(list(config.cmd))}",
        f"workdir:   {config.working_dir or '/'}",
        f"user:      {config.user or '(root)'}",
        f"layers:    {len(info.layers)}",
    ]
    lines += [
        f"  {layer.chain_id}  {_human(layer.size):>10}  diff {layer.diff_id[:19]}"
        for layer in info.layers
    ]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    with _store(args) as store:
        info = store.get(args.id)
    if args.json:
        _print_json(info.to_json())
    else:
        print(_describe(info))
    return 0


def _rm(args: argparse.Namespace) -> int:
    removed: list[Json] = []
    with _store(args) as store:
        for ref in args.ids:
            removed.append(store.remove(ref).id)
            if not args.json:
                print(f"removed {removed[-1]}")
    if args.json:
        _print_json(removed)
    return 0


def _gc(args: argparse.Namespace) -> int:
    with _store(args) as store:
        removed = store.gc()
    if args.json:
        _print_json(list(removed))
    else:
        print(f"removed {len(removed)} unused layer(s)")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.export(args.ids, args.output, fmt=ExportFormat(args.format))
    print(f"exported {len(args.ids)} snapshot(s) to {args.output} ({args.format})")
    return 0


def _mount(args: argparse.Namespace) -> int:
    with _store(args) as store:
        info = store.mount_view(args.id, args.dir)
    print(f"mounted {info.short_id} ({info.platform}) read-only at {args.dir}")
    return 0


def _unmount(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.unmount_view(args.dir)
    return 0
