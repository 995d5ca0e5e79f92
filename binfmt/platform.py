"""Pure. OCI platform specifiers ("os/arch/variant") with the semantics of containerd's
``platforms`` package, and the tables between OCI, ``uname -m`` and Debian architecture names.

Differences from containerd, on purpose:

- :func:`parse_platform` returns the *normalised* platform, the form containerd's matchers
  compare: ``linux/arm`` parses to ``linux/arm/v7`` and ``linux/arm64/v8`` to ``linux/arm64``,
  so two specifiers naming the same platform give equal values.
- A single component is completed from the ``host`` platform passed in, not from the Go
  runtime this code does not run in.
- OS versions and features (``windows(10.0.17763)``) are refused: runtimed runs Linux.
- Names containerd leaves alone but ``uname -m`` and Debian use (``i686``, ``armv7l``,
  ``ppc64el``, ``loongarch64``, ...) are aliases too (:data:`ARCH_ALIASES`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Final, Literal

from runtimed.errors import PlatformError, UnsupportedPlatformError

# A specifier is untrusted input: bound it before any work.
MAX_SPECIFIER_LENGTH: Final = 255

# containerd platforms.go: specifierRe (architecture, variant) and the OS part of
# osAndVersionRe (without the "(version)" suffix, which we refuse).
_COMPONENT_RE: Final = re.compile(r"[A-Za-z0-9_.-]+")
_OS_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
# Go's strconv.Atoi, which containerd uses on variants: optional sign, ASCII digits.
_GO_INT_RE: Final = re.compile(r"[+-]?[0-9]+")

# containerd database.go isKnownOS (generated from Go's syslist.go).
KNOWN_OS: Final = frozenset(
    {
        "aix", "android", "darwin", "dragonfly", "freebsd", "hurd", "illumos", "ios", "js",
        "linux", "nacl", "netbsd", "openbsd", "plan9", "solaris", "windows", "zos",
    }
)  # fmt: skip


class Architecture(enum.StrEnum):
    """Architectures runtimed knows, valued by their OCI name.

    Go's ``GOARCH`` names (containerd ``isKnownArch``) first, then QEMU's name for the
    architectures QEMU emulates but Go has no name for.
    """

    I386 = "386"
    AMD64 = "amd64"
    AMD64P32 = "amd64p32"
    ARM = "arm"
    ARMBE = "armbe"
    ARM64 = "arm64"
    ARM64BE = "arm64be"
    LOONG64 = "loong64"
    MIPS = "mips"
    MIPSLE = "mipsle"
    MIPS64 = "mips64"
    MIPS64LE = "mips64le"
    MIPS64P32 = "mips64p32"
    MIPS64P32LE = "mips64p32le"
    PPC = "ppc"
    PPC64 = "ppc64"
    PPC64LE = "ppc64le"
    RISCV = "riscv"
    RISCV64 = "riscv64"
    S390 = "s390"
    S390X = "s390x"
    SPARC = "sparc"
    SPARC64 = "sparc64"
    WASM = "wasm"
    # QEMU user-mode targets without a Go name.
    ALPHA = "alpha"
    HEXAGON = "hexagon"
    HPPA = "hppa"
    M68K = "m68k"
    MICROBLAZE = "microblaze"
    MICROBLAZEEL = "microblazeel"
    OR1K = "or1k"
    SH4 = "sh4"
    SH4EB = "sh4eb"
    XTENSA = "xtensa"
    XTENSAEB = "xtensaeb"


KNOWN_ARCHITECTURES: Final = frozenset(arch.value for arch in Architecture)

# Alias -> (architecture, variant it implies or None to keep the given one).
# The first block is containerd's normalizeArch; the second is ours, for names that uname(2),
# Debian or QEMU use and containerd leaves alone.
ARCH_ALIASES: Final[Mapping[str, tuple[Architecture, str | None]]] = {
    "aarch64": (Architecture.ARM64, None),
    "x86_64": (Architecture.AMD64, None),
    "x86-64": (Architecture.AMD64, None),
    "i386": (Architecture.I386, ""),
    "armhf": (Architecture.ARM, "v7"),
    "armel": (Architecture.ARM, "v6"),
    # ours
    "i486": (Architecture.I386, ""),
    "i586": (Architecture.I386, ""),
    "i686": (Architecture.I386, ""),
    "x32": (Architecture.AMD64P32, None),
    "aarch64_be": (Architecture.ARM64BE, None),
    "armeb": (Architecture.ARMBE, None),
    "armv5l": (Architecture.ARM, "v5"),
    "armv5tel": (Architecture.ARM, "v5"),
    "armv5tejl": (Architecture.ARM, "v5"),
    "armv6l": (Architecture.ARM, "v6"),
    "armv7l": (Architecture.ARM, "v7"),
    "armv8l": (Architecture.ARM, "v8"),
    "loongarch64": (Architecture.LOONG64, None),
    "mipsel": (Architecture.MIPSLE, None),
    "mips64el": (Architecture.MIPS64LE, None),
    "mipsn32": (Architecture.MIPS64P32, None),
    "mipsn32el": (Architecture.MIPS64P32LE, None),
    "powerpc": (Architecture.PPC, None),
    "powerpc64": (Architecture.PPC64, None),
    "powerpc64le": (Architecture.PPC64LE, None),
    "ppc64el": (Architecture.PPC64LE, None),
    "riscv32": (Architecture.RISCV, None),
    "sparc32plus": (Architecture.SPARC, "v8plus"),
}

# uname(2) machine names that do not say the byte order (MIPS kernels report "mips"/"mips64"
# either way): the little-endian architecture for each.
_LITTLE_ENDIAN_TWIN: Final[Mapping[Architecture, Architecture]] = {
    Architecture.MIPS: Architecture.MIPSLE,
    Architecture.MIPS64: Architecture.MIPS64LE,
}

# Debian architecture name <-> OCI platform. Debian's armel baseline is ARMv5TE (arm/v5),
# unlike containerd's "armel" alias (arm/v6).
DEBIAN_ARCHES: Final[Mapping[str, tuple[Architecture, str]]] = {
    "amd64": (Architecture.AMD64, ""),
    "arm64": (Architecture.ARM64, ""),
    "armhf": (Architecture.ARM, "v7"),
    "armel": (Architecture.ARM, "v5"),
    "i386": (Architecture.I386, ""),
    "s390x": (Architecture.S390X, ""),
    "ppc64el": (Architecture.PPC64LE, ""),
    "ppc64": (Architecture.PPC64, ""),
    "powerpc": (Architecture.PPC, ""),
    "mips64el": (Architecture.MIPS64LE, ""),
    "mipsel": (Architecture.MIPSLE, ""),
    "riscv64": (Architecture.RISCV64, ""),
    "loong64": (Architecture.LOONG64, ""),
    "alpha": (Architecture.ALPHA, ""),
    "hppa": (Architecture.HPPA, ""),
    "m68k": (Architecture.M68K, ""),
    "sh4": (Architecture.SH4, ""),
    "sparc64": (Architecture.SPARC64, ""),
    "x32": (Architecture.AMD64P32, ""),
}

# x86-64 psABI microarchitecture levels, as the flag names of /proc/cpuinfo
# (SSE3 shows as "pni", LZCNT as "abm"). Level 1 is the baseline every x86_64 CPU has.
AMD64_LEVEL_FLAGS: Final[Mapping[int, frozenset[str]]] = {
    2: frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}),
    3: frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
    4: frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
}


@dataclass(frozen=True, slots=True, order=True)
class Platform:
    """An OCI platform. Components are checked for syntax, not normalised (see
    :func:`normalize`); ``str()`` gives the specifier.

    Raises:
        PlatformError: a component is empty or has characters a specifier cannot carry.
    """

    os: str
    architecture: str
    variant: str = ""

    def __post_init__(self) -> None:
        text = f"{self.os}/{self.architecture}/{self.variant}"
        _check_os(self.os, text)
        _check_component(self.architecture, text)
        if self.variant:
            _check_component(self.variant, text)

    def __str__(self) -> str:
        return format_platform(self)


def _invalid(text: str, part: str, why: str) -> PlatformError:
    return PlatformError(
        f"invalid platform {text!r}: {why}",
        details={"platform": text, "part": part},
        hint="use os/arch[/variant], e.g. linux/arm64 or linux/arm/v7",
    )


def _check_os(part: str, text: str) -> None:
    if not _OS_RE.fullmatch(part):
        raise _invalid(text, part, f"OS component {part!r} must match {_OS_RE.pattern}")


def _check_component(part: str, text: str) -> None:
    if not _COMPONENT_RE.fullmatch(part):
        raise _invalid(text, part, f"component {part!r} must match {_COMPONENT_RE.pattern}")


def _go_atoi(text: str) -> int | None:
    return int(text) if _GO_INT_RE.fullmatch(text) else None


def _normalize_os(os_name: str) -> str:
    lowered = os_name.lower()
    return "darwin" if lowered == "macos" else lowered


def _normalize_arch(architecture: str, variant: str) -> tuple[str, str]:
    """containerd's normalizeArch, extended by our aliases."""
    arch, variant = architecture.lower(), variant.lower()
    alias = ARCH_ALIASES.get(arch)
    if alias is not None:
        arch = alias[0].value
        if alias[1] is not None:
            return arch, alias[1]
    if arch == Architecture.AMD64 and variant == "v1":
        variant = ""
    elif arch == Architecture.ARM64:
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
    elif arch == Architecture.ARM:
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return arch, variant


