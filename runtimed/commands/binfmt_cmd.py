"""IO: ``runtimectl binfmt install|uninstall|enable|disable|status``, ``runtimectl check-binfmt``
and ``runtimectl platforms``: binfmt_misc handlers and what this host runs.

``platforms`` asks the daemon (``--socket``; ``--embedded`` starts one in this process that
reads ``--binfmt-misc``): the daemon's report is what its execs decide from. ``check-binfmt``
diagnoses the binfmt_misc at ``--binfmt-misc`` locally, so it works when no daemon runs (or
cannot start); ``--remote`` asks the daemon for its diagnosis instead. The ``binfmt``
subcommands are operator tools that work on ``--binfmt-misc`` directly, without a daemon (a
running daemon sees their changes at its next probe, or on SIGHUP); the daemon's own
InstallEmulators/UninstallEmulators serve its clients and its configured emulator set.

``binfmt`` subcommands mount binfmt_misc at ``--binfmt-misc`` if it is absent; ``check-binfmt``
and ``platforms`` only read. Exit status: 0 ok, 1 check-binfmt found problems, 2 usage, and the
error areas of :class:`runtimed.errors.ExitArea` otherwise (6: a native platform refused).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from binfmt import detect, installer, kernel
from binfmt.claims import claimed_platforms
from binfmt.diagnose import Diagnosis, Severity, diagnose
from binfmt.install import ActionKind, PlatformChange, is_ours
from binfmt.platform import Platform, normalize, parse_platform
from binfmt.qemu import QemuTarget, targets_for_platform
from binfmt.report import PlatformReport
from runtimed.commands.options import add_binfmt_misc_argument
from runtimed.errors import ExitArea, InvalidParamsError, Json, RpcError, UsageError
from runtimed.session import add_session_arguments, run_session

CREDENTIAL_WARNING = (
    "warning: the C flag makes setuid foreign binaries run QEMU with their privileges; "
    "any QEMU bug is then a privilege escalation. Use it only on trusted build hosts."
)


def _common(parser: argparse.ArgumentParser) -> None:
    add_binfmt_misc_argument(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for tools")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``binfmt``, ``check-binfmt`` and ``platforms`` to ``runtimectl``."""
    group = sub.add_parser("binfmt", help="manage QEMU handlers in binfmt_misc")
    actions = group.add_subparsers(dest="binfmt_command", required=True, metavar="ACTION")

    install = actions.add_parser("install", help="register QEMU handlers (always flag F)")
    install.add_argument("platforms", nargs="+", metavar="PLATFORM", help="e.g. arm64, or all")
    install.add_argument("--force", action="store_true", help="replace conflicting entries")
    install.add_argument(
        "--credential", action="store_true", help="add the C flag (security risk, see docs)"
    )
    install.add_argument(
        "--persist", action="store_true", help="also write a binfmt.d(5) drop-in for boot"
    )
    install.add_argument(
        "--drop-in", type=Path, default=installer.DEFAULT_DROP_IN, help="(default: %(default)s)"
    )
    _common(install)
    install.set_defaults(func=_install)

    for name, helptext in (
        ("uninstall", "remove our handlers (others' only with --force)"),
        ("enable", "enable handlers"),
        ("disable", "disable handlers"),
    ):
        cmd = actions.add_parser(name, help=helptext)
        cmd.add_argument("platforms", nargs="+", metavar="PLATFORM", help="e.g. arm64, or all")
        cmd.add_argument("--force", action="store_true", help="also entries of other tools")
        if name == "uninstall":
            cmd.add_argument(
                "--persist", action="store_true", help="also update the binfmt.d drop-in"
            )
            cmd.add_argument("--drop-in", type=Path, default=installer.DEFAULT_DROP_IN)
        _common(cmd)
        cmd.set_defaults(func=_toggle, action_kind=ActionKind(name.replace("uninstall", "remove")))

    status = actions.add_parser("status", help="list every entry and what it claims")
    _common(status)
    status.set_defaults(func=_status)

    check = sub.add_parser("check-binfmt", help="diagnose binfmt_misc (read-only)")
    _common(check)
    check.add_argument(
        "--remote",
        action="store_true",
        help="ask the daemon (--socket, or --embedded) for its diagnosis instead",
    )
    add_session_arguments(check)
    check.set_defaults(func=_check)

    platforms = sub.add_parser(
        "platforms", help="native, emulated and unavailable platforms (the daemon's report)"
    )
    _common(platforms)
    add_session_arguments(platforms)
    platforms.set_defaults(func=_platforms)


