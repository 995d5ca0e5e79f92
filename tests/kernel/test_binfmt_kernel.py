"""Kernel tests of binfmt.kernel against a private binfmt_misc instance: the filesystem check,
mounting through the helper, one-write registration and how kernel refusals are reported."""

from __future__ import annotations

import json

import pytest

from tests.support import run_private_binfmt

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# Runs inside the namespace: every result is printed as one JSON object.
SCRIPT = r"""
import json, os, sys, tempfile
from pathlib import Path
from binfmt import kernel
from binfmt.entry import BinfmtEntry, BinfmtFlag, parse_flags
from runtimed.errors import RuntimedError

bm = Path(os.environ["BM"])
out = {}
def attempt(name, call):
    try:
        call()
        out[name] = None
    except RuntimedError as exc:
        out[name] = {"type": type(exc).__name__, "details": exc.details, "hint": exc.hint}

entry = BinfmtEntry(
    name="t-aarch64",
    magic=bytes.fromhex("7f454c460201010000000000000000000200b700"),
    mask=bytes.fromhex("ffffffffffffff00fffffffffffffffffeffffff"),
    interpreter="/usr/bin/qemu-aarch64-static",
    flags=parse_flags("FP"),
)
plain = Path(tempfile.mkdtemp())
out["plain_is_mounted"] = kernel.is_mounted(plain)
out["mounted_now"] = kernel.ensure_mounted(plain)
out["plain_mounted_after"] = kernel.is_mounted(plain)
out["mounted_again"] = kernel.ensure_mounted(plain)
kernel.register(bm, entry)
state = kernel.read_state(bm)
out["read_back"] = state.entries == (entry,) and state.enabled
# The same superblock: a second mount of the namespace's instance shows the same entry.
out["same_instance"] = [e.name for e in kernel.read_state(plain).entries]
attempt("duplicate", lambda: kernel.register(bm, entry))
attempt("missing", lambda: kernel.register(bm, BinfmtEntry(
    name="t-missing", magic=b"\x7fELFx", interpreter="/nonexistent/qemu",
    flags=parse_flags("F"))))
attempt("remove_unknown", lambda: kernel.remove(bm, "nope"))
attempt("not_mounted", lambda: kernel.read_state(Path(tempfile.mkdtemp())))
kernel.set_enabled(bm, entry.name, False)
out["disabled"] = not kernel.read_state(bm).entries[0].enabled
kernel.remove(bm, entry.name)
out["left"] = [e.name for e in kernel.read_state(bm).entries]
print(json.dumps(out))
"""


def test_binfmt_kernel_register_read_and_refusals() -> None:
    done = run_private_binfmt('"$PY" -c "$1"', args=[SCRIPT])
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["plain_is_mounted"] is False
    assert out["mounted_now"] is True
    assert out["plain_mounted_after"] is True
    assert out["mounted_again"] is False
    assert out["read_back"] is True
    assert out["same_instance"] == ["t-aarch64"]
    assert out["duplicate"]["type"] == "HandlerConflictError"
    assert out["duplicate"]["details"]["errno"] == "EEXIST"
    assert out["missing"]["type"] == "InterpreterNotFoundError"
    assert out["missing"]["details"]["interpreter"] == "/nonexistent/qemu"
    assert out["remove_unknown"]["type"] == "KernelError"
    assert out["remove_unknown"]["details"]["errno"] == "ENOENT"
    assert out["not_mounted"]["type"] == "BinfmtNotMountedError"
    assert out["not_mounted"]["hint"].startswith("mount -t binfmt_misc binfmt_misc ")
    assert out["disabled"] is True
    assert out["left"] == []
