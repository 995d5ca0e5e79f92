"""Unit tests of the pure install planner: desired x existing entries -> actions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from binfmt.claims import claimed_platforms
from binfmt.entry import BinfmtEntry, BinfmtFlag, parse_register_line
from binfmt.install import (
    Action,
    ActionKind,
    Outcome,
    conflict_reasons,
    desired_entry,
    desired_flags,
    format_drop_in,
    native_refusal,
    plan_install,
    plan_toggle,
    require_foreign,
    supports_preserve_argv0,
)
from binfmt.platform import Platform
from binfmt.qemu import target_for_platform, targets_for_platform
from runtimed.errors import HandlerConflictError, NativePlatformError

HOST = Platform("linux", "amd64", "v3")
NATIVE = frozenset({HOST, Platform("linux", "386")})
ARM64 = target_for_platform(Platform("linux", "arm64"))
S390X = target_for_platform(Platform("linux", "s390x"))
QEMU = "/usr/bin/qemu-aarch64-static"
F, P, C = BinfmtFlag.FIX_BINARY, BinfmtFlag.PRESERVE_ARGV0, BinfmtFlag.CREDENTIALS
FP = frozenset({F, P})
OURS = desired_entry(ARM64, QEMU, FP)
ARM64_PLATFORM = ARM64.platform


def debian_entry(**changes: object) -> BinfmtEntry:
    """Debian's qemu-aarch64 entry as systemd-binfmt registers it, with ``changes``."""
    entry = replace(OURS, name="qemu-aarch64", flags=frozenset({F, P}))
    return replace(entry, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("preserve", "credential", "expected"),
    [
        (False, False, {F}),
        (True, False, {F, P}),
        (True, True, {F, P, C}),
    ],
)
def test_install_desired_flags_always_have_f(
    preserve: bool, credential: bool, expected: set[BinfmtFlag]
) -> None:
    assert desired_flags(preserve_argv0=preserve, credential=credential) == expected


def test_install_desired_entry_is_named_after_the_qemu_cpu() -> None:
    assert OURS.name == f"runtimed-{ARM64.name}"
    assert OURS.magic == ARM64.magic
    assert OURS.mask == ARM64.mask


@pytest.mark.parametrize(
    ("platform", "why"),
    [
        (Platform("linux", "amd64"), "host's own architecture"),
        (Platform("linux", "amd64", "v2"), "host's own architecture"),
        (Platform("linux", "386"), "natively"),
        (Platform("linux", "arm64"), None),
    ],
)
def test_install_native_refusal_names_why(platform: Platform, why: str | None) -> None:
    found = native_refusal(platform, host=HOST, native=NATIVE, native_source="probe")
    assert (found is None) if why is None else (why in (found or ""))


def test_install_require_foreign_raises_native_platform_error() -> None:
    with pytest.raises(NativePlatformError, match=r"386.*natively"):
        require_foreign(Platform("linux", "386"), host=HOST, native=NATIVE, native_source="probe")


@pytest.mark.parametrize(
    ("name", "qemu", "kernel", "supported"),
    [
        ("qemu-aarch64-static", "qemu-aarch64 version 7.2.22 (Debian 1:7.2+dfsg-7)", "6.1.0", True),
        ("qemu-aarch64-static", "qemu-aarch64 version 6.0.0", "5.12.0", True),
        ("qemu-aarch64-static", "qemu-aarch64 version 5.2.0", "6.1.0", False),
        ("qemu-aarch64-static", "qemu-aarch64 version 7.2.0", "5.10.0-28-amd64", False),
        ("qemu-aarch64-static", "", "6.1.0", False),
        ("aarch64-binfmt-P", "", "4.19.0", True),
    ],
)
def test_install_preserve_argv0_support(name: str, qemu: str, kernel: str, supported: bool) -> None:
    assert supports_preserve_argv0(name, qemu_version=qemu, kernel_release=kernel) is supported


def test_install_fresh_instance_registers_ours() -> None:
    plan = plan_install([(ARM64, OURS)], [], broken={}, force=False)
    assert [(a.kind, a.name) for a in plan.actions] == [(ActionKind.REGISTER, OURS.name)]
    assert plan.changes[0].outcome is Outcome.REGISTERED


def test_install_is_idempotent() -> None:
    plan = plan_install([(ARM64, OURS)], [OURS], broken={}, force=False)
    assert plan.actions == ()
    assert plan.changes[0].outcome is Outcome.KEPT


def test_install_keeps_an_equivalent_entry_of_another_name() -> None:
    same = replace(OURS, name="qemu-aarch64")
    plan = plan_install([(ARM64, OURS)], [same], broken={}, force=False)
    assert plan.actions == ()
    assert plan.changes[0].entry == "qemu-aarch64"


@pytest.mark.parametrize(
    ("existing", "reason"),
    [
        (debian_entry(flags=frozenset({P})), "no F flag"),
        (debian_entry(interpreter="/usr/libexec/qemu-binfmt/aarch64-binfmt-P"), "interpreter"),
        (debian_entry(enabled=False), "disabled"),
        (debian_entry(flags=frozenset({F, P, C})), "with the C flag"),
    ],
)
def test_install_conflict_without_force_changes_nothing(existing: BinfmtEntry, reason: str) -> None:
    with pytest.raises(HandlerConflictError, match=reason) as info:
        plan_install([(ARM64, OURS)], [existing], broken={}, force=False)
    assert info.value.hint is not None
    assert "--force" in info.value.hint