def normalize(platform: Platform) -> Platform:
    """The canonical form: lower case, aliases resolved, default variants made explicit (arm)
    or dropped (amd64 v1, arm64 v8), exactly as containerd's ``Normalize``.
    """
    arch, variant = _normalize_arch(platform.architecture, platform.variant)
    return Platform(_normalize_os(platform.os), arch, variant)


def format_platform(platform: Platform) -> str:
    """``os/arch[/variant]``, the specifier that :func:`parse_platform` reads back."""
    return "/".join(part for part in (platform.os, platform.architecture, platform.variant) if part)


def parse_platform(text: str, *, host: Platform) -> Platform:
    """Parse ``<os>|<arch>|<os>/<arch>[/<variant>]`` into a normalised platform.

    A single component is an OS (then the architecture is the host's) or, failing that, a known
    architecture (then the OS is the host's), as containerd's ``Parse`` decides.

    Raises:
        PlatformError: empty, too long, wildcards, bad characters, too many components, or a
            single component that is neither a known OS nor a known architecture.
    """
    if len(text) > MAX_SPECIFIER_LENGTH:
        raise _invalid(text[:64] + "...", text, f"longer than {MAX_SPECIFIER_LENGTH} characters")
    if "*" in text:
        raise _invalid(text, text, "wildcards are not supported")
    parts = text.split("/")
    if len(parts) > 3:
        raise _invalid(text, "/".join(parts[3:]), "more than 3 components (os/arch/variant)")
    if "(" in parts[0]:
        raise _invalid(text, parts[0], "OS versions and features are not supported")
    _check_os(parts[0], text)
    for part in parts[1:]:
        _check_component(part, text)

    if len(parts) == 1:
        os_name = _normalize_os(parts[0])
        if os_name in KNOWN_OS:
            return normalize(Platform(os_name, host.architecture, host.variant))
        arch, variant = _normalize_arch(parts[0], "")
        if arch in KNOWN_ARCHITECTURES:
            return normalize(Platform(host.os, arch, variant))
        raise _invalid(text, text, "unknown operating system or architecture")
    variant = parts[2] if len(parts) == 3 else ""
    return normalize(Platform(parts[0], parts[1], variant))


