"""runtimectl's unpacking of the daemon's OCI layout tar (``snapshot export --format oci DIR``):
directories and regular files below the destination, nothing else."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from runtimed.commands.snapshot_cmd import _unpack_layout
from runtimed.errors import SnapshotError


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    buf.seek(0)
    return buf


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    return info, data


def _other(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    """A member of another type than directory or regular file (a link to ``target``)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_layout_unpack_writes_directories_and_files(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    archive = _tar(
        _file("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        _dir("blobs"),
        _file("blobs/sha256/ab12", b"blob"),  # its directory has no entry of its own
        _file("/index.json", b"{}"),  # a leading / stays below the destination
    )
    _unpack_layout(archive, dest)
    assert (dest / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'
    assert (dest / "blobs" / "sha256" / "ab12").read_bytes() == b"blob"
    assert (dest / "index.json").read_bytes() == b"{}"
    assert sorted(p.name for p in dest.iterdir()) == ["blobs", "index.json", "oci-layout"]


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_file("../escaped", b"x"), "'..' component"),
        (_file("blobs/../../escaped", b"x"), "'..' component"),
        (_other("index.json", tarfile.SYMTYPE, "/etc/passwd"), "not a directory or a regular file"),
        (_other("index.json", tarfile.LNKTYPE, "/etc/passwd"), "not a directory or a regular file"),
        (_other("dev", tarfile.CHRTYPE), "not a directory or a regular file"),
        (_other("fifo", tarfile.FIFOTYPE), "not a directory or a regular file"),
    ],
    ids=["dotdot", "nested-dotdot", "symlink", "hardlink", "device", "fifo"],
)
def test_layout_unpack_refuses_what_a_layout_never_holds(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes | None], why: str
) -> None:
    dest = tmp_path / "a" / "out"
    dest.mkdir(parents=True)
    with pytest.raises(SnapshotError, match=why):
        _unpack_layout(_tar(_file("oci-layout", b"{}"), member), dest)
    assert not (tmp_path / "a" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()
    assert [p.name for p in dest.iterdir()] == ["oci-layout"]


def test_layout_unpack_refuses_a_name_met_twice(tmp_path: Path) -> None:
    """A second member at a name never overwrites (nor follows) what the first one wrote."""
    dest = tmp_path / "out"
    dest.mkdir()
    archive = _tar(_file("index.json", b"first"), _file("index.json", b"second"))
    with pytest.raises(SnapshotError, match="File exists"):
        _unpack_layout(archive, dest)
    assert (dest / "index.json").read_bytes() == b"first"


def test_layout_unpack_refuses_a_truncated_archive(tmp_path: Path) -> None:
    data = _tar(_file("index.json", b"x" * 4096)).getvalue()
    with pytest.raises(SnapshotError, match="unpacking the daemon's layout"):
        _unpack_layout(io.BytesIO(data[:1024]), tmp_path)
