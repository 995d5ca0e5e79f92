"""Unit tests of what binfmt_misc entries claim, against the whole QEMU table."""

from __future__ import annotations

import pytest

from binfmt.claims import claimed_targets, misses_pie, sample_header
from binfmt.elf import parse_elf
from binfmt.entry import BinfmtFlag
from binfmt.install import desired_entry
from binfmt.qemu import QEMU_TARGETS, QemuTarget

FLAGS = frozenset({BinfmtFlag.FIX_BINARY})


@pytest.mark.parametrize("target", QEMU_TARGETS, ids=lambda t: t.name)
def test_claims_each_qemu_rule_claims_exactly_its_own_target(target: QemuTarget) -> None:
    entry = desired_entry(target, f"/usr/bin/qemu-{target.cpu}-static", FLAGS)
    assert claimed_targets(entry) == (target,)
    assert not misses_pie(entry, target)


@pytest.mark.parametrize("target", QEMU_TARGETS, ids=lambda t: t.name)
def test_claims_sample_headers_are_the_targets_elf_types(target: QemuTarget) -> None:
    for e_type in (2, 3):
        info = parse_elf(sample_header(target, e_type))
        assert (info.type, info.machine) == (e_type, target.machine)