def _arm64_vector(platform: Platform) -> list[Platform]:
    """containerd compare.go platformVector for arm64: lower arm64 revisions, then 32-bit arm."""
    vector = [platform]
    variant = platform.variant or "v8"
    major_text, has_minor, minor_text = variant.partition(".")
    major = _go_atoi(major_text.removeprefix("v"))
    if major is not None and major >= 8:
        minor = 0
        if len(variant) == 4 and has_minor:
            minor = _go_atoi(minor_text) or 0
        if major == 9:
            vector += [_arm64_revision(platform, 9, m) for m in range(minor - 1, -1, -1)]
            # v9.0 forked from v8.5: v9.x runs v8.(x+5), capped at v8.9.
            minor = min(minor + 5, 9)
            major = 8
            vector.append(Platform(platform.os, platform.architecture, f"v8.{minor}"))
        vector += [_arm64_revision(platform, major, m) for m in range(minor - 1, -1, -1)]
    # Every arm64 v8.x/v9.x runs 32-bit arm up to v8.
    if variant.startswith(("v8.", "v9.")):
        variant = "v8"
    return vector + _platform_vector(Platform(platform.os, Architecture.ARM.value, variant))


def _arm64_revision(platform: Platform, major: int, minor: int) -> Platform:
    variant = f"v{major}" if minor == 0 else f"v{major}.{minor}"
    return Platform(platform.os, platform.architecture, variant)


