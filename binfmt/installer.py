"""IO: installs, removes, enables and disables QEMU handlers on a binfmt_misc instance: gathers
what :mod:`binfmt.install` plans from (host, native set, interpreters, existing entries), runs
the plan one write per action in order, and writes the binfmt.d(5) drop-in for ``--persist``.
Shared by ``runtimectl binfmt`` and the daemon.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from binfmt import detect, kernel
from binfmt.install import (
    Action,
    ActionKind,
    Plan,
    desired_entry,
    desired_flags,
    format_drop_in,
    is_ours,
    native_refusal,
    plan_install,
    plan_toggle,
    require_foreign,
)
from binfmt.platform import Platform, normalize
from binfmt.qemu import QEMU_TARGETS, QemuTarget
from runtimed.errors import InterpreterNotFoundError, Json, RuntimedError

log = logging.getLogger(__name__)

DEFAULT_DROP_IN: Final = Path("/etc/binfmt.d/runtimed.conf")


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallResult:
    """What an install did, and the platforms ``all`` skipped (native, no interpreter)."""

    plan: Plan
    skipped: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Json]:
        data = self.plan.to_json()
        data["skipped"] = [{"platform": p, "why": why} for p, why in self.skipped]
        return data


def install(
    path: Path, targets: Sequence[QemuTarget] | None, *, force: bool, credential: bool
) -> InstallResult:
    """Register our handlers for ``targets`` (None: every QEMU target this host can use).

    Named targets must be foreign and have a static interpreter; with None, the native ones
    and those without an interpreter are skipped and listed.

    Raises:
        NativePlatformError: a named target the host runs natively.
        InterpreterNotFoundError: a named target without a static QEMU interpreter.
        HandlerConflictError: entries of other tools conflict and ``force`` is not set.
        KernelError: a write failed (``details['done']`` lists what was done before).
    """
    host = detect.host_platform()
    native = detect.native_platforms(host)
    skipped: list[tuple[str, str]] = []
    wanted = []
    for target in targets if targets is not None else QEMU_TARGETS:
        platform = normalize(target.platform)
        if targets is not None:
            require_foreign(
                platform, host=host, native=native.platforms, native_source=native.source
            )
            interpreter = detect.find_interpreter(target)
        else:
            why = native_refusal(
                platform, host=host, native=native.platforms, native_source=native.source
            )
            if why is not None:
                skipped.append((str(platform), why))
                continue
            try:
                interpreter = detect.find_interpreter(target)
            except InterpreterNotFoundError as exc:
                skipped.append((str(platform), exc.message))
                continue
        flags = desired_flags(preserve_argv0=interpreter.preserve_argv0, credential=credential)
        wanted.append((target, desired_entry(target, str(interpreter.path), flags)))
    existing = kernel.read_state(path).entries
    broken = {
        e.name: f"interpreter {e.interpreter} is missing"
        for e in existing
        if not os.path.exists(e.interpreter)
    }
    plan = plan_install(wanted, existing, broken=broken, force=force)
    apply_plan(path, plan)
    return InstallResult(plan=plan, skipped=tuple(skipped))


def toggle(
    path: Path, kind: ActionKind, platforms: Sequence[Platform] | None, *, force: bool
) -> Plan:
    """Remove, enable or disable the entries claiming ``platforms`` (None: all); only ours
    unless ``force``.

    Raises:
        KernelError: a write failed (``details['done']`` lists what was done before).
    """
    plan = plan_toggle(kind, platforms, kernel.read_state(path).entries, force=force)
    apply_plan(path, plan)
    return plan


def _run(path: Path, action: Action) -> None:
    log.debug("binfmt_misc %s: %s", path, action.describe())
    if action.entry is not None:
        kernel.register(path, action.entry)
    elif action.kind is ActionKind.REMOVE:
        kernel.remove(path, action.name)
    else:
        kernel.set_enabled(path, action.name, action.kind is ActionKind.ENABLE)


def apply_plan(path: Path, plan: Plan) -> None:
    """Run every action of ``plan`` in order on the instance at ``path``.

    The plan orders registrations before removals, so a failure midway leaves each platform
    with a handler; the error then lists the steps already done.

    Raises:
        RuntimedError: the failing step's error (KernelError, HandlerConflictError, ...), with
            ``details['done']`` listing the actions that had been carried out.
    """
    done: list[str] = []
    for action in plan.actions:
        try:
            _run(path, action)
        except RuntimedError as exc:
            exc.details["done"] = list(done)
            exc.details["failed"] = action.describe()
            raise
        done.append(action.describe())


def write_drop_in(drop_in: Path, binfmt_misc: Path) -> Path | None:
    """Make ``drop_in`` register exactly our current entries at boot; remove it if none.

    Returns the path written, or None when it was removed (or there was nothing to write).

    Raises:
        KernelError: the file could not be written.
        BinfmtError: the instance could not be read.
    """
    ours = [e for e in kernel.read_state(binfmt_misc).entries if is_ours(e.name)]
    try:
        if not ours:
            drop_in.unlink(missing_ok=True)
            return None
        drop_in.parent.mkdir(parents=True, exist_ok=True)
        # Write a sibling and rename it over: systemd-binfmt never sees half a file.
        fd, temporary = tempfile.mkstemp(prefix=".runtimed-", dir=drop_in.parent)
        try:
            with os.fdopen(fd, "w") as file:
                file.write(format_drop_in(ours))
            os.chmod(temporary, 0o644)
            os.replace(temporary, drop_in)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise kernel.kernel_error(exc, syscall="write", path=drop_in, action="write") from exc
    log.info("wrote %s (%d entries)", drop_in, len(ours))
    return drop_in
