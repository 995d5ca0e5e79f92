"""Kernel: the snapshot store over archives made by real tools (GNU tar, umoci, skopeo), with
layers unpacked by the real helper (overlay in a private mount namespace)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from binfmt.platform import Platform
from runtimed.errors import (
    InvalidArchiveError,
    LimitExceededError,
    PlatformError,
    SnapshotError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    UsageError,
)
from sandbox.archive import UnpackLimits
from sandbox.oci import OCI_LAYER_GZIP
from sandbox.store import IDLE_CONNECTIONS, ExportFormat, Store
from tests.kernel.store_images import (
    LAYERED_TREE,
    blob_path,
    busybox_root,
    copy_layout,
    first_manifest,
    gnu_tar,
    multi_platform_layout,
    require_tools,
    run,
    tar_names,
    umoci_image,
    umoci_layered_image,
)
from tests.support import layer_helpers, require_root

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ARM64 = Platform("linux", "arm64")


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root()  # the unpack helper mounts overlays; the store lives where root writes


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every source the tests import, built once."""
    require_tools("umoci", "skopeo", "tar", "zstd")
    base = tmp_path_factory.mktemp("images")
    out: dict[str, Path] = {}
    root = busybox_root(base / "root-arm64", "arm64")
    out["root"] = root
    out["tar.gz"] = gnu_tar(root, base / "rootfs.tar.gz", "-z")
    out["tar.zst"] = gnu_tar(root, base / "rootfs.tar.zst", "--zstd")
    out["layered"] = umoci_layered_image(base / "layered", base / "layered-work")
    run("skopeo", "copy", "-q", f"oci:{out['layered']}:latest", f"oci-archive:{base}/l.oci.tar")
    out["oci-archive"] = base / "l.oci.tar"
    run(
        "skopeo",
        "copy",
        "-q",
        f"oci:{out['layered']}:latest",
        f"docker-archive:{base}/l.docker.tar:x/y:1",
    )
    out["docker-archive"] = base / "l.docker.tar"
    # A layout packed as users do it: GNU tar, compressed (recognised by content, not name).
    out["oci.tar.gz"] = gnu_tar(out["layered"], base / "layout.tgz", "-z")
    out["oci.tar.zst"] = gnu_tar(out["layered"], base / "layout.bin", "--zstd")
    per_platform = []
    for debian_arch, platform in (
        ("amd64", {"os": "linux", "architecture": "amd64"}),
        ("arm64", {"os": "linux", "architecture": "arm64"}),
        ("armhf", {"os": "linux", "architecture": "arm", "variant": "v7"}),
    ):
        r = busybox_root(base / f"mp-{debian_arch}", debian_arch)
        layout = umoci_image(base / f"mp-{debian_arch}.oci", r, arch=platform["architecture"])
        per_platform.append((layout, platform))
    # A fake Windows image: its files are just files to us.
    win_root = base / "win-root"
    (win_root / "Files" / "Windows").mkdir(parents=True)
    (win_root / "Files" / "Windows" / "notepad.exe").write_bytes(b"MZ fake")
    win = umoci_image(base / "win.oci", win_root, os_name="windows", arch="amd64")
    per_platform.append((win, {"os": "windows", "architecture": "amd64"}))
    out["multi"] = multi_platform_layout(base / "multi", per_platform)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def _export_names(store: Store, snapshot_id: str, dest: Path) -> set[str]:
    store.export([snapshot_id], dest, fmt=ExportFormat.TAR)
    return tar_names(dest)


