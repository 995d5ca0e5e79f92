"""Pure. OCI image documents: media types, digests, index/manifest/config parsing and writing.

Parsing turns untrusted JSON bytes into frozen values and raises :class:`InvalidArchiveError`
naming the document and the bad field. Writing produces canonical JSON (sorted keys, no
whitespace) so that the same snapshot always yields the same bytes and digests.

Identity, as the OCI image spec defines it (image-spec ``config.md``):

- the *diff ID* of a layer is the digest of its uncompressed tar stream;
- the *chain ID* of layers ``L0..Ln`` is ``DiffID(L0)`` for one layer and
  ``sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))`` after that: it names the filesystem that
  results from applying the layers in order, which is what the store keys unpacked layers by
  (as containerd and BuildKit key their snapshots);
- the *image ID* is the digest of the config blob. A snapshot's id is that digest: the config
  holds the platform, the execution defaults and every diff ID, so the same content imported
  from a tarball, an OCI layout or our own export gets the same id whatever the compression.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from binfmt.platform import Platform, compatible, format_platform, normalize
from runtimed.errors import InvalidArchiveError, Json, PlatformError

# --- media types (image-spec media-types.md; Docker's image manifest v2 schema 2) ---------------

OCI_LAYOUT_VERSION: Final = "1.0.0"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD: Final = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR: Final = "application/vnd.docker.image.rootfs.diff.tar"
# image-spec annotations.md: the tag of a manifest in an image layout's index.json.
REF_NAME: Final = "org.opencontainers.image.ref.name"

INDEX_TYPES: Final = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES: Final = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES: Final = frozenset({OCI_CONFIG, DOCKER_CONFIG})
# Compression is recognised by content when unpacking; the media type only has to be a layer.
LAYER_TYPES: Final = frozenset(
    {
        OCI_LAYER_TAR,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        OCI_LAYER_TAR.replace("layer.v1", "layer.nondistributable.v1"),
        OCI_LAYER_GZIP.replace("layer.v1", "layer.nondistributable.v1"),
        OCI_LAYER_ZSTD.replace("layer.v1", "layer.nondistributable.v1"),
        DOCKER_LAYER_GZIP,
        DOCKER_LAYER_TAR,
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)

# Small JSON documents are read whole; anything bigger is not an image document.
MAX_DOCUMENT_SIZE: Final = 4 << 20
_ALGORITHMS: Final = {"sha256": 64, "sha512": 128}
_DIGEST_RE: Final = re.compile(r"(sha256|sha512):([0-9a-f]+)")

Digest = str
"""``algorithm:hex``, validated by :func:`parse_digest`."""


def parse_digest(text: object, *, where: str) -> Digest:
    """Validate an OCI digest string (sha256 or sha512, lowercase hex of the right length).

    Raises:
        InvalidArchiveError: ``text`` is not a supported digest; the message names ``where``.
    """
    if isinstance(text, str):
        match = _DIGEST_RE.fullmatch(text)
        if match and len(match.group(2)) == _ALGORITHMS[match.group(1)]:
            return text
    raise InvalidArchiveError(
        f"{where}: not a sha256/sha512 digest: {str(text)[:100]!r}", details={"field": where}
    )


def digest_hex(digest: Digest) -> str:
    """The hex part of a digest (the blob's file name under ``blobs/<algorithm>/``)."""
    return digest.partition(":")[2]


def digest_algorithm(digest: Digest) -> str:
    return digest.partition(":")[0]


def sha256_digest(data: bytes) -> Digest:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_blob(data: bytes, digest: Digest, size: int, *, what: str) -> None:
    """Check a blob read whole against its descriptor.

    Raises:
        InvalidArchiveError: the size or the digest differs.
    """
    if len(data) != size:
        raise InvalidArchiveError(
            f"{what}: blob {digest} has {len(data)} bytes, its descriptor says {size}",
            details={"digest": digest},
        )
    actual = (
        digest_algorithm(digest) + ":" + hashlib.new(digest_algorithm(digest), data).hexdigest()
    )
    if actual != digest:
        raise InvalidArchiveError(
            f"{what}: blob {digest} fails its digest check (content hashes to {actual})",
            details={"digest": digest, "actual": actual},
        )


def chain_ids(diff_ids: Sequence[Digest]) -> tuple[Digest, ...]:
    """The chain ID of every prefix of ``diff_ids`` (image-spec config.md, "Layer ChainID")."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return tuple(out)


# --- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Descriptor:
    """A content descriptor (image-spec descriptor.md) as found in an index or a manifest."""

    media_type: str
    digest: Digest
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.platform is not None:
            out["platform"] = platform_to_json(self.platform)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageConfig:
    """The execution defaults an exec starts from (the image config's ``config`` object)."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    def to_json(self) -> dict[str, Json]:
        return {
            "env": list(self.env),
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
            "working_dir": self.working_dir,
            "user": self.user,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Json]) -> ImageConfig:
        """The inverse of :meth:`to_json` (our own metadata, but checked all the same).

        Raises:
            InvalidArchiveError: a field is missing or of the wrong type.
        """
        return cls(
            env=_strings(obj.get("env", []), "config.env"),
            entrypoint=_strings(obj.get("entrypoint", []), "config.entrypoint"),
            cmd=_strings(obj.get("cmd", []), "config.cmd"),
            working_dir=_string(obj.get("working_dir", ""), "config.working_dir"),
            user=_string(obj.get("user", ""), "config.user"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigFile:
    """The parts of an image config blob the store uses; the blob itself is kept verbatim."""

    platform: Platform
    config: ImageConfig
    diff_ids: tuple[Digest, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The manifest picked from an index for a requested platform, and why."""

    descriptor: Descriptor
    reason: str


# --- parsing -----------------------------------------------------------------------------------


def _load(data: bytes, what: str) -> dict[str, Json]:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise InvalidArchiveError(f"{what}: {len(data)} bytes, more than an image document holds")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArchiveError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise InvalidArchiveError(f"{what}: not a JSON object")
    return obj


def _bad(where: str, expected: str, value: object) -> InvalidArchiveError:
    return InvalidArchiveError(
        f"{where}: expected {expected}, found {json.dumps(value)[:100]}", details={"field": where}
    )


def _string(value: Json, where: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, "a string", value)
    return value


def _strings(value: Json, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(where, "a list of strings", value)
    return tuple(str(v) for v in value)


def _object(value: Json, where: str) -> dict[str, Json]:
    if not isinstance(value, dict):
        raise _bad(where, "an object", value)
    return value


def _list(value: Json, where: str) -> list[Json]:
    if not isinstance(value, list):
        raise _bad(where, "a list", value)
    return value


def parse_platform_object(obj: Json, *, where: str) -> Platform:
    """An OCI ``platform`` object (index entry) or the platform fields of a config.

    Raises:
        InvalidArchiveError: ``os`` or ``architecture`` is missing or not a string.
    """
    fields = _object(obj, where)
    os_name = _string(fields.get("os"), f"{where}.os")
    arch = _string(fields.get("architecture"), f"{where}.architecture")
    variant = _string(fields.get("variant", ""), f"{where}.variant")
    try:
        return normalize(Platform(os=os_name, architecture=arch, variant=variant))
    except PlatformError as exc:
        raise InvalidArchiveError(f"{where}: {exc.message}", details={"field": where}) from exc


def platform_to_json(platform: Platform) -> dict[str, Json]:
    out: dict[str, Json] = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        out["variant"] = platform.variant
    return out


def parse_descriptor(obj: Json, *, where: str) -> Descriptor:
    """One descriptor; ``size`` must be a non-negative integer.

    Raises:
        InvalidArchiveError: a field is missing or wrong; the message names it.
    """
    fields = _object(obj, where)
    size = fields.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"{where}.size", "a non-negative integer", size)
    platform = None
    if fields.get("platform") is not None:
        platform = parse_platform_object(fields["platform"], where=f"{where}.platform")
    return Descriptor(
        media_type=_string(fields.get("mediaType"), f"{where}.mediaType"),
        digest=parse_digest(fields.get("digest"), where=f"{where}.digest"),
        size=size,
        platform=platform,
    )


def parse_index(data: bytes, *, what: str = "index") -> Index:
    """An OCI image index or a Docker manifest list.

    Raises:
        InvalidArchiveError: malformed; the message names the field.
    """
    obj = _load(data, what)
    media_type = obj.get("mediaType", OCI_INDEX)
    if media_type not in INDEX_TYPES:
        raise _bad(f"{what}.mediaType", "an image index media type", media_type)
    entries = _list(obj.get("manifests"), f"{what}.manifests")
    return Index(
        media_type=str(media_type),
        manifests=tuple(
            parse_descriptor(e, where=f"{what}.manifests[{i}]") for i, e in enumerate(entries)
        ),
    )


def parse_manifest(data: bytes, *, what: str = "manifest") -> Manifest:
    """An OCI image manifest or a Docker v2 schema 2 manifest.

    Raises:
        InvalidArchiveError: malformed or naming an unknown config/layer media type.
    """
    obj = _load(data, what)
    media_type = obj.get("mediaType", OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES:
        raise _bad(f"{what}.mediaType", "an image manifest media type", media_type)
    config = parse_descriptor(obj.get("config"), where=f"{what}.config")
    if config.media_type not in CONFIG_TYPES:
        raise _bad(f"{what}.config.mediaType", "an image config media type", config.media_type)
    layers = tuple(
        parse_descriptor(e, where=f"{what}.layers[{i}]")
        for i, e in enumerate(_list(obj.get("layers"), f"{what}.layers"))
    )
    for i, layer in enumerate(layers):
        if layer.media_type not in LAYER_TYPES:
            raise _bad(f"{what}.layers[{i}].mediaType", "a tar layer media type", layer.media_type)
    return Manifest(media_type=str(media_type), config=config, layers=layers)


def parse_config(data: bytes, *, what: str = "config") -> ConfigFile:
    """The platform, execution defaults and diff IDs of an image config blob.

    Raises:
        InvalidArchiveError: malformed; the message names the field.
    """
    obj = _load(data, what)
    platform = parse_platform_object(obj, where=what)
    exec_obj = _object(obj.get("config") or {}, f"{what}.config")
    rootfs = _object(obj.get("rootfs"), f"{what}.rootfs")
    if rootfs.get("type") != "layers":
        raise _bad(f"{what}.rootfs.type", '"layers"', rootfs.get("type"))
    diff_ids = _list(rootfs.get("diff_ids"), f"{what}.rootfs.diff_ids")
    return ConfigFile(
        platform=platform,
        config=ImageConfig(
            env=_strings(exec_obj.get("Env"), f"{what}.config.Env"),
            entrypoint=_strings(exec_obj.get("Entrypoint"), f"{what}.config.Entrypoint"),
            cmd=_strings(exec_obj.get("Cmd"), f"{what}.config.Cmd"),
            working_dir=_string(exec_obj.get("WorkingDir") or "", f"{what}.config.WorkingDir"),
            user=_string(exec_obj.get("User") or "", f"{what}.config.User"),
        ),
        diff_ids=tuple(
            parse_digest(d, where=f"{what}.rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids)
        ),
    )


def check_manifest_matches_config(manifest: Manifest, config: ConfigFile, *, what: str) -> None:
    """A manifest must list exactly one layer per diff ID of its config.

    Raises:
        InvalidArchiveError: the counts differ.
    """
    if len(manifest.layers) != len(config.diff_ids):
        raise InvalidArchiveError(
            f"{what}: {len(manifest.layers)} layers but the config lists "
            f"{len(config.diff_ids)} diff_ids",
            details={"field": "rootfs.diff_ids"},
        )


# --- platform selection ------------------------------------------------------------------------


def select_manifest(candidates: Sequence[Descriptor], wanted: Platform) -> Selection:
    """Pick the manifest for ``wanted``: an exact match first, then a compatible one.

    ``candidates`` are manifest descriptors with their platform filled in (nested indexes
    already flattened by the caller, in index order). Compatibility follows
    :func:`binfmt.platform.compatible` (containerd's ``platforms.Only``: linux/arm/v7 also runs
    v6 and v5 images); among compatible ones the first in index order wins.

    Raises:
        InvalidArchiveError: nothing matches; the message lists what the index offers.
    """
    with_platform = [d for d in candidates if d.platform is not None]
    for d in with_platform:
        if d.platform == wanted:
            return Selection(descriptor=d, reason=f"exact match for {format_platform(wanted)}")
    for d in with_platform:
        assert d.platform is not None
        if compatible(wanted, d.platform):
            return Selection(
                descriptor=d,
                reason=(
                    f"no exact match for {format_platform(wanted)}; "
                    f"{format_platform(d.platform)} is compatible"
                ),
            )
    offered = sorted({format_platform(d.platform) for d in with_platform if d.platform})
    raise InvalidArchiveError(
        f"image index has no manifest for {format_platform(wanted)} "
        f"(it offers: {', '.join(offered) or 'nothing'})",
        details={"platform": format_platform(wanted), "offered": list(offered)},
        hint="pick one of the offered platforms with --platform",
    )


# --- writing -----------------------------------------------------------------------------------


def canonical_json(obj: Mapping[str, Json]) -> bytes:
    """Deterministic JSON bytes (sorted keys, compact) for documents we write."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_config(*, platform: Platform, config: ImageConfig, diff_ids: Sequence[Digest]) -> bytes:
    """An OCI image config for a snapshot we made (tarball/directory import, commit).

    It holds no creation time, so the same content and platform always give the same config
    digest, hence the same snapshot id.
    """
    exec_obj: dict[str, Json] = {}
    if config.env:
        exec_obj["Env"] = list(config.env)
    if config.entrypoint:
        exec_obj["Entrypoint"] = list(config.entrypoint)
    if config.cmd:
        exec_obj["Cmd"] = list(config.cmd)
    if config.working_dir:
        exec_obj["WorkingDir"] = config.working_dir
    if config.user:
        exec_obj["User"] = config.user
    obj: dict[str, Json] = {
        **platform_to_json(platform),
        "config": exec_obj,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    return canonical_json(obj)


def format_manifest(*, config: Descriptor, layers: Iterable[Descriptor]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
    )


def format_index(manifests: Iterable[Descriptor]) -> bytes:
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [m.to_json() for m in manifests],
        }
    )


def format_oci_layout() -> bytes:
    return canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})


def check_oci_layout(data: bytes) -> None:
    """The ``oci-layout`` marker file of an image layout.

    Raises:
        InvalidArchiveError: missing version or one we do not read.
    """
    obj = _load(data, "oci-layout")
    version = obj.get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise _bad("oci-layout.imageLayoutVersion", '"1.x"', version)
