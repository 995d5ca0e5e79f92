"""Test support for the snapshot store: archives and images made by real tools (GNU tar,
umoci, skopeo) from the cached foreign busybox binaries, and a reader for what a store shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support import busybox, require


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [os.fspath(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def require_tools(*names: str) -> None:
    for name in names:
        require(shutil.which(name) is not None, f"{name} is not installed (scripts/setup --test)")


def busybox_root(dest: Path, debian_arch: str, *, extra: dict[str, str] | None = None) -> Path:
    """A minimal root: /bin/busybox, /bin/sh -> busybox, /etc/motd and ``extra`` files."""
    (dest / "bin").mkdir(parents=True)
    (dest / "etc").mkdir()
    shutil.copy2(busybox(debian_arch), dest / "bin" / "busybox")
    (dest / "bin" / "sh").symlink_to("busybox")
    (dest / "etc" / "motd").write_text(f"{debian_arch}\n")
    for name, text in (extra or {}).items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text)
    return dest


def gnu_tar(root: Path, out: Path, *compress: str) -> Path:
    """``tar -C root [compress...] -cf out .`` with GNU tar, as a user would make it."""
    require_tools("tar")
    run("tar", "-C", root, *compress, "-cf", out, ".")
    return out


def umoci_image(layout: Path, root: Path, *, os_name: str = "linux", arch: str = "") -> Path:
    """A one-layer OCI layout (tag ``latest``) holding ``root``, built by umoci."""
    require_tools("umoci")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:latest")
    bundle = layout.parent / f"{layout.name}.bundle"
    run("umoci", "unpack", "--image", f"{layout}:latest", bundle)
    shutil.copytree(root, bundle / "rootfs", symlinks=True, dirs_exist_ok=True)
    run("umoci", "repack", "--image", f"{layout}:latest", bundle)
    shutil.rmtree(bundle)
    config = ["--os", os_name, "--config.env", "FOO=bar", "--config.entrypoint", "/bin/sh"]
    if arch:
        config += ["--architecture", arch]
    run("umoci", "config", "--image", f"{layout}:latest", *config)
    run("umoci", "gc", "--layout", layout)
    return layout


def umoci_layered_image(layout: Path, work: Path) -> Path:
    """Four layers: a busybox root with /opt/keep/{a,b}, /data/x and /etc/motd (umoci repack);
    a whiteout of /etc/motd and an opaque /opt/keep holding only c (GNU tar layers added by
    ``umoci raw add-layer``); a new /etc/new (umoci unpack + repack over all of them).

    (``umoci insert`` 0.4.7 writes layers without tar padding or end-of-archive marker, which
    a strict unpacker rightly calls truncated, so it is not used here.)
    """
    root = busybox_root(
        work / "base", "arm64", extra={"opt/keep/a": "a", "opt/keep/b": "b", "data/x": "x"}
    )
    umoci_image(layout, root, arch="arm64")
    for name, files in (
        ("whiteout", {"etc/.wh.motd": ""}),
        ("opaque", {"opt/keep/.wh..wh..opq": "", "opt/keep/c": "c"}),
    ):
        tree = work / name
        for path, text in files.items():
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            (tree / path).write_text(text)
        layer = gnu_tar(tree, work / f"{name}.tar")
        run("umoci", "raw", "add-layer", "--image", f"{layout}:latest", layer)
    bundle = work / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:latest", bundle)
    (bundle / "rootfs" / "etc" / "new").write_text("new")
    run("umoci", "repack", "--image", f"{layout}:latest", bundle)
    return layout


LAYERED_TREE = {
    "bin",
    "bin/busybox",
    "bin/sh",
    "data",
    "data/x",
    "etc",
    "etc/new",
    "opt",
    "opt/keep",
    "opt/keep/c",
}


def multi_platform_layout(dest: Path, images: Sequence[tuple[Path, dict[str, str]]]) -> Path:
    """One layout whose index lists each single-image layout's manifest with its platform."""
    (dest / "blobs" / "sha256").mkdir(parents=True)
    manifests = []
    for layout, platform in images:
        for blob in (layout / "blobs" / "sha256").iterdir():
            target = dest / "blobs" / "sha256" / blob.name
            if not target.exists():
                shutil.copy2(blob, target)
        entry = json.loads((layout / "index.json").read_text())["manifests"][0]
        entry.pop("annotations", None)
        entry["platform"] = platform
        manifests.append(entry)
    nested = json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()
    digest = hashlib.sha256(nested).hexdigest()
    (dest / "blobs" / "sha256" / digest).write_bytes(nested)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": f"sha256:{digest}",
                "size": len(nested),
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return dest


def copy_layout(layout: Path, dest: Path) -> dict[str, Any]:
    """Copy ``layout`` to ``dest`` (for a test to tamper with) and return its first manifest."""
    run("cp", "-a", layout, dest)
    return first_manifest(dest)


def first_manifest(layout: Path) -> dict[str, Any]:
    """The manifest ``index.json`` of ``layout`` lists first (a single-platform layout's)."""
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest: dict[str, Any] = json.loads(blob_path(layout, digest).read_text())
    return manifest


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def tar_names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {name for name in (m.name.removeprefix("./") for m in tar) if name not in ("", ".")}