def _lower_levels(platform: Platform, floor: int) -> list[Platform]:
    """``arch/v(N-1)`` down to ``arch/v<floor>`` for a platform whose variant is ``vN``."""
    level = _go_atoi(platform.variant.removeprefix("v"))
    if level is None or level <= floor:
        return []
    return [
        Platform(platform.os, platform.architecture, f"v{n}")
        for n in range(level - 1, floor - 1, -1)
    ]


def _platform_vector(platform: Platform) -> list[Platform]:
    """The platforms ``platform`` runs, best first (containerd compare.go platformVector)."""
    if platform.architecture == Architecture.AMD64:
        return [
            platform,
            *_lower_levels(platform, 1),
            Platform(platform.os, Architecture.I386.value),
        ]
    if platform.architecture == Architecture.ARM:
        return [platform, *_lower_levels(platform, 5)]
    if platform.architecture == Architecture.ARM64:
        return _arm64_vector(platform)
    return [platform]


def compatible(host: Platform, candidate: Platform) -> bool:
    """Whether ``host`` runs ``candidate``: containerd's ``Only(host).Match(candidate)``.

    amd64 runs 386, amd64/vN runs lower levels, arm64 runs arm/v8..v5, arm/vN runs arm down to v5.
    """
    wanted = normalize(candidate)
    return any(normalize(p) == wanted for p in _platform_vector(normalize(host)))


def is_linux(platform: Platform) -> bool:
    return normalize(platform).os == "linux"


def amd64_level(cpu_flags: Set[str]) -> int:
    """The x86-64 psABI microarchitecture level (1..4) the CPU flags of /proc/cpuinfo meet."""
    level = 1
    for candidate in sorted(AMD64_LEVEL_FLAGS):
        if not AMD64_LEVEL_FLAGS[candidate] <= cpu_flags:
            break
        level = candidate
    return level


def platform_from_uname(
    machine: str,
    *,
    cpu_flags: Set[str] = frozenset(),
    byteorder: Literal["little", "big"] = "little",
) -> Platform:
    """The Linux platform of a ``uname -m`` machine name.

    Args:
        machine: e.g. ``x86_64``, ``aarch64``, ``armv7l`` (the arm variant comes from it).
        cpu_flags: the ``flags`` of /proc/cpuinfo; on x86_64 they give the level v1..v4.
        byteorder: ``sys.byteorder``; only MIPS needs it, its machine names do not tell.

    Raises:
        UnsupportedPlatformError: a machine name we have no architecture for.
    """
    arch, variant = _normalize_arch(machine, "")
    if arch not in KNOWN_ARCHITECTURES:
        raise UnsupportedPlatformError(
            f"unknown machine {machine!r} from uname", details={"machine": machine}
        )
    known = Architecture(arch)
    if byteorder == "little":
        known = _LITTLE_ENDIAN_TWIN.get(known, known)
    if known is Architecture.AMD64:
        variant = f"v{amd64_level(cpu_flags)}"
    return normalize(Platform("linux", known.value, variant))


def debian_arch(platform: Platform) -> str:
    """The Debian architecture whose binaries are built for ``platform`` (arm/v6 -> armel).

    Raises:
        UnsupportedPlatformError: not Linux, or no Debian architecture for it.
    """
    p = normalize(platform)
    if p.os == "linux":
        if p.architecture == Architecture.ARM:
            level = _go_atoi(p.variant.removeprefix("v")) or 0
            if level >= 7:
                return "armhf"
            if level >= 5:
                return "armel"
        for name, (arch, variant) in DEBIAN_ARCHES.items():
            if p.architecture == arch and p.variant == variant:
                return name
    raise UnsupportedPlatformError(
        f"no Debian architecture for platform {p}", details={"platform": str(p)}
    )


def platform_from_debian(name: str) -> Platform:
    """The OCI platform of a Debian architecture name (``armel`` is arm/v5, ``armhf`` arm/v7).

    Raises:
        UnsupportedPlatformError: an unknown Debian architecture name.
    """
    entry = DEBIAN_ARCHES.get(name)
    if entry is None:
        raise UnsupportedPlatformError(
            f"unknown Debian architecture {name!r}", details={"debian_arch": name}
        )
    return Platform("linux", entry[0].value, entry[1])
