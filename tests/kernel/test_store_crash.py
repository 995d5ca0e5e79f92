"""Kernel: the store's crash safety and its locking, with importers in real processes that are
SIGKILLed at each crash-safety phase or race each other on the same layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.store import Store
from tests.kernel.store_images import busybox_root, gnu_tar, require_tools, umoci_layered_image
from tests.support import require_root

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# Imports ``argv[3]`` into the store at ``argv[2]``; at the Nth time the phase ``argv[1]``
# ("name:N", or "none") is reached it SIGKILLs itself, else it appends the phase to ``argv[4]``.
IMPORTER = """
import os, signal, sys
from pathlib import Path
from sandbox.store import Store
phase, count = (sys.argv[1].split(":") + ["1"])[:2]
seen = []
def checkpoint(name):
    seen.append(name)
    if name == phase and seen.count(name) == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
    with open(sys.argv[4], "a") as log:
        log.write(name + "\\n")
with Store(Path(sys.argv[2]), checkpoint=checkpoint) as store:
    print(store.import_source(Path(sys.argv[3])).id)
"""


@pytest.fixture(scope="module")
def layered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require_tools("umoci", "tar")
    base = tmp_path_factory.mktemp("crash")
    return umoci_layered_image(base / "layered", base / "work")


@pytest.fixture(scope="module")
def clean_id(layered: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    with Store(tmp_path_factory.mktemp("clean")) as store:
        return store.import_source(layered).id


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root()
    require_tools("tar", "zstd")
    base = tmp_path_factory.mktemp("crash-tarball")
    return gnu_tar(busybox_root(base / "root", "arm64"), base / "rootfs.tar.zst", "--zstd")


def _start(phase: str, state: Path, source: Path, log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", IMPORTER, phase, str(state), str(source), str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_consistent(state: Path, layers: int = 4) -> int:
    """Reopen the store: all or nothing, no staging, no layer directory without its row."""
    with Store(state) as store:
        snapshots = store.list()
        assert list(store.staging_dir.iterdir()) == []
        used = {layer.chain_id[7:] for s in snapshots for layer in s.layers}
        assert {p.name for p in store.layers_dir.iterdir()} == used
        for snapshot in snapshots:
            assert len(snapshot.layers) == layers
            assert all(p.is_dir() for p in store.layer_paths(snapshot.id))
        return len(snapshots)


@pytest.mark.parametrize(
    ("phase", "survives"),
    [
        ("unpacking:2", False),  # the second layer's helper unpacks while it is copied
        ("unpacked:1", False),
        ("synced:2", False),
        ("renamed:3", False),
        ("layer-committed:4", False),
        ("snapshot-committed:1", True),
    ],
)
def test_store_crash_at_any_phase_is_all_or_nothing(
    layered: Path, clean_id: str, tmp_path: Path, phase: str, survives: bool
) -> None:
    state = tmp_path / "state"
    proc = _start(phase, state, layered, tmp_path / "log")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err
    assert _check_consistent(state) == int(survives)
    # And the store still works: the import completes with the same id as a clean one.
    with Store(state) as store:
        assert store.import_source(layered).id == clean_id
    assert _check_consistent(state) == 1


@pytest.mark.parametrize(
    ("phase", "survives"),
    [
        ("unpacking:1", False),  # the gate held exclusively, the helper fed during the copy
        ("copied:1", False),  # the copy done, the content's lock not yet taken
        ("unpacked:1", False),
        ("snapshot-committed:1", True),
    ],
)
def test_store_tarball_crash_while_unpacking_during_its_copy(
    tarball: Path, tmp_path: Path, phase: str, survives: bool
) -> None:
    """A tarball import killed while it holds the gate: the next store finds all or nothing,
    and the gate and the content's lock died with the importer: the next import, from another
    file name so that it is not a lookup, finds the gate free and completes."""
    state = tmp_path / "state"
    proc = _start(phase, state, tarball, tmp_path / "log")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err
    assert _check_consistent(state, layers=1) == int(survives)
    copy = tmp_path / "copy.tar.zst"
    copy.write_bytes(tarball.read_bytes())
    proc = _start("none", state, copy, tmp_path / "log2")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    phases = (tmp_path / "log2").read_text().split()
    assert phases[0] == "unpacking"  # alone: the dead importer holds no gate
    assert ("unpacked" in phases) != survives  # a surviving snapshot is found, not unpacked
    assert _check_consistent(state, layers=1) == 1


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.7])
def test_store_crash_at_any_time_is_all_or_nothing(
    layered: Path, clean_id: str, tmp_path: Path, delay: float
) -> None:
    """Killed whenever it happens to be, unpack helper included (it dies with its parent)."""
    state = tmp_path / "state"
    proc = _start("none", state, layered, tmp_path / "log")
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    proc.communicate(timeout=60)
    assert _check_consistent(state) in (0, 1)
    with Store(state) as store:
        assert store.import_source(layered).id == clean_id


def test_store_concurrent_imports_unpack_each_layer_once(layered: Path, tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "log"
    Store(state).close()  # create the schema before the race
    procs = [_start("none", state, layered, log) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert log.read_text().split().count("unpacked") == 4
    assert _check_consistent(state) == 1