def _emit(args: argparse.Namespace, data: dict[str, Json], text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(text)


def _targets(names: Sequence[str], host: Platform) -> list[QemuTarget] | None:
    """The QEMU targets (rules) of the platforms named, or None for ``all``.

    Raises:
        UsageError: ``all`` mixed with platforms.
        PlatformError: a platform that does not parse.
        UnsupportedPlatformError: a platform QEMU cannot emulate.
    """
    if "all" in names:
        if len(names) > 1:
            raise UsageError("'all' cannot be combined with platforms")
        return None
    targets = (targets_for_platform(parse_platform(name, host=host)) for name in names)
    return list(dict.fromkeys(t for group in targets for t in group))


def _install(args: argparse.Namespace) -> int:
    path: Path = args.binfmt_misc
    kernel.ensure_mounted(path)
    if args.credential:
        print(CREDENTIAL_WARNING, file=sys.stderr)
    result = installer.install(
        path,
        _targets(args.platforms, detect.host_platform()),
        force=args.force,
        credential=args.credential,
    )
    drop_in = installer.write_drop_in(args.drop_in, path) if args.persist else None
    data = result.to_json()
    data["drop_in"] = str(drop_in) if drop_in else None
    lines = [_change_line(c) for c in result.plan.changes]
    lines += [f"{p:<22} skipped: {why}" for p, why in result.skipped]
    if drop_in:
        lines.append(f"wrote {drop_in}: systemd-binfmt registers these handlers at boot")
    _emit(args, data, "\n".join(lines) or "nothing to do")
    return 0


def _change_line(change: PlatformChange) -> str:
    line = f"{change.platform!s:<22} {change.outcome:<10} {change.entry}"
    if change.note:
        line += f" ({change.note})"
    for before in change.previous:
        if before.entry.name != change.entry or before.reasons:
            why = "; ".join(before.reasons) or "as it was"
            line += f"\n{'':<22} was: {before.entry.name} [{why}]"
    return line


def _toggle(args: argparse.Namespace) -> int:
    path: Path = args.binfmt_misc
    kernel.ensure_mounted(path)
    chosen = _targets(args.platforms, detect.host_platform())
    platforms = None if chosen is None else [normalize(t.platform) for t in chosen]
    plan = installer.toggle(path, args.action_kind, platforms, force=args.force)
    drop_in = None
    if getattr(args, "persist", False):
        drop_in = installer.write_drop_in(args.drop_in, path)
    data = plan.to_json()
    data["drop_in"] = str(drop_in) if drop_in else None
    _emit(args, data, "\n".join(_change_line(c) for c in plan.changes) or "nothing to do")
    return 0


def _status(args: argparse.Namespace) -> int:
    path: Path = args.binfmt_misc
    kernel.ensure_mounted(path)
    state = kernel.read_state(path)
    rows: list[Json] = []
    lines = [f"binfmt_misc at {path}: {'enabled' if state.enabled else 'DISABLED'}"]
    for entry in state.entries:
        claims = sorted(str(p) for p in claimed_platforms(entry))
        owner = "runtimed" if is_ours(entry.name) else "other"
        rows.append(
            {
                "name": entry.name,
                "ours": is_ours(entry.name),
                "enabled": entry.enabled,
                "flags": entry.flags_text,
                "interpreter": entry.interpreter,
                "claims": list[Json](claims),
            }
        )
        lines.append(
            f"{entry.name:<26} {'enabled' if entry.enabled else 'disabled':<9} "
            f"{entry.flags_text or '-':<5} {owner:<9} {', '.join(claims) or '(no QEMU platform)'}"
            f"  {entry.interpreter}"
        )
    data: dict[str, Json] = {"path": str(path), "enabled": state.enabled, "entries": rows}
    _emit(args, data, "\n".join(lines))
    return 0


def _report_lines(report: PlatformReport) -> list[str]:
    lines = [f"host: {report.host}  (native set decided by {report.native_source})"]
    for platform in sorted(report.native):
        lines.append(f"{platform!s:<22} native")
    for platform, emulator in sorted(report.emulated.items()):
        lines.append(
            f"{platform!s:<22} emulated   {emulator.entry} -> {emulator.interpreter} "
            f"[{emulator.flags}]"
        )
    by_reason: dict[str, list[str]] = {}
    for platform, why in sorted(report.unavailable.items()):
        by_reason.setdefault(why, []).append(str(platform))
    for why, platforms in by_reason.items():
        lines.append(f"unavailable ({why}):")
        lines += textwrap.wrap(
            ", ".join(platforms), width=96, initial_indent="  ", subsequent_indent="  "
        )
    return lines


def _report_from_json(obj: Json) -> PlatformReport:
    """Raises: RpcError: the daemon's report does not parse."""
    try:
        return PlatformReport.from_json(obj)
    except InvalidParamsError as exc:
        raise RpcError(f"the daemon sent an invalid platform report: {exc.message}") from exc


def _platforms(args: argparse.Namespace) -> int:
    data = run_session(args, lambda client: client.get_platforms())
    _emit(args, data, "\n".join(_report_lines(_report_from_json(data))))
    return 0


def _diagnosis_text(diagnosis: Diagnosis) -> str:
    lines: list[str] = []
    for finding in diagnosis.findings:
        lines.append(f"{finding.severity.upper():<8} {finding.check}: {finding.message}")
        if finding.platforms:
            lines.append(f"{'':<9}platforms: {', '.join(finding.platforms)}")
        if finding.fix:
            lines.append(f"{'':<9}fix: {finding.fix}")
    problems = sum(f.severity is not Severity.INFO for f in diagnosis.findings)
    lines.append("")
    lines += _report_lines(diagnosis.report)
    lines.append("")
    lines.append(f"{problems} problem(s) found" if problems else "binfmt_misc is fine")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    if args.remote:
        data = run_session(args, lambda client: client.check_binfmt())
        try:
            diagnosis = Diagnosis.from_json(data)
        except InvalidParamsError as exc:
            raise RpcError(f"the daemon sent an invalid diagnosis: {exc.message}") from exc
    else:
        facts, report = detect.gather_facts(args.binfmt_misc)
        diagnosis = diagnose(facts, report)
    _emit(args, diagnosis.to_json(), _diagnosis_text(diagnosis))
    return int(ExitArea.FINDINGS if diagnosis.problems else ExitArea.OK)
