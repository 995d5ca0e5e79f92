"""Unit tests of check-binfmt's pure diagnosis: facts in, findings (with fixes) out."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from binfmt.claims import interpreter_cpu, misses_pie
from binfmt.diagnose import (
    BinfmtFacts,
    Diagnosis,
    Finding,
    Severity,
    diagnose,
    interpreter_replaced,
)
from binfmt.entry import BinfmtEntry, BinfmtFlag, BinfmtKind
from binfmt.install import desired_entry
from binfmt.platform import Platform
from binfmt.qemu import target_for_platform
from binfmt.report import NATIVE_BY_PROBE, EntryFacts, ProbeResult, build_report
from runtimed.errors import InvalidParamsError
from tests.unit.binfmt.elfbuild import ET_DYN, ET_EXEC, elf_header

HOST = Platform("linux", "amd64", "v3")
I386 = Platform("linux", "386")
ARM64 = Platform("linux", "arm64")
BM = "/tmp/bm"
QEMU = "/usr/bin/qemu-aarch64-static"
F, P, C = BinfmtFlag.FIX_BINARY, BinfmtFlag.PRESERVE_ARGV0, BinfmtFlag.CREDENTIALS
ENTRY = desired_entry(target_for_platform(ARM64), QEMU, frozenset({F, P}))
GOOD = EntryFacts(
    entry=ENTRY,
    interpreter_exists=True,
    interpreter_executable=True,
    interpreter_static=True,
    interpreter_realpath=QEMU,
    interpreter_id=(1, 2),
)
RAN = ProbeResult(platform=ARM64, ran=True, native=False, exe=QEMU, exe_id=(1, 2))


def _facts(
    entries: list[EntryFacts], probes: list[ProbeResult] | None = None, **changes: object
) -> BinfmtFacts:
    facts = BinfmtFacts(
        binfmt_misc=BM,
        supported=True,
        mounted=True,
        enabled=True,
        entries=tuple(entries),
        host=HOST,
        native=frozenset({HOST, I386}),
        per_userns_binfmt=True,
        per_userns_reason="",
        probes=tuple([RAN] if probes is None else probes),
        qemu_installed=True,
    )
    return replace(facts, **changes)  # type: ignore[arg-type]


def _diagnose(facts: BinfmtFacts) -> Diagnosis:
    report = build_report(
        host=facts.host,
        native=facts.native,
        native_source=NATIVE_BY_PROBE,
        platforms=[Platform("linux", "amd64"), I386, ARM64],
        entries=facts.entries,
        probes=facts.probes,
    )
    return diagnose(facts, report)


def _checks(facts: BinfmtFacts) -> dict[str, str | None]:
    diagnosis = _diagnose(facts)
    return {f.check: f.fix for f in diagnosis.findings if f.severity is not Severity.INFO}


def test_diagnose_a_good_entry_has_no_problems() -> None:
    assert _checks(_facts([GOOD])) == {}


@pytest.mark.parametrize(
    ("changes", "check", "fix"),
    [
        ({"supported": False}, "binfmt_misc.unsupported", "modprobe binfmt_misc"),
        ({"mounted": False}, "binfmt_misc.not-mounted", f"mount -t binfmt_misc binfmt_misc {BM}"),
        ({"enabled": False}, "binfmt_misc.disabled", f"echo 1 > {BM}/status"),
    ],
)
def test_diagnose_filesystem_problems_come_with_their_fix(
    changes: dict[str, object], check: str, fix: str
) -> None:
    assert _checks(_facts([], None, **changes))[check] == fix


def _entry(**changes: object) -> EntryFacts:
    return replace(GOOD, entry=replace(ENTRY, **changes))  # type: ignore[arg-type]


REINSTALL = f"runtimectl binfmt install --force linux/arm64 --binfmt-misc {BM}"


@pytest.mark.parametrize(
    ("facts", "check", "fix"),
    [
        (_entry(enabled=False), "entry.disabled", f"echo 1 > {BM}/{ENTRY.name}"),
        (_entry(flags=frozenset({P})), "entry.no-fix-binary", REINSTALL),
        (_entry(flags=frozenset({F, C})), "entry.credential", REINSTALL),
        (
            replace(GOOD, interpreter_exists=False),
            "entry.interpreter-missing",
            f"apt-get install qemu-user-static && {REINSTALL}",
        ),
        (
            replace(GOOD, interpreter_static=False),
            "entry.interpreter-dynamic",
            f"apt-get install qemu-user-static && {REINSTALL}",
        ),
        (
            replace(GOOD, interpreter_executable=False),
            "entry.interpreter-not-exec",
            f"apt-get install qemu-user-static && {REINSTALL}",
        ),
        (replace(GOOD, interpreter_noexec=True), "entry.interpreter-noexec", None),
        (
            _entry(interpreter="/usr/bin/qemu-s390x-static"),
            "entry.wrong-machine",
            f"echo -1 > {BM}/{ENTRY.name} && {REINSTALL}",
        ),
    ],
)
def test_diagnose_entry_problems_come_with_their_fix(
    facts: EntryFacts, check: str, fix: str | None
) -> None:
    found = _checks(_facts([facts]))
    assert check in found
    if fix is not None:
        assert found[check] == fix


def test_diagnose_leaves_non_emulator_entries_alone() -> None:
    pyc = BinfmtEntry(
        name="python3.11",
        kind=BinfmtKind.MAGIC,
        magic=b"\xa7\x0d\x0d\x0a",
        interpreter="/usr/bin/python3.11",
    )
    found = _checks(_facts([GOOD, replace(GOOD, entry=pyc, interpreter_static=False)]))
    assert found == {}


def test_diagnose_entry_claiming_a_native_architecture() -> None:
    amd64 = desired_entry(
        target_for_platform(Platform("linux", "amd64")),
        "/usr/bin/qemu-x86_64-static",
        frozenset({F}),
    )
    found = _checks(_facts([replace(GOOD, entry=amd64)], probes=[]))
    assert found["entry.claims-native"] == f"echo -1 > {BM}/{amd64.name}"


def test_diagnose_several_enabled_entries_for_one_platform() -> None:
    other = _entry(name="qemu-aarch64")
    assert "platform.multiple-handlers" in _checks(_facts([GOOD, other]))


def test_diagnose_entry_missing_pie_binaries() -> None:
    mask = bytearray(ENTRY.mask or b"")
    mask[16] = 0xFF  # e_type must be exactly ET_EXEC: ET_DYN no longer matches
    strict = replace(ENTRY, mask=bytes(mask))
    exec_header = elf_header(machine=183, e_type=ET_EXEC)
    pie_header = elf_header(machine=183, e_type=ET_DYN)
    assert strict.matches(exec_header)
    assert not strict.matches(pie_header)
    assert ENTRY.matches(pie_header)
    assert misses_pie(strict, target_for_platform(ARM64))
    assert "entry.misses-pie" in _checks(_facts([replace(GOOD, entry=strict)]))


def test_diagnose_probe_failure_through_an_entry_is_an_error() -> None:
    died = ProbeResult(platform=ARM64, ran=False, native=False, error="died of SIGILL")
    assert "platform.probe-failed" in _checks(_facts([GOOD], probes=[died]))


def test_diagnose_no_emulated_platform_at_all_is_a_problem() -> None:
    found = _checks(_facts([], probes=[]))
    assert found["platform.none-emulated"] == f"runtimectl binfmt install all --binfmt-misc {BM}"


@pytest.mark.parametrize(
    ("probe", "replaced"),
    [
        (RAN, False),
        (replace(RAN, exe=QEMU + " (deleted)", exe_id=(1, 9)), True),
        (replace(RAN, exe_id=(1, 9)), True),
        (replace(RAN, exe="/usr/bin/other", exe_id=(1, 9)), False),
    ],
)
def test_diagnose_replaced_pinned_interpreter(probe: ProbeResult, replaced: bool) -> None:
    assert interpreter_replaced(GOOD, [probe]) is replaced
    assert ("entry.interpreter-replaced" in _checks(_facts([GOOD], probes=[probe]))) is replaced


def test_diagnose_without_per_userns_binfmt_warns() -> None:
    found = _checks(_facts([GOOD], per_userns_binfmt=False, per_userns_reason="EPERM"))
    assert "kernel.per-userns-binfmt" in found


@pytest.mark.parametrize(
    ("path", "cpu"),
    [
        ("/usr/bin/qemu-aarch64-static", "aarch64"),
        ("/usr/bin/qemu-ppc64le", "ppc64le"),
        ("/usr/libexec/qemu-binfmt/arm-binfmt-P", "arm"),
        ("/usr/bin/box64", None),
    ],
)
def test_diagnose_interpreter_cpu_from_its_name(path: str, cpu: str | None) -> None:
    assert interpreter_cpu(path) == cpu


def test_diagnose_replaced_interpreter_finding_names_entry_platforms_and_fix() -> None:
    probe = replace(RAN, exe_id=(1, 9))
    facts = _facts([GOOD], probes=[probe])
    report = build_report(
        host=HOST,
        native=facts.native,
        native_source=NATIVE_BY_PROBE,
        platforms=[ARM64],
        entries=facts.entries,
        probes=facts.probes,
    )
    found = [f for f in diagnose(facts, report).findings if f.check == "entry.interpreter-replaced"]
    assert found == [
        Finding(
            check="entry.interpreter-replaced",
            severity=Severity.WARNING,
            message=f"entry {ENTRY.name}: {QEMU} was replaced since registration; the kernel "
            "still runs the old file it pinned",
            platforms=("linux/arm64",),
            entry=ENTRY.name,
            fix=REINSTALL,
        )
    ]


def _diagnosis() -> Diagnosis:
    """Findings of every shape: with and without platforms, entry and fix."""
    facts = _facts(
        [_entry(flags=frozenset({P})), replace(GOOD, interpreter_noexec=True)],
        per_userns_binfmt=None,
        per_userns_reason="no probe",
    )
    return _diagnose(facts)


def test_diagnose_diagnosis_json_round_trip() -> None:
    diagnosis = _diagnosis()
    assert {f.fix is None for f in diagnosis.findings} == {True, False}
    assert {f.entry is None for f in diagnosis.findings} == {True, False}
    assert Diagnosis.from_json(json.loads(json.dumps(diagnosis.to_json()))) == diagnosis


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("findings"), "diagnosis.findings"),
        (lambda d: d["findings"].insert(1, "x"), "diagnosis.findings[1]"),
        (lambda d: d["findings"][0].update(severity="fatal"), "diagnosis.findings[0].severity"),
        (lambda d: d["findings"][0].pop("check"), "diagnosis.findings[0].check"),
        (lambda d: d["findings"][1].update(platforms="arm64"), "diagnosis.findings[1].platforms"),
        (lambda d: d["findings"][1].update(fix=1), "diagnosis.findings[1].fix"),
        (lambda d: d["platforms"].pop("host"), "report.host"),
    ],
)
def test_diagnose_diagnosis_from_json_names_the_bad_field(
    change: Callable[[Any], object], field: str
) -> None:
    data: Any = json.loads(json.dumps(_diagnosis().to_json()))
    change(data)
    with pytest.raises(InvalidParamsError) as caught:
        Diagnosis.from_json(data)
    assert caught.value.details["parameter"] == field
