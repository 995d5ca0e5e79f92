"""Pure: OCI document parsing, chain IDs and platform selection (sandbox.oci)."""

from __future__ import annotations

import hashlib
import json

import pytest

from binfmt.platform import Platform
from runtimed.errors import InvalidArchiveError, Json
from sandbox import oci

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def _doc(obj: Json) -> bytes:
    return json.dumps(obj).encode()


def _desc(digest: str, media_type: str, platform: Json = None) -> dict[str, Json]:
    out: dict[str, Json] = {"mediaType": media_type, "digest": digest, "size": 10}
    if platform is not None:
        out["platform"] = platform
    return out


def test_chain_ids_follow_the_image_spec_formula() -> None:
    # image-spec config.md: ChainID(L0|L1) = SHA256(ChainID(L0) + " " + DiffID(L1)).
    second = "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()
    third = "sha256:" + hashlib.sha256(f"{second} {D3}".encode()).hexdigest()
    assert oci.chain_ids([D1, D2, D3]) == (D1, second, third)
    assert oci.chain_ids([]) == ()


@pytest.mark.parametrize(
    "text",
    ["sha256:" + "A" * 64, "sha256:" + "1" * 63, "md5:" + "1" * 32, "sha512:" + "1" * 64, 7, None],
)
def test_parse_digest_rejects_malformed(text: object) -> None:
    with pytest.raises(InvalidArchiveError, match=r"layers\[0\]\.digest"):
        oci.parse_digest(text, where="layers[0].digest")


def test_parse_digest_accepts_sha512() -> None:
    assert oci.parse_digest("sha512:" + "a" * 128, where="x") == "sha512:" + "a" * 128


def test_verify_blob_checks_size_and_digest() -> None:
    data = b"hello"
    digest = oci.sha256_digest(data)
    oci.verify_blob(data, digest, 5, what="blob")
    with pytest.raises(InvalidArchiveError, match="has 5 bytes"):
        oci.verify_blob(data, digest, 6, what="blob")
    with pytest.raises(InvalidArchiveError, match="digest check"):
        oci.verify_blob(b"hellO", digest, 5, what="blob")


def test_parse_manifest_accepts_docker_media_types() -> None:
    manifest = oci.parse_manifest(
        _doc(
            {
                "schemaVersion": 2,
                "mediaType": oci.DOCKER_MANIFEST,
                "config": _desc(D1, oci.DOCKER_CONFIG),
                "layers": [_desc(D2, oci.DOCKER_LAYER_GZIP), _desc(D3, oci.OCI_LAYER_ZSTD)],
            }
        )
    )
    assert [layer.digest for layer in manifest.layers] == [D2, D3]
    assert manifest.config.media_type == oci.DOCKER_CONFIG


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"config": _desc(D1, oci.OCI_CONFIG)}, "manifest.layers"),
        ({"config": _desc(D1, "text/plain"), "layers": []}, "manifest.config.mediaType"),
        (
            {"config": _desc(D1, oci.OCI_CONFIG), "layers": [_desc(D2, "application/zip")]},
            r"manifest.layers\[0\].mediaType",
        ),
        (
            {"config": {"mediaType": oci.OCI_CONFIG, "digest": D1, "size": -1}, "layers": []},
            "manifest.config.size",
        ),
        ({"mediaType": oci.OCI_INDEX, "manifests": []}, "manifest.mediaType"),
    ],
)
def test_parse_manifest_names_the_bad_field(doc: Json, field: str) -> None:
    with pytest.raises(InvalidArchiveError, match=field):
        oci.parse_manifest(_doc(doc))


@pytest.mark.parametrize("data", [b"", b"[]", b"{", b"\xff", b"{}" + b" " * oci.MAX_DOCUMENT_SIZE])
def test_parse_index_rejects_non_documents(data: bytes) -> None:
    with pytest.raises(InvalidArchiveError):
        oci.parse_index(data)


def test_parse_index_normalises_platforms() -> None:
    index = oci.parse_index(
        _doc(
            {
                "manifests": [
                    _desc(D1, oci.OCI_MANIFEST, {"os": "linux", "architecture": "arm64"}),
                    _desc(D2, oci.OCI_MANIFEST, {"os": "linux", "architecture": "arm"}),
                    _desc(D3, oci.OCI_INDEX),
                ]
            }
        )
    )
    assert [d.platform for d in index.manifests] == [
        Platform("linux", "arm64"),
        Platform("linux", "arm", "v7"),
        None,
    ]


