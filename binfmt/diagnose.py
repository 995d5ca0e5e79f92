"""Pure. ``runtimectl check-binfmt``'s judgement: facts about binfmt_misc, its entries, their
interpreters and the probes in, findings out, each with a severity, the platforms it affects
and the exact command that fixes it.

Checks, by stable id (the ``check`` field of a finding):

============================  ========  ===========================================================
binfmt_misc.unsupported       error     the kernel has no binfmt_misc filesystem
binfmt_misc.not-mounted       error     nothing (or not binfmt_misc) is mounted at the directory
binfmt_misc.disabled          error     the instance's global switch is off
entry.disabled                warning   an entry is disabled
entry.no-fix-binary           error     no F flag: the interpreter is looked up in the process's
                                        root at every exec, so it fails in containers and chroots
entry.credential              warning   C flag: setuid foreign binaries run QEMU with their
                                        privileges, so a QEMU bug becomes a privilege escalation
entry.interpreter-missing     error     the path is gone (warning with F: the kernel still holds
                                        the pinned file, until the entry is registered again)
entry.interpreter-not-exec    error     not executable
entry.interpreter-dynamic     error     has PT_INTERP: its loader and libraries must exist in
                                        every root it runs in, which foreign roots lack
entry.interpreter-noexec      error     on a noexec mount
entry.interpreter-replaced    warning   F pinned a file that has since been replaced (upgrade):
                                        the kernel still runs the old one
entry.claims-native           error     claims the host's or a natively run architecture
                                        (binfmt_misc is consulted before the native loader)
entry.misses-pie              error     matches ET_EXEC but not ET_DYN (PIE) executables
entry.wrong-machine           error     the interpreter emulates another CPU than the magic claims
platform.multiple-handlers    warning   several enabled entries claim one platform (the newest
                                        registered wins, which nobody can see)
platform.probe-failed         error     an entry claims the platform but its probe did not run
platform.none-emulated        warning   no foreign platform can run at all
kernel.per-userns-binfmt      info /    whether user namespaces get their own binfmt_misc
                              warning   instance (kernel >= 6.7), which the native probe needs
============================  ========  ===========================================================

Entry checks apply to entries that claim a QEMU target; others (Java, Wine, .pyc handlers)
are left alone. Errors and warnings are problems (exit status 1); info findings are not.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from binfmt.claims import claimed_platforms, claimed_targets, interpreter_cpu, misses_pie
from binfmt.entry import BinfmtFlag
from binfmt.platform import Platform, compatible
from binfmt.report import (
    DELETED_SUFFIX,
    EntryFacts,
    PlatformReport,
    ProbeResult,
    _invalid,
    _object,
    _string,
)
from runtimed.errors import Json

DEFAULT_BINFMT_MISC: Final = "/proc/sys/fs/binfmt_misc"


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One result of a check; ``fix`` is the exact command that fixes it (None: no command)."""

    check: str
    severity: Severity
    message: str
    platforms: tuple[str, ...] = ()
    entry: str | None = None
    fix: str | None = None

    def to_json(self) -> dict[str, Json]:
        return {
            "check": self.check,
            "severity": str(self.severity),
            "message": self.message,
            "platforms": list(self.platforms),
            "entry": self.entry,
            "fix": self.fix,
        }

    @classmethod
    def from_json(cls, obj: Json, *, where: str = "finding") -> Finding:
        """The finding :meth:`to_json` wrote.

        Raises:
            InvalidParamsError: naming the field that is missing or malformed.
        """
        data = _object(obj, where)
        severity = data.get("severity")
        if not isinstance(severity, str) or severity not in set(Severity):
            raise _invalid(f"{where}.severity", f"one of {', '.join(Severity)}")
        platforms = data.get("platforms", [])
        if not isinstance(platforms, list) or not all(isinstance(p, str) for p in platforms):
            raise _invalid(f"{where}.platforms", "a list of strings")
        entry, fix = data.get("entry"), data.get("fix")
        for key, value in (("entry", entry), ("fix", fix)):
            if value is not None and not isinstance(value, str):
                raise _invalid(f"{where}.{key}", "a string or null")
        return cls(
            check=_string(data, "check", where),
            severity=Severity(severity),
            message=_string(data, "message", where),
            platforms=tuple(str(p) for p in platforms),
            entry=None if entry is None else str(entry),
            fix=None if fix is None else str(fix),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BinfmtFacts:
    """Everything check-binfmt looked at; gathered by :mod:`binfmt.detect`."""

    binfmt_misc: str
    supported: bool
    mounted: bool
    enabled: bool
    entries: tuple[EntryFacts, ...]
    host: Platform
    native: frozenset[Platform]
    # None: not known (the native probe could not tell); the reason says why.
    per_userns_binfmt: bool | None
    per_userns_reason: str
    probes: tuple[ProbeResult, ...]
    qemu_installed: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnosis:
    findings: tuple[Finding, ...]
    report: PlatformReport

    @property
    def problems(self) -> bool:
        return any(f.severity is not Severity.INFO for f in self.findings)

    def to_json(self) -> dict[str, Json]:
        return {
            "ok": not self.problems,
            "findings": [f.to_json() for f in self.findings],
            "platforms": self.report.to_json(),
        }

    @classmethod
    def from_json(cls, obj: Json) -> Diagnosis:
        """The diagnosis :meth:`to_json` wrote (``ok`` follows from the findings).

        Raises:
            InvalidParamsError: naming the field that is missing or malformed.
        """
        data = _object(obj, "diagnosis")
        findings = data.get("findings")
        if not isinstance(findings, list):
            raise _invalid("diagnosis.findings", "a list of findings")
        return cls(
            findings=tuple(
                Finding.from_json(f, where=f"diagnosis.findings[{i}]")
                for i, f in enumerate(findings)
            ),
            report=PlatformReport.from_json(data.get("platforms")),
        )


def _cli(command: str, binfmt_misc: str) -> str:
    suffix = "" if binfmt_misc == DEFAULT_BINFMT_MISC else f" --binfmt-misc {binfmt_misc}"
    return f"runtimectl binfmt {command}{suffix}"


def _names(platforms: Iterable[Platform]) -> tuple[str, ...]:
    return tuple(str(p) for p in sorted(platforms))


def diagnose(facts: BinfmtFacts, report: PlatformReport) -> Diagnosis:
    """All findings for ``facts``, most basic first (see the module docstring)."""
    findings = _filesystem_findings(facts)
    if facts.supported and facts.mounted:
        for entry_facts in facts.entries:
            findings.extend(_entry_findings(facts, entry_facts))
        findings.extend(_platform_findings(facts, report))
    findings.append(_userns_finding(facts))
    return Diagnosis(findings=tuple(findings), report=report)


def _filesystem_findings(facts: BinfmtFacts) -> list[Finding]:
    where = facts.binfmt_misc
    if not facts.supported:
        return [
            Finding(
                check="binfmt_misc.unsupported",
                severity=Severity.ERROR,
                message="the kernel has no binfmt_misc filesystem: no platform can be emulated",
                fix="modprobe binfmt_misc",
            )
        ]
    if not facts.mounted:
        return [
            Finding(
                check="binfmt_misc.not-mounted",
                severity=Severity.ERROR,
                message=f"binfmt_misc is not mounted on {where}",
                fix=f"mount -t binfmt_misc binfmt_misc {where}",
            )
        ]
    if not facts.enabled:
        return [
            Finding(
                check="binfmt_misc.disabled",
                severity=Severity.ERROR,
                message=f"binfmt_misc at {where} is disabled: no entry is used",
                fix=f"echo 1 > {where}/status",
            )
        ]
    return []


def _entry_finding(
    ef: EntryFacts, check: str, severity: Severity, message: str, fix: str
) -> Finding:
    return Finding(
        check=check,
        severity=severity,
        message=f"entry {ef.entry.name}: {message}",
        platforms=_names(claimed_platforms(ef.entry)),
        entry=ef.entry.name,
        fix=fix,
    )


def _reinstall(ef: EntryFacts, where: str) -> str:
    names = _names(claimed_platforms(ef.entry))
    return _cli(f"install --force {' '.join(names) or 'PLATFORM'}", where)


def _entry_findings(facts: BinfmtFacts, ef: EntryFacts) -> list[Finding]:
    entry, where = ef.entry, facts.binfmt_misc
    claims = sorted(claimed_platforms(entry))
    if not claims:
        # Not an emulator (Java, Wine, .pyc handlers): F and static interpreters are QEMU's
        # needs, not theirs; `runtimectl binfmt status` still lists them.
        return []
    reinstall = _reinstall(ef, where)
    remove = f"echo -1 > {where}/{entry.name}"
    out: list[Finding] = []
    if not entry.enabled:
        out.append(
            _entry_finding(
                ef,
                "entry.disabled",
                Severity.WARNING,
                "is disabled",
                f"echo 1 > {where}/{entry.name}",
            )
        )
    if BinfmtFlag.FIX_BINARY not in entry.flags:
        out.append(
            _entry_finding(
                ef,
                "entry.no-fix-binary",
                Severity.ERROR,
                "has no F flag: the interpreter is looked up inside each container or chroot, "
                "where it does not exist",
                reinstall,
            )
        )
    if BinfmtFlag.CREDENTIALS in entry.flags:
        out.append(
            _entry_finding(
                ef,
                "entry.credential",
                Severity.WARNING,
                "has the C flag: setuid foreign binaries run QEMU with their privileges, "
                "so a QEMU bug becomes a privilege escalation",
                reinstall,
            )
        )
    out.extend(_interpreter_findings(ef, reinstall))
    native = [p for p in claims if any(compatible(n, p) for n in facts.native)] or [
        p for p in claims if p.architecture == facts.host.architecture
    ]
    if native:
        out.append(
            _entry_finding(
                ef,
                "entry.claims-native",
                Severity.ERROR,
                f"claims {', '.join(_names(native))}, which the host runs natively: binfmt_misc "
                "is consulted before the native loader, so native programs would be emulated",
                remove,
            )
        )
    if any(misses_pie(entry, t) for t in claimed_targets(entry)):
        out.append(
            _entry_finding(
                ef,
                "entry.misses-pie",
                Severity.ERROR,
                "matches ET_EXEC but not ET_DYN executables: PIE programs (most of a modern "
                "distribution) are not emulated",
                reinstall,
            )
        )
    cpu = interpreter_cpu(entry.interpreter)
    if cpu is not None and cpu not in {t.cpu for t in claimed_targets(entry)}:
        out.append(
            _entry_finding(
                ef,
                "entry.wrong-machine",
                Severity.ERROR,
                f"its interpreter {entry.interpreter} emulates {cpu}, but its magic claims "
                f"{', '.join(_names(claims))}",
                f"{remove} && {reinstall}",
            )
        )
    return out


def _interpreter_findings(ef: EntryFacts, reinstall: str) -> list[Finding]:
    path = ef.entry.interpreter
    install = f"apt-get install qemu-user-static && {reinstall}"
    if not ef.interpreter_exists:
        pinned = BinfmtFlag.FIX_BINARY in ef.entry.flags
        return [
            _entry_finding(
                ef,
                "entry.interpreter-missing",
                Severity.WARNING if pinned else Severity.ERROR,
                f"interpreter {path} does not exist"
                + (" (the kernel still runs the file pinned at registration)" if pinned else ""),
                install,
            )
        ]
    out: list[Finding] = []
    if not ef.interpreter_executable:
        out.append(
            _entry_finding(
                ef,
                "entry.interpreter-not-exec",
                Severity.ERROR,
                f"{path} is not executable",
                install,
            )
        )
    if ef.interpreter_static is False:
        out.append(
            _entry_finding(
                ef,
                "entry.interpreter-dynamic",
                Severity.ERROR,
                f"{path} is dynamically linked: its loader and libraries must exist in every "
                "root it runs in, which foreign roots lack",
                install,
            )
        )
    if ef.interpreter_noexec:
        out.append(
            _entry_finding(
                ef,
                "entry.interpreter-noexec",
                Severity.ERROR,
                f"{path} is on a noexec mount",
                f'mount -o remount,exec "$(findmnt -n -o TARGET -T {path})"',
            )
        )
    return out


def interpreter_replaced(ef: EntryFacts, probes: Sequence[ProbeResult]) -> bool:
    """Whether a probe ran an old copy of ``ef``'s pinned interpreter: ``/proc/PID/exe``
    shows it deleted, or names the same path with another inode."""
    if BinfmtFlag.FIX_BINARY not in ef.entry.flags:
        return False
    paths = {ef.entry.interpreter, ef.interpreter_realpath}
    claims = claimed_platforms(ef.entry)
    for probe in probes:
        if probe.platform not in claims or probe.exe is None:
            continue
        shown = probe.exe.removesuffix(DELETED_SUFFIX)
        if shown not in paths:
            continue
        if probe.exe.endswith(DELETED_SUFFIX):
            return True
        if probe.exe_id is not None and ef.interpreter_id not in (None, probe.exe_id):
            return True
    return False


def _platform_findings(facts: BinfmtFacts, report: PlatformReport) -> list[Finding]:
    out: list[Finding] = []
    where = facts.binfmt_misc
    for ef in facts.entries:
        if interpreter_replaced(ef, facts.probes):
            out.append(
                _entry_finding(
                    ef,
                    "entry.interpreter-replaced",
                    Severity.WARNING,
                    f"{ef.entry.interpreter} was replaced since registration; the kernel still "
                    "runs the old file it pinned",
                    _reinstall(ef, where),
                )
            )
    claimants: dict[Platform, list[str]] = {}
    for ef in facts.entries:
        if ef.entry.enabled:
            for platform in claimed_platforms(ef.entry):
                claimants.setdefault(platform, []).append(ef.entry.name)
    for platform, names in sorted(claimants.items()):
        if len(names) > 1:
            out.append(
                Finding(
                    check="platform.multiple-handlers",
                    severity=Severity.WARNING,
                    message=f"{platform} is claimed by {len(names)} enabled entries "
                    f"({', '.join(names)}); the newest registered wins",
                    platforms=(str(platform),),
                    fix=_cli(f"install --force {platform}", where),
                )
            )
    for platform, why in sorted(report.unavailable.items()):
        if platform in claimants and why.startswith("probe failed"):
            out.append(
                Finding(
                    check="platform.probe-failed",
                    severity=Severity.ERROR,
                    message=f"{platform} has an entry ({', '.join(claimants[platform])}) but "
                    f"does not run: {why}",
                    platforms=(str(platform),),
                    fix=_cli(f"install --force {platform}", where),
                )
            )
    if not report.emulated and facts.qemu_installed:
        out.append(
            Finding(
                check="platform.none-emulated",
                severity=Severity.WARNING,
                message="no foreign platform can run: QEMU is installed but no working "
                "binfmt_misc entry uses it",
                fix=_cli("install all", where),
            )
        )
    return out


def _userns_finding(facts: BinfmtFacts) -> Finding:
    if facts.per_userns_binfmt:
        return Finding(
            check="kernel.per-userns-binfmt",
            severity=Severity.INFO,
            message="user namespaces get their own binfmt_misc instance: native platforms "
            "were decided by probe",
        )
    return Finding(
        check="kernel.per-userns-binfmt",
        severity=Severity.WARNING,
        message="no per-user-namespace binfmt_misc (kernel < 6.7?): native platforms come from "
        f"the compatibility table, not a probe ({facts.per_userns_reason})",
        fix=None,
    )
