"""Unit tests of the pure platform report: native set, emulated/unavailable decisions, JSON."""

from __future__ import annotations

from dataclasses import replace

import pytest

from binfmt.entry import BinfmtFlag
from binfmt.install import desired_entry
from binfmt.platform import Platform
from binfmt.qemu import target_for_platform
from binfmt.report import (
    NATIVE_BY_PROBE,
    NATIVE_BY_TABLE,
    EntryFacts,
    PlatformReport,
    ProbeResult,
    build_report,
    decide_native,
    native_candidates,
)
from runtimed.errors import InvalidParamsError

HOST = Platform("linux", "amd64", "v3")
I386 = Platform("linux", "386")
ARM64 = Platform("linux", "arm64")
S390X = Platform("linux", "s390x")
QEMU = "/usr/bin/qemu-aarch64-static"
ENTRY = desired_entry(
    target_for_platform(ARM64), QEMU, frozenset({BinfmtFlag.FIX_BINARY, BinfmtFlag.PRESERVE_ARGV0})
)
FACTS = EntryFacts(
    entry=ENTRY,
    interpreter_exists=True,
    interpreter_executable=True,
    interpreter_static=True,
    interpreter_realpath=QEMU,
    interpreter_id=(1, 2),
)


def test_report_native_candidates_are_compatible_architectures() -> None:
    candidates = native_candidates(HOST, [ARM64, I386, Platform("linux", "amd64"), S390X])
    assert candidates == (HOST, I386)


@pytest.mark.parametrize(
    ("probes", "native", "source"),
    [
        (None, {HOST, I386}, NATIVE_BY_TABLE),
        ([ProbeResult(platform=I386, ran=True, native=True)], {HOST, I386}, NATIVE_BY_PROBE),
        (
            [ProbeResult(platform=I386, ran=False, native=False, error="exec: ENOEXEC")],
            {HOST},
            NATIVE_BY_PROBE,
        ),
    ],
)
def test_report_decide_native_trusts_the_probe_over_the_table(
    probes: list[ProbeResult] | None, native: set[Platform], source: str
) -> None:
    found, how = decide_native(HOST, [HOST, I386], probes, why_no_probe="kernel 6.1")
    assert found == native
    assert how.startswith(source)


def _report(
    entries: list[EntryFacts], probes: list[ProbeResult], problem: str | None = None
) -> PlatformReport:
    return build_report(
        host=HOST,
        native=frozenset({HOST, I386}),
        native_source=NATIVE_BY_PROBE,
        platforms=[Platform("linux", "amd64"), I386, ARM64, S390X],
        entries=entries,
        probes=probes,
        binfmt_problem=problem,
    )


def test_report_probe_through_an_entry_is_emulated_by_it() -> None:
    probe = ProbeResult(platform=ARM64, ran=True, native=False, exe=QEMU, exe_id=(1, 2))
    report = _report([FACTS], [probe])
    assert report.emulated[ARM64].entry == ENTRY.name
    assert report.emulated[ARM64].interpreter == QEMU
    assert report.emulated[ARM64].flags == "PF"
    assert report.unavailable[S390X] == "no binfmt_misc entry claims it"
    assert report.runs_natively(Platform("linux", "amd64", "v2"))
    assert not report.runs_natively(ARM64)


@pytest.mark.parametrize(
    ("facts", "probe", "reason"),
    [
        (
            replace(FACTS, entry=replace(ENTRY, enabled=False)),
            ProbeResult(platform=ARM64, ran=False, native=False, error="exec: ENOEXEC"),
            "disabled",
        ),
        (
            FACTS,
            ProbeResult(platform=ARM64, ran=False, native=False, error="died of SIGSEGV"),
            "probe failed: died of SIGSEGV",
        ),
        (
            replace(FACTS, entry=replace(ENTRY, flags=frozenset()), interpreter_exists=False),
            ProbeResult(platform=ARM64, ran=False, native=False, error="exec: ENOENT"),
            "interpreter missing",
        ),
    ],
)
def test_report_unavailable_says_why(facts: EntryFacts, probe: ProbeResult, reason: str) -> None:
    assert reason in _report([facts], [probe]).unavailable[ARM64]


def test_report_binfmt_problem_makes_every_foreign_platform_unavailable() -> None:
    report = _report([FACTS], [], problem="binfmt_misc is not mounted on /x")
    assert report.unavailable == {
        ARM64: "binfmt_misc is not mounted on /x",
        S390X: "binfmt_misc is not mounted on /x",
    }


def test_report_json_round_trip() -> None:
    probe = ProbeResult(platform=ARM64, ran=True, native=False, exe=QEMU, exe_id=(1, 2))
    report = _report([FACTS], [probe])
    assert PlatformReport.from_json(report.to_json()) == report


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("host"), "report.host"),
        (lambda d: d.update(native="linux/amd64"), "report.native"),
        (lambda d: d.update(native=["linux/amd64/v3/extra"]), "report.native"),
        (lambda d: d["emulated"]["linux/arm64"].pop("entry"), "report.emulated.linux/arm64.entry"),
        (lambda d: d.update(unavailable={"linux/s390x": 3}), "report.unavailable.linux/s390x"),
    ],
)
def test_report_from_json_names_the_bad_field(mutate: object, field: str) -> None:
    probe = ProbeResult(platform=ARM64, ran=True, native=False, exe=QEMU)
    data = _report([FACTS], [probe]).to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(InvalidParamsError) as info:
        PlatformReport.from_json(data)
    assert info.value.details["parameter"] == field