def test_parse_config_keeps_execution_defaults() -> None:
    config = oci.parse_config(
        _doc(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": ["PATH=/bin"],
                    "Entrypoint": ["/bin/sh"],
                    "Cmd": None,
                    "WorkingDir": "/w",
                    "User": "1:1",
                },
                "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
            }
        )
    )
    assert config.platform == Platform("linux", "amd64")
    assert config.config == oci.ImageConfig(
        env=("PATH=/bin",), entrypoint=("/bin/sh",), cmd=(), working_dir="/w", user="1:1"
    )
    assert config.diff_ids == (D1, D2)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}, "config.architecture"),
        ({"os": "linux", "architecture": "amd64"}, "config.rootfs"),
        (
            {"os": "linux", "architecture": "amd64", "rootfs": {"type": "x", "diff_ids": []}},
            "config.rootfs.type",
        ),
        (
            {
                "os": "linux",
                "architecture": "amd64",
                "config": {"Env": "PATH=/bin"},
                "rootfs": {"type": "layers", "diff_ids": []},
            },
            "config.config.Env",
        ),
        (
            {"os": "li/nux", "architecture": "amd64", "rootfs": {"type": "layers"}},
            "config",
        ),
    ],
)
def test_parse_config_names_the_bad_field(doc: Json, field: str) -> None:
    with pytest.raises(InvalidArchiveError, match=field):
        oci.parse_config(_doc(doc))


def _candidates(*platforms: Platform) -> list[oci.Descriptor]:
    return [
        oci.Descriptor(
            media_type=oci.OCI_MANIFEST, digest="sha256:" + f"{i}" * 64, size=1, platform=p
        )
        for i, p in enumerate(platforms, start=1)
    ]


AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64")
ARMV7 = Platform("linux", "arm", "v7")
ARMV6 = Platform("linux", "arm", "v6")
WINDOWS = Platform("windows", "amd64")


@pytest.mark.parametrize(
    ("offered", "wanted", "picked", "reason"),
    [
        ((AMD64, ARM64, ARMV7, WINDOWS), ARM64, 2, "exact"),
        ((WINDOWS, AMD64), AMD64, 2, "exact"),
        ((AMD64, ARM64, ARMV7, WINDOWS), WINDOWS, 4, "exact"),
        ((ARMV6, ARMV7), ARMV7, 2, "exact"),
        ((AMD64, ARMV6), ARMV7, 2, "linux/arm/v6 is compatible"),
        ((AMD64, ARMV7), ARM64, 2, "linux/arm/v7 is compatible"),
    ],
)
def test_select_manifest_prefers_exact_then_compatible(
    offered: tuple[Platform, ...], wanted: Platform, picked: int, reason: str
) -> None:
    selection = oci.select_manifest(_candidates(*offered), wanted)
    assert selection.descriptor.digest == "sha256:" + f"{picked}" * 64
    assert reason in selection.reason


def test_select_manifest_lists_what_is_offered() -> None:
    with pytest.raises(InvalidArchiveError, match="offers: linux/amd64, windows/amd64"):
        oci.select_manifest(_candidates(WINDOWS, AMD64), Platform("linux", "s390x"))


def test_written_documents_parse_back() -> None:
    config_bytes = oci.format_config(
        platform=ARMV7, config=oci.ImageConfig(env=("A=1",), cmd=("sh",)), diff_ids=[D1]
    )
    config = oci.parse_config(config_bytes)
    assert (config.platform, config.config.env, config.config.cmd) == (ARMV7, ("A=1",), ("sh",))
    assert config.diff_ids == (D1,)
    desc = oci.Descriptor(
        media_type=oci.OCI_CONFIG, digest=oci.sha256_digest(config_bytes), size=len(config_bytes)
    )
    layer = oci.Descriptor(media_type=oci.OCI_LAYER_TAR, digest=D1, size=3)
    manifest = oci.parse_manifest(oci.format_manifest(config=desc, layers=[layer]))
    assert (manifest.config, manifest.layers) == (desc, (layer,))
    entry = oci.Descriptor(media_type=oci.OCI_MANIFEST, digest=D2, size=5, platform=ARMV7)
    assert oci.parse_index(oci.format_index([entry])).manifests == (entry,)
    oci.check_oci_layout(oci.format_oci_layout())
    # Same inputs, same bytes: snapshot ids are config digests.
    assert config_bytes == oci.format_config(
        platform=ARMV7, config=oci.ImageConfig(env=("A=1",), cmd=("sh",)), diff_ids=[D1]
    )


def test_image_config_json_round_trip() -> None:
    config = oci.ImageConfig(
        env=("A=1",), entrypoint=("/x",), cmd=("y",), working_dir="/", user="0"
    )
    assert oci.ImageConfig.from_json(config.to_json()) == config
