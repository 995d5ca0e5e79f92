"""Root: read-only overlay views of snapshots mounted at host paths (``snapshot mount``), and
the merged tree the kernel shows for a multi-layer image with whiteouts and opaque dirs."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from runtimed.errors import SnapshotInUseError, UsageError
from sandbox.store import ExportFormat, Store
from tests.kernel.store_images import LAYERED_TREE, require_tools, tar_names, umoci_layered_image
from tests.support import require_root

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _tree(root: Path) -> set[str]:
    out = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def test_store_view_shows_the_merged_tree_read_only(tmp_path: Path) -> None:
    require_root()
    require_tools("umoci", "tar", "mount")
    layout = umoci_layered_image(tmp_path / "layered", tmp_path / "work")
    target = tmp_path / "view"
    target.mkdir()
    with Store(tmp_path / "state") as store:
        info = store.import_source(layout)
        store.mount_view(info.id[7:19], target)
        try:
            assert os.path.ismount(target)
            # The kernel's overlay and our flattening walk agree on the tree.
            assert _tree(target) == LAYERED_TREE
            store.export([info.id], tmp_path / "flat.tar", fmt=ExportFormat.TAR)
            assert tar_names(tmp_path / "flat.tar") == LAYERED_TREE
            assert (target / "opt" / "keep" / "c").read_text() == "c"
            with pytest.raises(OSError, match="Read-only file system") as exc:
                (target / "etc" / "new").write_text("x")
            assert exc.value.errno == errno.EROFS
            with pytest.raises(SnapshotInUseError):
                store.remove(info.id)
        finally:
            store.unmount_view(target)
        assert not os.path.ismount(target)
        with pytest.raises(UsageError, match="not a snapshot view"):
            store.unmount_view(target)
        store.remove(info.id)
        assert list(store.layers_dir.iterdir()) == []


def test_store_view_of_a_single_layer_snapshot(tmp_path: Path) -> None:
    require_root()
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("x")
    target = tmp_path / "view"
    target.mkdir()
    with Store(tmp_path / "state") as store:
        info = store.import_source(root, platform="linux/amd64")
        store.mount_view(info.id, target)
        try:
            assert _tree(target) == {"bin", "bin/tool"}
        finally:
            store.unmount_view(target)