@pytest.mark.parametrize("kind", ["tar.gz", "tar.zst", "root"])
def test_store_tarball_and_directory_detect_platform(
    store: Store, images: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    info = store.import_source(images[kind])
    assert info.platform == ARM64
    assert info.platform_source == "detected from /bin/busybox"
    assert _export_names(store, info.id, tmp_path / "x.tar") == {
        "bin",
        "bin/busybox",
        "bin/sh",
        "etc",
        "etc/motd",
    }
    assert store.layer_paths(info.id) == [store.layers_dir / info.layers[0].chain_id[7:]]


def test_store_tarball_platform_set_by_caller(store: Store, images: dict[str, Path]) -> None:
    info = store.import_source(images["tar.gz"], platform="linux/arm/v7")
    assert (str(info.platform), info.platform_source) == ("linux/arm/v7", "set by the caller")
    detected = store.import_source(images["tar.gz"])
    assert detected.id != info.id  # the platform is part of the config, hence of the id
    assert detected.layers == info.layers  # but the layer is stored once


def test_store_no_elf_needs_a_platform(store: Store, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bin").mkdir()
    (tmp_path / "data" / "bin" / "sh").write_text("#!/bin/false\n")
    with pytest.raises(PlatformError, match="cannot detect"):
        store.import_source(tmp_path / "data")
    assert store.list() == []
    assert store.count() == 0


@pytest.mark.parametrize(
    "kind", ["layered", "oci-archive", "docker-archive", "oci.tar.gz", "oci.tar.zst"]
)
def test_store_layered_image_whiteouts_and_opaque(
    store: Store, images: dict[str, Path], kind: str, tmp_path: Path
) -> None:
    info = store.import_source(images[kind])
    assert info.platform == ARM64
    assert len(info.layers) == 4
    assert info.config.env == ("FOO=bar",)
    assert info.config.entrypoint == ("/bin/sh",)
    assert _export_names(store, info.id, tmp_path / "flat.tar") == LAYERED_TREE


def test_store_same_image_from_every_container_format_is_one_snapshot(
    store: Store, images: dict[str, Path]
) -> None:
    kinds = ("layered", "oci-archive", "docker-archive", "oci.tar.gz", "oci.tar.zst")
    ids = {store.import_source(images[k]).id for k in kinds}
    # skopeo's docker-archive re-compresses nothing but renames; the config is the same bytes.
    assert len(ids) <= 2
    assert store.import_source(images["oci.tar.gz"]).id == store.import_source(images["layered"]).id
    assert len(store.list()) == store.count() == len(ids)


def test_store_repeated_import_is_a_lookup(tmp_path: Path, images: dict[str, Path]) -> None:
    phases: list[str] = []
    with Store(tmp_path / "state", checkpoint=phases.append) as store:
        first = store.import_source(images["layered"])
        assert phases.count("unpacked") == 4
        for kind in ("layered", "tar.gz"):
            store.import_source(images[kind])
        phases.clear()
        for kind in ("layered", "tar.gz"):
            again = store.import_source(images[kind])
        assert phases == []
        assert store.import_source(images["layered"]).id == first.id
        assert again.platform == ARM64
        # The same content under another name is found by its digest, not unpacked again:
        # the unpack begun during the copy (no other import was in flight) is abandoned.
        copy = tmp_path / "copy.tar.gz"
        copy.write_bytes(images["tar.gz"].read_bytes())
        assert store.import_source(copy).id == again.id
        assert phases == ["unpacking", "copied"]
        # A file changed in place is read again (here: the same tar, compressed with zstd,
        # so it is unpacked and then found to be the layer already stored).
        copy.write_bytes(images["tar.zst"].read_bytes())
        assert store.import_source(copy).layers == again.layers
        assert phases.count("unpacked") == 1


@pytest.mark.parametrize(
    ("wanted", "expected", "reason"),
    [
        ("linux/amd64", "linux/amd64", "exact match"),
        ("linux/arm64", "linux/arm64", "exact match"),
        ("linux/arm/v7", "linux/arm/v7", "exact match"),
        ("linux/arm/v8", "linux/arm/v7", "compatible"),
        ("windows/amd64", "windows/amd64", "exact match"),
    ],
)
def test_store_multi_platform_index_picks_the_manifest(
    store: Store, images: dict[str, Path], wanted: str, expected: str, reason: str, tmp_path: Path
) -> None:
    info = store.import_source(images["multi"], platform=wanted)
    assert str(info.platform) == expected
    assert reason in info.platform_source
    names = _export_names(store, info.id, tmp_path / "x.tar")
    if expected.startswith("windows"):
        assert names == {"Files", "Files/Windows", "Files/Windows/notepad.exe"}
    else:
        assert "bin/busybox" in names
        motd = store.layer_paths(info.id)[0] / "etc" / "motd"
        arch = {"linux/amd64": "amd64", "linux/arm64": "arm64", "linux/arm/v7": "armhf"}
        assert motd.read_text() == f"{arch[expected]}\n"


def test_store_multi_platform_index_refuses_what_it_lacks(
    store: Store, images: dict[str, Path]
) -> None:
    with pytest.raises(InvalidArchiveError, match="offers: linux/amd64, linux/arm/v7"):
        store.import_source(images["multi"], platform="linux/s390x")


def test_store_commit_upper_deeper_than_the_recursion_limit(
    store: Store, images: dict[str, Path]
) -> None:
    parent = store.import_source(images["layered"])
    run_dir = store.new_run_dir()
    fd = os.open(run_dir / "upper", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1200):  # a run may nest this deep
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(leaf, b"deep")
        os.close(leaf)
    finally:
        os.close(fd)
    committed = store.commit_upper(parent.id, run_dir / "upper")
    assert committed.layers[-1].size == len(b"deep")
    store.remove_run_dir(run_dir)
    # Removing it removes the deep layer (pytest's temp-dir cleanup recurses and cannot).
    store.remove(committed.id)
    assert len(list(store.layers_dir.iterdir())) == len(parent.layers)


def test_store_tarball_helper_started_early_never_outlives_the_import(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    """The store starts the unpack helper before it copies the archive into staging, and
    (alone) gives it its plan at once. Whether the copy's digest is found already stored (the
    helper is killed mid-unpack) or the archive is cut short (the helper reports it), no
    helper is left behind and staging is empty."""
    first = store.import_source(images["tar.zst"])
    copy = tmp_path / "copy.tar.zst"
    data = images["tar.zst"].read_bytes()
    copy.write_bytes(data)
    assert store.import_source(copy).id == first.id
    assert layer_helpers() == []
    truncated = tmp_path / "truncated.tar.zst"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidArchiveError, match="truncated"):
        store.import_source(truncated)
    assert layer_helpers() == []
    assert list(store.staging_dir.iterdir()) == []
    assert [info.id for info in store.list()] == [first.id]


def test_store_tarball_corrupt_early_fails_while_still_copied(store: Store, tmp_path: Path) -> None:
    """A tarball that is bad from its first header and much larger than the helper's pipe:
    the helper fails and goes while the store still sends it the blob, the sending ends
    with it (EPIPE) and the import fails naming the member, with nothing left."""
    data = tmp_path / "data"
    data.write_bytes(bytes(32 << 20))
    tar = tmp_path / "big.tar"
    subprocess.run(["tar", "-C", tmp_path, "-cf", tar, "data"], check=True)
    with tar.open("r+b") as f:
        f.seek(148)
        f.write(b"0000001\0")  # the first header's checksum
    with pytest.raises(InvalidArchiveError, match="checksum"):
        store.import_source(tar)
    assert layer_helpers() == []
    assert list(store.staging_dir.iterdir()) == []
    assert store.list() == []


class _PausedImport:
    """An import in a thread with a store of its own, stopped at the checkpoint ``at`` (once
    reached, when given) until :meth:`finish`."""

    def __init__(self, state: Path, source: Path, *, at: str | None = None) -> None:
        self.phases: list[str] = []
        self.ids: list[str] = []
        self._reached, self._release = threading.Event(), threading.Event()

        def checkpoint(name: str) -> None:
            self.phases.append(name)
            if name == at:
                self._reached.set()
                assert self._release.wait(60)

        def run() -> None:
            with Store(state, checkpoint=checkpoint) as store:
                self.ids.append(store.import_source(source).id)

        self._thread = threading.Thread(target=run)
        self._thread.start()
        if at is not None:
            assert self._reached.wait(60), f"never reached {at}: {self.phases}"

    def finish(self) -> str:
        self._release.set()
        self._thread.join(120)
        assert len(self.ids) == 1, f"the import failed after {self.phases}"
        return self.ids[0]


def _flock_waiters(path: Path) -> int:
    """How many flock requests wait for ``path`` (``/proc/locks`` marks them with "->")."""
    inode = os.stat(path).st_ino
    return sum(
        1
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())
        if fields[1] == "->" and int(fields[6].rsplit(":", 1)[1]) == inode
    )


def test_store_tarball_import_unpacks_during_its_copy_only_alone(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    """Alone, an import gives the helper its plan before it copies the archive. With another
    tarball import in flight (here: paused once unpacked, holding the gate shared), it copies
    first, so it could still find the content stored before unpacking anything."""
    state = tmp_path / "state"
    first = _PausedImport(state, images["tar.gz"], at="unpacked")
    assert first.phases[:3] == ["unpacking", "copied", "unpacked"]
    phases: list[str] = []
    try:
        with Store(state, checkpoint=phases.append) as store:
            second = store.import_source(images["tar.zst"])
    finally:
        first_id = first.finish()
    assert first_id == second.id  # the same tar under another compression: one snapshot
    assert phases[:3] == ["copied", "unpacking", "unpacked"]


def test_store_tarball_helper_gone_before_the_rest_is_sent(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    """With another import in flight the helper gets its plan only after the copy, so its
    pipe is full and most of the blob unsent; here it is killed just then. Sending the rest
    meets a closed pipe (EPIPE), and the import fails because the helper left no report,
    with nothing left behind (it once failed with EBADF, closing the pipe twice)."""
    state = tmp_path / "state"
    big = tmp_path / "big.tar"
    (tmp_path / "data").write_bytes(bytes(8 << 20))
    subprocess.run(["tar", "-C", tmp_path, "-cf", big, "data"], check=True)
    first = _PausedImport(state, images["tar.gz"], at="unpacked")

    def kill_helper(phase: str) -> None:
        if phase == "unpacking":
            (helper,) = layer_helpers()  # the first import's has ended
            helper.kill()
            helper.wait(10)

    try:
        with Store(state, checkpoint=kill_helper) as store:
            staged = set(store.staging_dir.iterdir())  # the first import's
            with pytest.raises(SnapshotError, match="without a report"):
                store.import_source(big)
            assert set(store.staging_dir.iterdir()) == staged
            assert layer_helpers() == []
    finally:
        first.finish()


def test_store_concurrent_tarball_imports_of_one_content_unpack_once(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    """The first import unpacks during its copy, holding the gate exclusively; the second,
    of the same bytes under another name, copies meanwhile, then waits at the gate (seen in
    /proc/locks), takes the lock of its content once the first holds it, waits for the first
    to commit and finds the content: the helper is planned once."""
    state = tmp_path / "state"
    copy = tmp_path / "copy.tar.zst"
    copy.write_bytes(images["tar.zst"].read_bytes())
    first = _PausedImport(state, images["tar.zst"], at="unpacking")
    second = _PausedImport(state, copy)
    try:
        gate = state / "locks" / "tarballs.lock"
        for _ in range(600):
            if _flock_waiters(gate):
                break
            time.sleep(0.05)
        assert _flock_waiters(gate) == 1
        assert second.phases == ["copied"]  # before the first has even begun its copy
    finally:
        first_id = first.finish()
    assert second.finish() == first_id
    assert first.phases.count("unpacking") == first.phases.count("unpacked") == 1
    assert second.phases == ["copied"]


def test_store_corrupt_blob_is_rejected_and_leaves_nothing(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    layers = copy_layout(images["layered"], broken)["layers"]
    blob = blob_path(broken, layers[2]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(InvalidArchiveError, match=layers[2]["digest"][7:19]):
        store.import_source(broken)
    assert store.list() == []
    assert list(store.staging_dir.iterdir()) == []
    store.gc()
    assert list(store.layers_dir.iterdir()) == []


def test_store_layer_named_by_sha512_is_checked_and_kept_under_sha256(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    """A manifest may name a layer by sha512: the store's copy checks that digest, and the
    helper hashes the blob with sha256, the name blobs are kept and exported under."""
    original = store.import_source(images["layered"])
    layout = tmp_path / "sha512"
    manifest = copy_layout(images["layered"], layout)
    first = manifest["layers"][0]
    data = blob_path(layout, first["digest"]).read_bytes()
    sha512 = hashlib.sha512(data).hexdigest()
    (layout / "blobs" / "sha512").mkdir()
    (layout / "blobs" / "sha512" / sha512).write_bytes(data)
    first["digest"] = f"sha512:{sha512}"
    encoded = json.dumps(manifest).encode()
    digest = hashlib.sha256(encoded).hexdigest()
    blob_path(layout, f"sha256:{digest}").write_bytes(encoded)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest=f"sha256:{digest}", size=len(encoded))
    (layout / "index.json").write_text(json.dumps(index))
    with Store(tmp_path / "other") as other:
        imported = other.import_source(layout)
        assert imported.id == original.id  # the same config: the same snapshot
        assert imported.layers[0].blob_digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
        assert imported.layers == original.layers
        (layout / "blobs" / "sha512" / sha512).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        with Store(tmp_path / "third") as third, pytest.raises(InvalidArchiveError, match="sha512"):
            third.import_source(layout)


def test_store_export_oci_round_trip_and_real_tools(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    require_tools("skopeo", "umoci")
    info = store.import_source(images["layered"])
    tarball = store.import_source(images["tar.gz"])
    # Kept no blob: exported gzipped (digest of the gzip, diff ID of the tar, both checked).
    directory = store.import_source(images["root"])
    for source in (info, tarball, directory):
        out = tmp_path / f"out-{source.short_id}"
        store.export([source.id], out, fmt=ExportFormat.OCI)
        with Store(tmp_path / f"other-{source.short_id}") as other:
            again = other.import_source(out)
            assert (again.id, again.platform) == (source.id, source.platform)
        inspected = json.loads(run("skopeo", "inspect", f"oci:{out}:latest"))
        assert inspected["Architecture"] == "arm64"
        assert len(inspected["Layers"]) == len(source.layers)
        run("umoci", "stat", "--image", f"{out}:latest")  # fails if it cannot read the layout
        bundle = tmp_path / f"bundle-{source.short_id}"
        run("umoci", "unpack", "--image", f"{out}:latest", bundle)
        assert (bundle / "rootfs" / "bin" / "busybox").is_file()
        assert (bundle / "rootfs" / "etc" / "motd").exists() == (source is not info)
        media_types = {d["mediaType"] for d in first_manifest(out)["layers"]}
        assert media_types == {OCI_LAYER_GZIP}


def test_store_export_multi_platform_layout(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    ids = [
        store.import_source(images["multi"], platform=p).id
        for p in ("linux/amd64", "linux/arm64", "linux/arm/v7")
    ]
    out = tmp_path / "multi-out"
    store.export(ids, out, fmt=ExportFormat.OCI)
    arch = json.loads(run("skopeo", "--override-arch", "arm64", "inspect", f"oci:{out}:latest"))[
        "Architecture"
    ]
    assert arch == "arm64"
    with Store(tmp_path / "other") as other:
        for wanted, expected in zip(
            ("linux/amd64", "linux/arm64", "linux/arm/v7"), ids, strict=True
        ):
            assert other.import_source(out, platform=wanted).id == expected
    with pytest.raises(UsageError, match="one platform"):
        store.export([ids[0], ids[0]], tmp_path / "dup", fmt=ExportFormat.OCI)


def test_store_remove_keeps_shared_layers_and_gc(store: Store, images: dict[str, Path]) -> None:
    layered = store.import_source(images["layered"])
    detected = store.import_source(images["tar.gz"])
    other = store.import_source(images["tar.gz"], platform="linux/arm/v7")
    assert other.layers == detected.layers  # one layer, two snapshots
    assert store.resolve(detected.id.removeprefix("sha256:")[:12]) == detected.id
    store.remove(detected.id)
    with pytest.raises(SnapshotNotFoundError):
        store.resolve(detected.id)
    assert store.resolve(other.id) == other.id
    assert store.layer_paths(other.id)[0].is_dir()  # still used by the other one
    store.remove(layered.id)
    store.remove(other.id)
    assert store.list() == []
    assert list(store.layers_dir.iterdir()) == []
    assert list((store.blobs_dir / "sha256").iterdir()) == []
    with pytest.raises(SnapshotNotFoundError):
        store.get(layered.id)


def test_store_commit_upper_converts_overlay_whiteouts(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    parent = store.import_source(images["layered"])
    with store.lease(parent.id):  # as a run does: the parent cannot go away meanwhile
        run_dir = store.new_run_dir()
        upper = run_dir / "upper"
        (upper / "etc").mkdir()
        (upper / "etc" / "hello").write_text("hi")
        os.mknod(upper / "data", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # whiteout of /data
        (upper / "opt").mkdir()
        os.setxattr(upper / "opt", "user.overlay.opaque", b"y")
        (upper / "opt" / "only").write_text("o")
        with pytest.raises(SnapshotInUseError, match="in use by a run"):
            store.remove(parent.id)
        child = store.commit_upper(parent.id, upper)
        store.remove_run_dir(run_dir)
        assert not run_dir.exists()
    assert [layer.chain_id for layer in child.layers[:-1]] == [
        layer.chain_id for layer in parent.layers
    ]
    assert child.platform == parent.platform
    assert child.config == parent.config
    # etc, etc/hello, .wh.data, opt, opt/.wh..wh..opq, opt/only: the members of its layer tar.
    assert child.layers[-1].entries == 6
    assert store.get(child.id).layers[-1].entries == 6  # as recorded, not just as returned
    assert _export_names(store, child.id, tmp_path / "c.tar") == {
        "bin",
        "bin/busybox",
        "bin/sh",
        "etc",
        "etc/hello",
        "etc/new",
        "opt",
        "opt/only",
    }
    out = tmp_path / "committed"
    store.export([child.id], out, fmt=ExportFormat.OCI)
    # Gzipped like the imported layers: the manifest names the blob, the config the tar.
    exported = first_manifest(out)["layers"]
    assert [d["mediaType"] for d in exported] == [OCI_LAYER_GZIP] * len(child.layers)
    top = exported[-1]
    blob = blob_path(out, top["digest"])
    assert top["digest"] == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    assert top["size"] == blob.stat().st_size
    tar = gzip.decompress(blob.read_bytes())
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == child.layers[-1].diff_id
    assert top["digest"] != child.layers[-1].diff_id
    top_names = subprocess.run(
        ["tar", "-tzf", str(blob)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert ".wh.data" in top_names
    assert "opt/.wh..wh..opq" in top_names
    require_tools("skopeo", "umoci")
    assert len(json.loads(run("skopeo", "inspect", f"oci:{out}:latest"))["Layers"]) == 5
    bundle = tmp_path / "committed-bundle"
    run("umoci", "unpack", "--image", f"{out}:latest", bundle)  # checks every diff ID
    assert (bundle / "rootfs" / "etc" / "hello").read_text() == "hi"
    assert not (bundle / "rootfs" / "data").exists()
    assert sorted(p.name for p in (bundle / "rootfs" / "opt").iterdir()) == ["only"]
    with Store(tmp_path / "again") as other:
        again = other.import_source(out)
        assert again.id == child.id
        assert again.layers[-1].entries == child.layers[-1].entries  # counted alike


def test_store_compressed_layout_truncated_or_too_big_leaves_nothing(
    images: dict[str, Path], tmp_path: Path
) -> None:
    data = images["oci.tar.gz"].read_bytes()
    truncated = tmp_path / "truncated.tgz"
    truncated.write_bytes(data[: len(data) // 2])
    with Store(tmp_path / "state") as store:
        with pytest.raises(InvalidArchiveError, match="corrupt image archive"):
            store.import_source(truncated)
        assert store.list() == []
        assert list(store.staging_dir.iterdir()) == []
    with Store(tmp_path / "small", limits=UnpackLimits(max_bytes=len(data))) as store:
        with pytest.raises(LimitExceededError, match="uncompressed bytes"):
            store.import_source(images["oci.tar.zst"])
        assert list(store.staging_dir.iterdir()) == []


def test_store_layout_blob_symlink_out_of_the_layout_is_refused(
    store: Store, images: dict[str, Path], tmp_path: Path
) -> None:
    hostile = tmp_path / "hostile"
    config = blob_path(hostile, copy_layout(images["layered"], hostile)["config"]["digest"])
    secret = tmp_path / "secret.json"
    secret.write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(secret)
    with pytest.raises(InvalidArchiveError, match="cannot open blobs/sha256/"):
        store.import_source(hostile)
    assert store.list() == []


def test_store_connections_stay_bounded_across_threads(store: Store) -> None:
    def meta_fds() -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(
            1 for fd in fds if "meta.db" in os.path.basename(_readlink(f"/proc/self/fd/{fd}"))
        )

    barrier = threading.Barrier(16)

    def call() -> None:
        barrier.wait()
        store.list()

    def wave() -> None:  # worker threads come and go, as trio's do
        threads = [threading.Thread(target=call) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    for _ in range(5):
        wave()
    # A connection kept per thread would leave 5 * 16 of them (db, -wal, -shm each). SQLite
    # may keep a closed connection's descriptors while others lock the same file, so the
    # bound is one wave's concurrency plus the idle pool, not the pool alone.
    assert meta_fds() <= 3 * (16 + IDLE_CONNECTIONS)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