def test_install_force_registers_ours_before_removing_theirs() -> None:
    theirs = debian_entry(flags=frozenset({P}))
    plan = plan_install([(ARM64, OURS)], [theirs], broken={}, force=True)
    assert [(a.kind, a.name) for a in plan.actions] == [
        (ActionKind.REGISTER, OURS.name),
        (ActionKind.REMOVE, "qemu-aarch64"),
    ]
    change = plan.changes[0]
    assert change.outcome is Outcome.REPLACED
    assert change.previous[0].entry == theirs
    assert any("no F flag" in r for r in change.previous[0].reasons)


def test_install_replaces_our_own_stale_entry_without_a_gap() -> None:
    stale = replace(OURS, interpreter="/opt/old/qemu-aarch64")
    plan = plan_install([(ARM64, OURS)], [stale], broken={}, force=False)
    assert [(a.kind, a.name) for a in plan.actions] == [
        (ActionKind.REGISTER, OURS.name + ".new"),
        (ActionKind.REMOVE, OURS.name),
        (ActionKind.REGISTER, OURS.name),
        (ActionKind.REMOVE, OURS.name + ".new"),
    ]


def test_install_broken_interpreter_is_not_equivalent() -> None:
    plan = plan_install(
        [(ARM64, OURS)], [OURS], broken={OURS.name: "interpreter missing"}, force=False
    )
    assert plan.changes[0].outcome is Outcome.REPLACED
    assert "interpreter missing" in plan.changes[0].previous[0].reasons


def test_install_other_platforms_entries_do_not_conflict() -> None:
    s390x = desired_entry(S390X, "/usr/bin/qemu-s390x-static", FP)
    plan = plan_install([(ARM64, OURS)], [s390x], broken={}, force=False)
    assert plan.changes[0].outcome is Outcome.REGISTERED


def test_install_conflict_reasons_compare_magic_under_the_mask() -> None:
    # A set bit under a zero mask bit does not change what the entry matches.
    noisy = replace(OURS, magic=OURS.magic[:7] + b"\x03" + OURS.magic[8:])
    assert conflict_reasons(noisy, OURS) == ()


def test_install_uninstall_all_removes_only_ours() -> None:
    theirs = debian_entry(flags=frozenset({P}))
    plan = plan_toggle(ActionKind.REMOVE, None, [OURS, theirs], force=False)
    assert [(a.kind, a.name) for a in plan.actions] == [(ActionKind.REMOVE, OURS.name)]
    assert {c.outcome for c in plan.changes} == {Outcome.REMOVED, Outcome.UNCHANGED}


def test_install_uninstall_force_removes_others_too() -> None:
    theirs = debian_entry(flags=frozenset({P}))
    plan = plan_toggle(ActionKind.REMOVE, [ARM64_PLATFORM], [OURS, theirs], force=True)
    assert {a.name for a in plan.actions} == {OURS.name, "qemu-aarch64"}


def test_install_enable_of_an_enabled_entry_is_a_no_op() -> None:
    plan = plan_toggle(ActionKind.ENABLE, [ARM64_PLATFORM], [OURS], force=False)
    assert plan.actions == ()
    plan = plan_toggle(ActionKind.DISABLE, [ARM64_PLATFORM], [OURS], force=False)
    assert [(a.kind, a.name) for a in plan.actions] == [(ActionKind.DISABLE, OURS.name)]


def test_install_i386_and_i486_rules_do_not_replace_each_other() -> None:
    i386, i486 = targets_for_platform(Platform("linux", "386"))
    ours = [desired_entry(t, "/usr/bin/qemu-i386-static", FP) for t in (i386, i486)]
    plan = plan_install(list(zip((i386, i486), ours, strict=True)), [], broken={}, force=False)
    assert [a.name for a in plan.actions] == ["runtimed-i386", "runtimed-i486"]
    plan = plan_install(list(zip((i386, i486), ours, strict=True)), ours, broken={}, force=False)
    assert plan.actions == ()


def test_install_drop_in_lines_are_register_lines() -> None:
    text = format_drop_in([OURS])
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [parse_register_line(line.encode()) for line in lines] == [OURS]


def _simulate(
    entries: list[BinfmtEntry], plan_actions: tuple[object, ...]
) -> tuple[list[list[str]], list[BinfmtEntry]]:
    """Apply actions as the kernel would: the enabled entries claiming arm64 after each step,
    and the entries at the end."""
    current = list(entries)
    seen = []
    for action in plan_actions:
        assert isinstance(action, Action)
        if action.kind is ActionKind.REGISTER:
            assert action.entry is not None
            assert action.name not in {e.name for e in current}, "EEXIST"
            current.insert(0, action.entry)  # the kernel tries the newest entry first
        else:
            assert action.kind is ActionKind.REMOVE
            current = [e for e in current if e.name != action.name]
        seen.append(
            [e.name for e in current if e.enabled and ARM64_PLATFORM in claimed_platforms(e)]
        )
    return seen, current


@pytest.mark.parametrize(
    "existing",
    [
        [],
        [OURS],
        [replace(OURS, interpreter="/opt/old/qemu-aarch64")],
        [debian_entry(flags=frozenset({P}))],
        [debian_entry(flags=frozenset({P})), replace(OURS, flags=frozenset({F}))],
        [replace(OURS, name="qemu-aarch64"), replace(OURS, enabled=False)],
    ],
)
def test_install_forced_plan_never_leaves_arm64_without_a_handler(
    existing: list[BinfmtEntry],
) -> None:
    plan = plan_install([(ARM64, OURS)], existing, broken={}, force=True)
    steps, final = _simulate(existing, plan.actions)
    if existing:
        assert all(steps), steps
    (handler,) = [e for e in final if ARM64_PLATFORM in claimed_platforms(e)]
    assert conflict_reasons(handler, OURS) == ()
