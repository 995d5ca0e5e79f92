"""Kernel tests of ``runtimectl binfmt``, ``check-binfmt`` and ``platforms`` against a real,
private binfmt_misc instance (tests.support.run_private_binfmt), with foreign busybox binaries.

Each test is one namespace run that executes several commands; every command's stdout, stderr
and exit status land in files under ``$OUT`` for the assertions.
"""

from __future__ import annotations

import json
import os
import platform
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.support import busybox, require, run_private_binfmt

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

FOREIGN = {"arm64": "aarch64", "armhf": "armv7l", "s390x": "s390x", "ppc64el": "ppc64le"}
ENTRY = {
    "arm64": "runtimed-aarch64",
    "armhf": "runtimed-arm",
    "s390x": "runtimed-s390x",
    "ppc64el": "runtimed-ppc64le",
}
ARM64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
ARM64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
# Runs a runtimectl command: run NAME ARGS... -> $OUT/NAME.{out,err,rc}
RUN = """
run() {
    name=$1; shift
    if "$RUNTIMECTL" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; then rc=0; else rc=$?; fi
    echo "$rc" > "$OUT/$name.rc"
}
"""


class Outputs:
    """The files a script left in ``$OUT``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def rc(self, name: str) -> int:
        return int((self.out / f"{name}.rc").read_text())

    def text(self, name: str) -> str:
        return (self.out / f"{name}.out").read_text()

    def err(self, name: str) -> str:
        return (self.out / f"{name}.err").read_text()

    def json(self, name: str) -> Any:
        return json.loads(self.text(name))


def _run(script: str, tmp_path: Path, env: dict[str, str] | None = None) -> Outputs:
    out = tmp_path / "out"
    out.mkdir()
    done = run_private_binfmt(RUN + script, env={"OUT": str(out), **(env or {})})
    assert done.returncode == 0, done.stderr
    return Outputs(out)


def _require_amd64() -> None:
    require(platform.machine() == "x86_64", "the native-set assertions are written for amd64")


def _i386_exit0() -> bytes:
    """A static i386 ELF calling exit(0): ``mov eax,1; xor ebx,ebx; int 0x80``."""
    code = b"\xb8\x01\x00\x00\x00\x31\xdb\xcd\x80"
    base, ehsize, phsize = 0x08048000, 52, 32
    size = ehsize + phsize + len(code)
    ident = b"\x7fELF\x01\x01\x01" + b"\0" * 9
    header = ident + struct.pack(
        "<HHIIIIIHHHHHH", 2, 3, 1, base + ehsize + phsize, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0
    )
    program = struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000)
    return header + program + code


def test_binfmt_install_runs_foreign_busybox_with_f_and_p_idempotently(tmp_path: Path) -> None:
    env = {f"BB_{arch}": str(busybox(arch)) for arch in FOREIGN}
    arches = " ".join(FOREIGN)
    out = _run(
        f"""
        run install binfmt install --json --binfmt-misc "$BM" {arches}
        for arch in {arches}; do
            eval bb=\\$BB_$arch
            # An empty root but for busybox: only a handler with F can run it there.
            root=$(mktemp -d) && cp "$bb" "$root/busybox"
            chroot "$root" /busybox uname -m > "$OUT/uname-$arch"
        done
        for name in {" ".join(ENTRY.values())}; do cat "$BM/$name" > "$OUT/entry-$name"; done
        run again binfmt install --json --persist --drop-in "$OUT/binfmt.d/runtimed.conf" \
            --binfmt-misc "$BM" {arches}
        run status binfmt status --json --binfmt-misc "$BM"
        """,
        tmp_path,
        env,
    )
    assert out.rc("install") == 0, out.err("install")
    outcomes = {c["entry"]: c["outcome"] for c in out.json("install")["platforms"]}
    assert outcomes == dict.fromkeys(ENTRY.values(), "registered")
    for arch, machine in FOREIGN.items():
        assert (out.out / f"uname-{arch}").read_text().strip() == machine
        status = (out.out / f"entry-{ENTRY[arch]}").read_text()
        assert "flags: PF" in status, status
    assert out.rc("again") == 0
    assert {c["outcome"] for c in out.json("again")["platforms"]} == {"kept"}
    assert out.json("again")["actions"] == []
    drop_in = (out.out / "binfmt.d" / "runtimed.conf").read_text().splitlines()
    rules = [line for line in drop_in if line and not line.startswith("#")]
    assert sorted(rule.split(":")[1] for rule in rules) == sorted(ENTRY.values())
    assert all(rule.endswith(":PF") for rule in rules)
    listed = {e["name"]: e for e in out.json("status")["entries"]}
    assert listed[ENTRY["arm64"]]["claims"] == ["linux/arm64"]
    assert listed[ENTRY["armhf"]]["claims"] == ["linux/arm/v7"]
    assert all(e["ours"] and e["enabled"] for e in listed.values())


def test_binfmt_entry_without_f_is_found_replaced_and_uninstalled(tmp_path: Path) -> None:
    out = _run(
        f"""
        printf '%s' ':qemu-aarch64:M::{ARM64_MAGIC}:{ARM64_MASK}:/usr/bin/qemu-aarch64-static:' \
            > "$BM/register"
        run check1 check-binfmt --json --binfmt-misc "$BM"
        run refused binfmt install --binfmt-misc "$BM" arm64
        run forced binfmt install --json --force --binfmt-misc "$BM" arm64
        run check2 check-binfmt --json --binfmt-misc "$BM"
        run uninstall binfmt uninstall --json --binfmt-misc "$BM" arm64
        run check3 check-binfmt --json --binfmt-misc "$BM"
        ls "$BM" > "$OUT/left"
        """,
        tmp_path,
    )
    assert out.rc("check1") == 1
    findings = {f["check"]: f for f in out.json("check1")["findings"]}
    no_f = findings["entry.no-fix-binary"]
    assert no_f["entry"] == "qemu-aarch64"
    assert no_f["platforms"] == ["linux/arm64"]
    assert no_f["fix"].startswith("runtimectl binfmt install --force linux/arm64 --binfmt-misc ")
    assert "linux/arm64" in out.json("check1")["platforms"]["unavailable"]

    assert out.rc("refused") == 3
    assert "qemu-aarch64" in out.err("refused")
    assert "--force" in out.err("refused")

    assert out.rc("forced") == 0, out.err("forced")
    (change,) = out.json("forced")["platforms"]
    assert change["outcome"] == "replaced"
    assert change["entry"] == "runtimed-aarch64"
    (before,) = change["previous"]
    assert before["name"] == "qemu-aarch64"
    assert any("no F flag" in reason for reason in before["reasons"])

    assert out.rc("check2") == 0, out.text("check2")
    emulated = out.json("check2")["platforms"]["emulated"]["linux/arm64"]
    assert emulated == {
        "entry": "runtimed-aarch64",
        "interpreter": "/usr/bin/qemu-aarch64-static",
        "flags": "PF",
    }

    assert out.rc("uninstall") == 0
    unavailable = out.json("check3")["platforms"]["unavailable"]
    assert unavailable["linux/arm64"] == "no binfmt_misc entry claims it"
    assert (out.out / "left").read_text().split() == ["register", "status"]


def test_binfmt_install_for_native_platforms_is_refused(tmp_path: Path) -> None:
    _require_amd64()
    probe = tmp_path / "i386-exit0"
    probe.write_bytes(_i386_exit0())
    os.chmod(probe, 0o755)
    out = _run(
        f"""
        run platforms platforms --json --embedded --binfmt-misc "$BM"
        run amd64 binfmt install --binfmt-misc "$BM" linux/amd64
        run i386 binfmt install --binfmt-misc "$BM" linux/386
        # The instance is empty: only the kernel itself can run an i386 binary here.
        if {probe}; then echo yes; else echo no; fi > "$OUT/ia32"
        ls "$BM" > "$OUT/left"
        """,
        tmp_path,
    )
    report = out.json("platforms")
    assert report["native_source"] == "probe"
    assert report["host"].startswith("linux/amd64")
    ia32 = (out.out / "ia32").read_text().strip() == "yes"
    assert ("linux/386" in report["native"]) is ia32
    assert out.rc("amd64") == 6
    assert "host's own architecture" in out.err("amd64")
    if ia32:
        assert out.rc("i386") == 6
        assert "natively" in out.err("i386")
        assert (out.out / "left").read_text().split() == ["register", "status"]


S390X_MAGIC = r"\x7f\x45\x4c\x46\x02\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x16"
S390X_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff"


def test_binfmt_check_proves_handlers_by_running_probes(tmp_path: Path) -> None:
    """A handler with the wrong interpreter fails its probe; a pinned interpreter replaced
    on disk since registration still runs, and check-binfmt sees it was replaced."""
    out = _run(
        f"""
        printf '%s' ':wrong:M::{ARM64_MAGIC}:{ARM64_MASK}:/usr/bin/qemu-s390x-static:F' \
            > "$BM/register"
        qemu=$(mktemp -d)/qemu-s390x-static
        cp /usr/bin/qemu-s390x-static "$qemu"
        printf '%s' ":pinned:M::{S390X_MAGIC}:{S390X_MASK}:$qemu:F" > "$BM/register"
        # An upgrade: a new file renamed over the old one, whose inode the kernel still holds.
        cp "$qemu" "$qemu.new" && mv "$qemu.new" "$qemu"
        run check check-binfmt --json --binfmt-misc "$BM"
        """,
        tmp_path,
    )
    assert out.rc("check") == 1
    report = out.json("check")
    findings = {(f["check"], f["entry"]) for f in report["findings"]}
    assert ("entry.wrong-machine", "wrong") in findings
    assert ("platform.probe-failed", None) in findings
    assert report["platforms"]["unavailable"]["linux/arm64"].startswith("probe failed")
    assert ("entry.interpreter-replaced", "pinned") in findings
    emulated = report["platforms"]["emulated"]["linux/s390x"]
    assert emulated["entry"] == "pinned"
    assert emulated["interpreter"].endswith("qemu-s390x-static (deleted)")
