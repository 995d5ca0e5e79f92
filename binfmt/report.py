"""Pure. The platform report: which platforms this host runs natively, which it emulates (by
which binfmt_misc entry and interpreter) and which it cannot run, and why; decided from facts
gathered by :mod:`binfmt.detect` (probe results, entries, interpreter checks).

Theory of operation. Every Linux platform of the QEMU table, plus the host's own, ends up in
exactly one of three places:

=============  =================================================================================
native         the host platform, and each candidate (``compatible(host, p)``) whose probe
               image the kernel ran itself in a namespace with an empty binfmt_misc instance;
               without that probe (kernel < 6.7), the compatibility table alone (and
               ``native_source`` says so)
emulated       not native, and its probe image ran in an empty root through a binfmt_misc
               entry: ``Emulator`` names the entry and the interpreter ``/proc/PID/exe`` showed
unavailable    everything else, with the reason: binfmt_misc not mounted or disabled, no entry
               claims it, the entry is disabled, its interpreter is missing, or the probe failed
=============  =================================================================================

A requested platform ``r`` runs natively when ``compatible(n, r)`` holds for some ``n`` in
``native`` (``native`` holds the host platform, e.g. ``linux/amd64/v3``, so lower levels need
no entries of their own).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from binfmt.claims import claimed_platforms
from binfmt.entry import BinfmtEntry, BinfmtFlag
from binfmt.platform import Platform, compatible, normalize
from runtimed.errors import InvalidParamsError, Json, PlatformError

NATIVE_BY_PROBE: Final = "probe"
NATIVE_BY_TABLE: Final = "compatibility table"
DELETED_SUFFIX: Final = " (deleted)"


@dataclass(frozen=True, slots=True, kw_only=True)
class Emulator:
    """How an emulated platform runs: the binfmt_misc entry and the interpreter it runs."""

    entry: str
    interpreter: str
    flags: str

    def to_json(self) -> dict[str, Json]:
        return {"entry": self.entry, "interpreter": self.interpreter, "flags": self.flags}

    @classmethod
    def from_json(cls, obj: Json, *, where: str = "emulator") -> Emulator:
        """Raises:
        InvalidParamsError: a field is missing or not a string.
        """
        data = _object(obj, where)
        return cls(
            entry=_string(data, "entry", where),
            interpreter=_string(data, "interpreter", where),
            flags=_string(data, "flags", where),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlatformReport:
    """Native, emulated and unavailable platforms of this host (see the module docstring)."""

    host: Platform
    native: frozenset[Platform]
    native_source: str
    emulated: Mapping[Platform, Emulator] = field(default_factory=dict)
    unavailable: Mapping[Platform, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "emulated", MappingProxyType(dict(self.emulated)))
        object.__setattr__(self, "unavailable", MappingProxyType(dict(self.unavailable)))

    def runs_natively(self, requested: Platform) -> bool:
        """Whether ``requested`` runs without emulation on this host."""
        return any(compatible(native, requested) for native in self.native)

    def to_json(self) -> dict[str, Json]:
        return {
            "host": str(self.host),
            "native": [str(p) for p in sorted(self.native)],
            "native_source": self.native_source,
            "emulated": {str(p): e.to_json() for p, e in sorted(self.emulated.items())},
            "unavailable": {str(p): why for p, why in sorted(self.unavailable.items())},
        }

    @classmethod
    def from_json(cls, obj: Json) -> PlatformReport:
        """Raises:
        InvalidParamsError: naming the field that is missing or malformed.
        """
        data = _object(obj, "report")
        native = data.get("native")
        if not isinstance(native, list):
            raise _invalid("report.native", "a list of platforms")
        emulated = _object(data.get("emulated"), "report.emulated")
        unavailable = _object(data.get("unavailable"), "report.unavailable")
        reasons: dict[Platform, str] = {}
        for key, why in unavailable.items():
            if not isinstance(why, str):
                raise _invalid(f"report.unavailable.{key}", "a string")
            reasons[_platform(key, f"report.unavailable.{key}")] = why
        return cls(
            host=_platform(data.get("host"), "report.host"),
            native=frozenset(_platform(p, "report.native") for p in native),
            native_source=_string(data, "native_source", "report"),
            emulated={
                _platform(key, f"report.emulated.{key}"): Emulator.from_json(
                    value, where=f"report.emulated.{key}"
                )
                for key, value in emulated.items()
            },
            unavailable=reasons,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """One probe image run by ``binfmt.helper``: did it run, and what ran it.

    ``exe`` is ``/proc/PID/exe`` while it ran: the probe itself when native, else the
    interpreter (with `` (deleted)`` when the pinned file was replaced since registration);
    ``exe_id`` is that file's ``(st_dev, st_ino)``.
    """

    platform: Platform
    ran: bool
    native: bool
    exe: str | None = None
    exe_id: tuple[int, int] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EntryFacts:
    """An entry with what :mod:`binfmt.detect` found out about its interpreter."""

    entry: BinfmtEntry
    interpreter_exists: bool
    interpreter_executable: bool = False
    # None: not an ELF file we could read (a script, unreadable).
    interpreter_static: bool | None = None
    interpreter_noexec: bool = False
    # The file behind the path today, resolved (symlinks followed), and its (st_dev, st_ino).
    interpreter_realpath: str | None = None
    interpreter_id: tuple[int, int] | None = None


def native_candidates(host: Platform, platforms: Iterable[Platform]) -> tuple[Platform, ...]:
    """The host and each of ``platforms`` it may run natively, one per architecture, in order.

    These are the probes worth running: the compatibility table says which platforms the
    kernel could run, the probe whether it really does (amd64 without IA32 emulation cannot
    run 386, arm64 without AArch32 cannot run arm).
    """
    seen: dict[str, Platform] = {host.architecture: host}
    for platform in platforms:
        if compatible(host, platform) and platform.architecture not in seen:
            seen[platform.architecture] = platform
    return tuple(seen.values())


def decide_native(
    host: Platform,
    candidates: Sequence[Platform],
    probes: Sequence[ProbeResult] | None,
    *,
    why_no_probe: str = "",
) -> tuple[frozenset[Platform], str]:
    """The native set and how it was decided, from the native probe's results (or None).

    The host platform is always native (this code runs on it).
    """
    if probes is None:
        source = NATIVE_BY_TABLE + (f" ({why_no_probe})" if why_no_probe else "")
        return frozenset({host, *candidates}), source
    ran = {p.platform for p in probes if p.ran and p.native}
    return frozenset({host} | {c for c in candidates if c in ran}), NATIVE_BY_PROBE


def _interpreter_of(probe: ProbeResult, claiming: Sequence[EntryFacts]) -> EntryFacts | None:
    """The claiming entry whose interpreter is the file the probe showed running."""
    for facts in claiming:
        if probe.exe_id is not None and probe.exe_id == facts.interpreter_id:
            return facts
    shown = (probe.exe or "").removesuffix(DELETED_SUFFIX)
    for facts in claiming:
        if shown in (facts.entry.interpreter, facts.interpreter_realpath):
            return facts
    return claiming[0] if len(claiming) == 1 else None


def unavailable_reason(platform: Platform, claiming: Sequence[EntryFacts]) -> str:
    """Why a platform whose probe did not run through any entry is unavailable."""
    if not claiming:
        return "no binfmt_misc entry claims it"
    enabled = [f for f in claiming if f.entry.enabled]
    if not enabled:
        names = ", ".join(f.entry.name for f in claiming)
        return f"entry {names} is disabled"
    missing = [
        f
        for f in enabled
        if not f.interpreter_exists and BinfmtFlag.FIX_BINARY not in f.entry.flags
    ]
    if len(missing) == len(enabled):
        names = ", ".join(f"{f.entry.name} ({f.entry.interpreter})" for f in missing)
        return f"interpreter missing: {names}"
    return ""


def build_report(
    *,
    host: Platform,
    native: frozenset[Platform],
    native_source: str,
    platforms: Iterable[Platform],
    entries: Sequence[EntryFacts],
    probes: Sequence[ProbeResult],
    binfmt_problem: str | None = None,
) -> PlatformReport:
    """Sort every platform into native, emulated or unavailable (see the module docstring).

    Args:
        host: the host platform.
        native: from :func:`decide_native`.
        native_source: how ``native`` was decided.
        platforms: every platform to place (the QEMU table's).
        entries: every binfmt_misc entry with its interpreter facts.
        probes: the emulated probe's results (probe images run in an empty root).
        binfmt_problem: why no entry can work at all (not mounted, disabled), or None.
    """
    by_platform = {normalize(p.platform): p for p in probes}
    # Matching an entry against every QEMU target is the costly part: once per entry.
    claims = [(f, claimed_platforms(f.entry)) for f in entries]
    emulated: dict[Platform, Emulator] = {}
    unavailable: dict[Platform, str] = {}
    for platform in dict.fromkeys(normalize(p) for p in platforms):
        if any(compatible(n, platform) for n in native):
            continue
        claiming = [f for f, claimed in claims if platform in claimed]
        probe = by_platform.get(platform)
        if binfmt_problem is not None:
            unavailable[platform] = binfmt_problem
        elif probe is not None and probe.ran and not probe.native:
            enabled = [f for f in claiming if f.entry.enabled]
            facts = _interpreter_of(probe, enabled)
            emulated[platform] = Emulator(
                entry=facts.entry.name if facts else "?",
                interpreter=probe.exe or "?",
                flags=facts.entry.flags_text if facts else "",
            )
        else:
            reason = unavailable_reason(platform, claiming)
            if not reason and probe is None:
                reason = "no probe image to prove its entry works"
            elif not reason and probe is not None:
                reason = f"probe failed: {probe.error}"
                unpinned = [f for f in claiming if BinfmtFlag.FIX_BINARY not in f.entry.flags]
                if unpinned and probe.error == "exec: ENOENT":
                    # Without F the kernel opens the interpreter inside the probe's empty root.
                    reason += " (no F flag: the interpreter is looked up inside the root)"
            unavailable[platform] = reason
    return PlatformReport(
        host=host,
        native=native,
        native_source=native_source,
        emulated=emulated,
        unavailable=unavailable,
    )


def _invalid(name: str, wanted: str) -> InvalidParamsError:
    return InvalidParamsError(
        f"invalid parameter {name}: must be {wanted}", details={"parameter": name}
    )


def _object(obj: Json, name: str) -> dict[str, Json]:
    if not isinstance(obj, dict):
        raise _invalid(name, "an object")
    return obj


def _string(data: Mapping[str, Json], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise _invalid(f"{where}.{key}", "a string")
    return value


def _platform(value: Json, name: str) -> Platform:
    if not isinstance(value, str) or value.count("/") not in (1, 2):
        raise _invalid(name, "a platform os/arch[/variant]")
    try:
        return normalize(Platform(*value.split("/")))
    except PlatformError as exc:
        raise _invalid(name, f"a platform os/arch[/variant] ({exc.message})") from exc
