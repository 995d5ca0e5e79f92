"""Pure. Plans changes to binfmt_misc: desired handler entries x existing entries -> an ordered
list of actions (register, remove, enable, disable) plus a per-platform account of what was
there before; and the binfmt.d(5) drop-in for ``--persist``. :mod:`binfmt.installer` runs the
plan.

Rules (issue 2, STYLE.md §6):

- Our entries are named ``runtimed-<qemu target>``; flags are always F (the kernel opens the
  interpreter at registration, so the handler works inside chroots and containers), P when the
  interpreter supports preserve-argv0, C only when asked for.
- Never for the host's own architecture, nor for one the host runs natively: binfmt_misc is
  consulted before the native ELF loader, so such an entry would emulate native code.
- Idempotent: an existing entry equivalent to the desired one (same match, interpreter, F, P
  and C, enabled, interpreter intact) is kept, whatever its name.
- Any other entry claiming the platform (by name or by magic) conflicts. Ours are replaced
  freely; another tool's only with ``force``, else :class:`HandlerConflictError` and nothing
  changes. Replacing never leaves the platform without a handler: the kernel tries the newest
  entry first (``list_add`` at the head in ``fs/binfmt_misc.c``), so ours is registered before
  the old one is removed; when the old one has our name, ours goes in under a temporary name
  first.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

from binfmt.claims import claimed_platforms, claimed_targets
from binfmt.entry import BinfmtEntry, BinfmtFlag, BinfmtKind, format_register_line
from binfmt.platform import Platform, compatible, normalize
from binfmt.qemu import QemuTarget
from runtimed.errors import HandlerConflictError, Json, NativePlatformError

OUR_PREFIX: Final = "runtimed-"
# QEMU >= 6.0 reads AT_FLAGS, which Linux >= 5.12 sets (see supports_preserve_argv0).
QEMU_AT_FLAGS_VERSION: Final = (6, 0)
KERNEL_AT_FLAGS_VERSION: Final = (5, 12)
DEBIAN_P_WRAPPER_SUFFIX: Final = "-binfmt-P"
# Suffix of the temporary name used while replacing an entry that has our name.
TEMP_SUFFIX: Final = ".new"
DROP_IN_HEADER: Final = (
    "# Written by `runtimectl binfmt install --persist`: QEMU handlers with the F flag.\n"
    "# systemd-binfmt registers these at boot; see binfmt.d(5).\n"
)


def entry_name(target: QemuTarget) -> str:
    """The name of our entry for ``target`` (its qemu-binfmt-conf.sh name: unique, whereas
    linux/386 has two rules, i386 and i486)."""
    return OUR_PREFIX + target.name


def is_ours(name: str) -> bool:
    """Whether an entry name is one runtimed registers."""
    return name.startswith(OUR_PREFIX)


def desired_flags(*, preserve_argv0: bool, credential: bool) -> frozenset[BinfmtFlag]:
    """F always; P when the interpreter supports it; C only when asked for."""
    flags = {BinfmtFlag.FIX_BINARY}
    if preserve_argv0:
        flags.add(BinfmtFlag.PRESERVE_ARGV0)
    if credential:
        flags.add(BinfmtFlag.CREDENTIALS)
    return frozenset(flags)


def desired_entry(
    target: QemuTarget, interpreter: str, flags: frozenset[BinfmtFlag]
) -> BinfmtEntry:
    """Our entry for ``target`` run by ``interpreter``."""
    return BinfmtEntry(
        name=entry_name(target),
        kind=BinfmtKind.MAGIC,
        offset=0,
        magic=target.magic,
        mask=target.mask,
        interpreter=interpreter,
        flags=flags,
        enabled=True,
    )


def version_tuple(text: str) -> tuple[int, int] | None:
    """The first ``major.minor`` in a version string (``6.18.44-fc`` → (6, 18)), or None."""
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def supports_preserve_argv0(name: str, *, qemu_version: str, kernel_release: str) -> bool:
    """Whether the interpreter file called ``name`` handles the P flag.

    An interpreter must know that the kernel inserted the original argv[0]; two ways exist:

    - Debian's ``/usr/libexec/qemu-binfmt/<cpu>-binfmt-P`` names: a Debian patch makes QEMU
      expect the extra argument when started under that name (so such an entry *needs* P);
    - the kernel says so in ``AT_FLAGS`` (Linux 5.12, commit 2347961b11d4 "binfmt_misc: pass
      binfmt_misc flags to the interpreter"), which QEMU reads since 6.0 (commit 6e1c0d7b951e
      "linux-user: manage binfmt-misc preserve-arg[0] flag").

    Debian 12's QEMU 7.2 on a 6.x kernel qualifies either way (checked: ``exec -a uname
    busybox -m`` prints ``aarch64`` with P through plain ``qemu-aarch64-static``).

    Args:
        name: the interpreter's file name.
        qemu_version: its ``--version`` output ("qemu-aarch64 version 7.2.22 (Debian ...)").
        kernel_release: ``uname -r``.
    """
    if name.endswith(DEBIAN_P_WRAPPER_SUFFIX):
        return True
    qemu, linux = version_tuple(qemu_version), version_tuple(kernel_release)
    return (
        qemu is not None
        and linux is not None
        and qemu >= QEMU_AT_FLAGS_VERSION
        and linux >= KERNEL_AT_FLAGS_VERSION
    )


def native_refusal(
    platform: Platform, *, host: Platform, native: frozenset[Platform], native_source: str
) -> str | None:
    """Why no handler may be installed for ``platform`` on this host, or None."""
    if platform.architecture == host.architecture:
        return f"{platform} is the host's own architecture ({host})"
    runner = next((n for n in sorted(native) if compatible(n, platform)), None)
    if runner is not None:
        return f"the host runs {platform} natively (as {runner}, decided by {native_source})"
    return None


def require_foreign(
    platform: Platform, *, host: Platform, native: frozenset[Platform], native_source: str
) -> None:
    """Refuse a handler for a platform the host runs natively.

    Raises:
        NativePlatformError: naming why (the host's architecture, or the native probe).
    """
    why = native_refusal(platform, host=host, native=native, native_source=native_source)
    if why is not None:
        raise NativePlatformError(
            f"refusing a binfmt_misc handler for {platform}: {why}",
            details={"platform": str(platform), "host": str(host)},
            hint="binfmt_misc is consulted before the native loader: such a handler would "
            "emulate native programs",
        )


class ActionKind(enum.StrEnum):
    REGISTER = "register"
    REMOVE = "remove"
    ENABLE = "enable"
    DISABLE = "disable"


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    """One write to binfmt_misc: register ``entry``, or remove/enable/disable ``name``."""

    kind: ActionKind
    name: str
    entry: BinfmtEntry | None = None

    def describe(self) -> str:
        if self.entry is not None:
            return f"register {self.name}: {format_register_line(self.entry).decode()!r}"
        return f"{self.kind} {self.name}"


class Outcome(enum.StrEnum):
    KEPT = "kept"
    REGISTERED = "registered"
    REPLACED = "replaced"
    REMOVED = "removed"
    ENABLED = "enabled"
    DISABLED = "disabled"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True, kw_only=True)
class Previous:
    """An entry that was there before, and what was wrong with it (empty: nothing)."""

    entry: BinfmtEntry
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Json]:
        return {
            "name": self.entry.name,
            "line": format_register_line(self.entry).decode(),
            "enabled": self.entry.enabled,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformChange:
    """What a plan does for one platform, and the entries that were there before."""

    platform: Platform
    outcome: Outcome
    entry: str
    previous: tuple[Previous, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {
            "platform": str(self.platform),
            "outcome": str(self.outcome),
            "entry": self.entry,
            "previous": [p.to_json() for p in self.previous],
        }
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Ordered actions and the per-platform account of them."""

    changes: tuple[PlatformChange, ...]
    actions: tuple[Action, ...]

    def to_json(self) -> dict[str, Json]:
        return {
            "platforms": [c.to_json() for c in self.changes],
            "actions": [a.describe() for a in self.actions],
        }


def _matcher(entry: BinfmtEntry) -> tuple[object, ...]:
    """What decides which files an entry matches (magic bits under the mask only)."""
    mask = entry.mask or b"\xff" * len(entry.magic)
    magic = bytes(m & k for m, k in zip(entry.magic, mask, strict=True))
    return (entry.kind, entry.offset, magic, mask)


def conflict_reasons(
    existing: BinfmtEntry, desired: BinfmtEntry, *, broken: str | None = None
) -> tuple[str, ...]:
    """What makes ``existing`` differ from ``desired``; empty when they are equivalent.

    Args:
        existing: an entry that claims the same platform or has the same name.
        desired: the entry we want.
        broken: a problem with its interpreter found by detection (missing, replaced).
    """
    reasons: list[str] = []
    if not existing.enabled:
        reasons.append("disabled")
    if BinfmtFlag.FIX_BINARY not in existing.flags:
        reasons.append("no F flag: fails inside containers and chroots")
    if existing.interpreter != desired.interpreter:
        reasons.append(f"interpreter {existing.interpreter}, not {desired.interpreter}")
    if _matcher(existing) != _matcher(desired):
        reasons.append("different magic or mask")
    for flag in (BinfmtFlag.PRESERVE_ARGV0, BinfmtFlag.CREDENTIALS):
        if (flag in existing.flags) != (flag in desired.flags):
            state = "with" if flag in existing.flags else "without"
            reasons.append(f"{state} the {flag} flag ({flag.name.lower().replace('_', '-')})")
    if broken:
        reasons.append(broken)
    return tuple(reasons)


def _claiming(
    target: QemuTarget, desired: BinfmtEntry, existing: Sequence[BinfmtEntry]
) -> list[BinfmtEntry]:
    return [e for e in existing if e.name == desired.name or target in claimed_targets(e)]


def plan_install(
    wanted: Sequence[tuple[QemuTarget, BinfmtEntry]],
    existing: Sequence[BinfmtEntry],
    *,
    broken: Mapping[str, str],
    force: bool,
) -> Plan:
    """Plan the registration of ``wanted`` (QEMU target, desired entry) over ``existing``.

    An existing entry conflicts when it has the desired name or claims the same target (its
    magic and mask match the target's executables).

    Args:
        wanted: targets already checked against :func:`native_refusal`, with our entry.
        existing: every entry of the instance.
        broken: entry name -> what is wrong with its interpreter (missing, replaced).
        force: replace entries of other tools that conflict.

    Raises:
        HandlerConflictError: entries of other tools conflict and ``force`` is not set; its
            details list each with its reasons. Nothing is planned then.
    """
    changes: list[PlatformChange] = []
    actions: list[Action] = []
    refused: list[str] = []
    taken = {e.name for e in existing}
    for target, desired in wanted:
        platform = normalize(target.platform)
        claiming = _claiming(target, desired, existing)
        reasons = {
            e.name: conflict_reasons(e, desired, broken=broken.get(e.name)) for e in claiming
        }
        keep = next((e for e in claiming if not reasons[e.name]), None)
        stale = [e for e in claiming if e is not keep]
        previous = tuple(Previous(entry=e, reasons=reasons[e.name]) for e in claiming)
        foreign = [e for e in stale if not is_ours(e.name)]
        if foreign and not force:
            refused.extend(f"{platform}: {e.name} ({'; '.join(reasons[e.name])})" for e in foreign)
            continue
        handler = keep.name if keep is not None else desired.name
        if keep is None:
            actions.extend(_register(desired, taken))
        # Without a kept entry, _register already swapped out a stale one of our name.
        actions.extend(
            Action(kind=ActionKind.REMOVE, name=e.name)
            for e in stale
            if keep is not None or e.name != desired.name
        )
        if keep is None and not stale:
            outcome = Outcome.REGISTERED
        elif stale:
            outcome = Outcome.REPLACED
        else:
            outcome = Outcome.KEPT
        changes.append(
            PlatformChange(platform=platform, outcome=outcome, entry=handler, previous=previous)
        )
    if refused:
        raise HandlerConflictError(
            "conflicting binfmt_misc entries of other tools: " + "; ".join(refused),
            details={"conflicts": list(refused)},
            hint="add --force to replace them (the report shows what was there before)",
        )
    return Plan(changes=tuple(changes), actions=tuple(actions))


def _register(desired: BinfmtEntry, taken: set[str]) -> list[Action]:
    """Register ``desired``; if its name is taken, swap it in under a temporary name first."""
    register = Action(kind=ActionKind.REGISTER, name=desired.name, entry=desired)
    if desired.name not in taken:
        return [register]
    temporary_name = desired.name + TEMP_SUFFIX
    while temporary_name in taken:
        temporary_name += TEMP_SUFFIX
    temporary = replace(desired, name=temporary_name)
    return [
        Action(kind=ActionKind.REGISTER, name=temporary.name, entry=temporary),
        Action(kind=ActionKind.REMOVE, name=desired.name),
        register,
        Action(kind=ActionKind.REMOVE, name=temporary.name),
    ]


def plan_toggle(
    kind: ActionKind,
    platforms: Sequence[Platform] | None,
    existing: Sequence[BinfmtEntry],
    *,
    force: bool,
) -> Plan:
    """Plan ``remove``/``enable``/``disable`` of the entries claiming ``platforms`` (None: all).

    Only our entries are touched unless ``force``; others are listed as unchanged with a note.
    """
    changes: list[PlatformChange] = []
    actions: list[Action] = []
    outcome = {
        ActionKind.REMOVE: Outcome.REMOVED,
        ActionKind.ENABLE: Outcome.ENABLED,
        ActionKind.DISABLE: Outcome.DISABLED,
    }[kind]
    for entry in existing:
        claims = sorted(claimed_platforms(entry))
        if not claims or (platforms is not None and not set(claims) & set(platforms)):
            continue
        before = (Previous(entry=entry),)
        if not (is_ours(entry.name) or force):
            note = "not registered by runtimed: add --force to change it"
            changes.extend(
                PlatformChange(
                    platform=p,
                    outcome=Outcome.UNCHANGED,
                    entry=entry.name,
                    previous=before,
                    note=note,
                )
                for p in claims
            )
            continue
        noop = (kind is ActionKind.ENABLE and entry.enabled) or (
            kind is ActionKind.DISABLE and not entry.enabled
        )
        if not noop:
            actions.append(Action(kind=kind, name=entry.name))
        changes.extend(
            PlatformChange(
                platform=p,
                outcome=Outcome.UNCHANGED if noop else outcome,
                entry=entry.name,
                previous=before,
            )
            for p in claims
        )
    return Plan(changes=tuple(changes), actions=tuple(actions))


def format_drop_in(entries: Sequence[BinfmtEntry]) -> str:
    """The binfmt.d(5) file registering ``entries`` (one register line each)."""
    lines = [format_register_line(e).decode() for e in sorted(entries, key=lambda e: e.name)]
    return DROP_IN_HEADER + "".join(line + "\n" for line in lines)
