"""Platform specifiers: containerd's own test tables, our aliases, uname and Debian names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from binfmt.platform import (
    ARCH_ALIASES,
    DEBIAN_ARCHES,
    KNOWN_ARCHITECTURES,
    KNOWN_OS,
    Architecture,
    Platform,
    amd64_level,
    compatible,
    debian_arch,
    format_platform,
    is_linux,
    normalize,
    parse_platform,
    platform_from_debian,
    platform_from_uname,
)
from runtimed.errors import PlatformError, UnsupportedPlatformError

HOST = Platform("linux", "amd64")
ARM_V6_HOST = Platform("linux", "arm", "v6")


def P(text: str) -> Platform:
    return parse_platform(text, host=HOST)


# containerd platforms_test.go TestParseSelector: (input, expected, other specifiers that the
# matcher for it accepts). Expected values are containerd's, normalised (what its matcher
# compares): "linux/arm" is arm/v7, "linux/arm64/v8" is arm64.
CONTAINERD_PARSE = [
    ("linux/arm64", "linux/arm64", ["linux/aarch64", "linux/aarch64/v8", "linux/arm64/v8"]),
    ("linux/arm64/v8", "linux/arm64", ["linux/aarch64", "linux/aarch64/v8", "linux/arm64"]),
    ("linux/arm", "linux/arm/v7", ["linux/arm/v7", "linux/armhf", "linux/arm/7"]),
    ("linux/arm/v6", "linux/arm/v6", ["linux/armel"]),
    ("linux/arm/v7", "linux/arm/v7", ["linux/arm", "linux/armhf"]),
    ("arm", "linux/arm/v7", []),
    ("armel", "linux/arm/v6", []),
    ("armhf", "linux/arm/v7", []),
    ("Aarch64", "linux/arm64", []),
    ("x86_64", "linux/amd64", []),
    ("Linux/x86_64", "linux/amd64", []),
    ("i386", "linux/386", []),
    ("linux", "linux/amd64", []),
    ("s390x", "linux/s390x", []),
    ("linux/s390x", "linux/s390x", []),
    ("macOS", "darwin/amd64", []),
    ("windows", "windows/amd64", []),
]


@pytest.mark.parametrize(("text", "expected", "matches"), CONTAINERD_PARSE)
def test_platform_parse_containerd_selector_table(
    text: str, expected: str, matches: list[str]
) -> None:
    parsed = P(text)
    assert format_platform(parsed) == expected
    assert str(parsed) == expected
    for other in matches:
        assert P(other) == parsed, other
    # containerd re-parses the formatted output and expects it to be stable
    assert P(str(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "/linux/arm",  # leading slash
        "linux/arm/",  # trailing slash
        "linux /arm",  # spaces
        "linux/&arm",  # invalid character
        "linux/arm/foo/bar",  # too many components
        # ours
        "*",
        "linux/*",
        "windows(10.0.17763)/amd64",
        "linux.x/amd64",
        "notanos",
        "linux//v7",
        "l" * 300,
    ],
)
def test_platform_parse_rejects_invalid(text: str) -> None:
    with pytest.raises(PlatformError):
        P(text)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("linux/&arm", "&arm"),
        ("linux/arm/v7/x", "x"),
        ("linux /arm", "linux "),
        ("bogus", "bogus"),
    ],
)
def test_platform_parse_error_names_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(PlatformError) as info:
        P(text)
    assert info.value.details["part"] == part
    assert repr(text) in info.value.message
    assert info.value.code == "platform.InvalidPlatform"


def test_platform_single_os_takes_host_architecture_and_variant() -> None:
    assert parse_platform("linux", host=ARM_V6_HOST) == Platform("linux", "arm", "v6")
    assert parse_platform("freebsd", host=ARM_V6_HOST) == Platform("freebsd", "arm", "v6")


def test_platform_single_architecture_takes_host_os() -> None:
    host = Platform("freebsd", "amd64")
    assert parse_platform("arm64", host=host) == Platform("freebsd", "arm64")


def test_platform_two_components_accept_unknown_names() -> None:
    # containerd does not check os/arch pairs against its lists; only single components.
    assert P("plan10/quantum") == Platform("plan10", "quantum")


# containerd database.go normalizeArch and normalizeOS.
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (Platform("linux", "i386", "foo"), Platform("linux", "386")),
        (Platform("linux", "x86-64", "v1"), Platform("linux", "amd64")),
        (Platform("linux", "x86_64", "V3"), Platform("linux", "amd64", "v3")),
        (Platform("linux", "aarch64", "8"), Platform("linux", "arm64")),
        (Platform("linux", "arm64", "v8.0"), Platform("linux", "arm64")),
        (Platform("linux", "arm64", "9"), Platform("linux", "arm64", "v9")),
        (Platform("linux", "arm64", "9.0"), Platform("linux", "arm64", "v9")),
        (Platform("linux", "arm64", "v9.0"), Platform("linux", "arm64", "v9")),
        (Platform("linux", "arm64", "v8.2"), Platform("linux", "arm64", "v8.2")),
        (Platform("linux", "armhf", "v5"), Platform("linux", "arm", "v7")),
        (Platform("linux", "armel"), Platform("linux", "arm", "v6")),
        (Platform("linux", "arm"), Platform("linux", "arm", "v7")),
        (Platform("linux", "arm", "7"), Platform("linux", "arm", "v7")),
        (Platform("linux", "arm", "5"), Platform("linux", "arm", "v5")),
        (Platform("linux", "arm", "6"), Platform("linux", "arm", "v6")),
        (Platform("linux", "arm", "8"), Platform("linux", "arm", "v8")),
        (Platform("linux", "arm", "4"), Platform("linux", "arm", "4")),
        (Platform("MacOS", "AMD64"), Platform("darwin", "amd64")),
        (Platform("Linux", "S390X"), Platform("linux", "s390x")),
    ],
)
def test_platform_normalize_containerd_rules(raw: Platform, expected: Platform) -> None:
    assert normalize(raw) == expected
    assert normalize(expected) == expected


# Names containerd leaves alone but uname(2), Debian and QEMU use.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("i486", "linux/386"),
        ("i686", "linux/386"),
        ("linux/i686", "linux/386"),
        ("ppc64el", "linux/ppc64le"),
        ("linux/ppc64el", "linux/ppc64le"),
        ("armv7l", "linux/arm/v7"),
        ("armv6l", "linux/arm/v6"),
        ("armv5tel", "linux/arm/v5"),
        ("armv8l", "linux/arm/v8"),
        ("loongarch64", "linux/loong64"),
        ("mips64el", "linux/mips64le"),
        ("mipsel", "linux/mipsle"),
        ("mipsn32el", "linux/mips64p32le"),
        ("powerpc64le", "linux/ppc64le"),
        ("aarch64_be", "linux/arm64be"),
        ("riscv32", "linux/riscv"),
        ("linux/sparc32plus", "linux/sparc/v8plus"),
    ],
)
def test_platform_our_aliases(text: str, expected: str) -> None:
    assert str(P(text)) == expected


def test_platform_aliases_resolve_to_known_architectures() -> None:
    assert {arch for arch, _ in ARCH_ALIASES.values()} <= set(Architecture)
    assert not set(ARCH_ALIASES) & KNOWN_ARCHITECTURES


# containerd compare_test.go TestOnly: host -> (runs, does not run).
CONTAINERD_ONLY = [
    ("linux/amd64", ["linux/amd64", "linux/386"], ["linux/amd64/v2", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/amd64/v2", ["linux/amd64", "linux/amd64/v1", "linux/amd64/v2", "linux/386"], ["linux/amd64/v3", "linux/amd64/v4", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/386", ["linux/386"], ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("windows/amd64", ["windows/amd64"], ["linux/amd64", "linux/arm/v7", "linux/arm64", "windows/arm"]),  # noqa: E501
    ("linux/arm/v8", ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8"], ["linux/amd64", "linux/arm/v4", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/arm/v7", ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7"], ["linux/amd64", "linux/arm/v4", "linux/arm/v8", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/arm/v6", ["linux/arm/v5", "linux/arm/v6"], ["linux/amd64", "linux/arm", "linux/arm/v4", "linux/arm/v7", "linux/arm/v8", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/arm/v5", ["linux/arm/v5"], ["linux/amd64", "linux/arm", "linux/arm/v4", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/arm/v4", ["linux/arm/v4"], ["linux/amd64", "linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8", "linux/arm64", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/arm64", ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8", "linux/arm64", "linux/arm64/v8"], ["linux/amd64", "linux/arm/v4", "linux/arm/v9", "linux/arm64/v7", "linux/arm64/v9", "windows/amd64", "windows/arm"]),  # noqa: E501
    ("linux/arm64/v9", ["linux/arm", "linux/arm/v5", "linux/arm/v6", "linux/arm/v7", "linux/arm/v8", "linux/arm64", "linux/arm64/v8", "linux/arm64/v9"], ["linux/amd64", "linux/arm/v4", "linux/arm64/v7", "linux/arm64/v10", "windows/arm64", "windows/arm"]),  # noqa: E501
    # ours: arm64 revisions (containerd compare.go's documented v8.x/v9.x rules)
    ("linux/arm64/v8.2", ["linux/arm64/v8.1", "linux/arm64", "linux/arm/v8"], ["linux/arm64/v8.3", "linux/arm64/v9"]),  # noqa: E501
    ("linux/arm64/v9.2", ["linux/arm64/v9.1", "linux/arm64/v9", "linux/arm64/v8.7", "linux/arm64/v8.6", "linux/arm64", "linux/arm/v8"], ["linux/arm64/v9.3", "linux/arm64/v8.8"]),  # noqa: E501
    ("linux/amd64/v4", ["linux/amd64/v3", "linux/amd64/v2", "linux/amd64", "linux/386", "linux/i686"], ["linux/arm64", "linux/amd64/v5"]),  # noqa: E501
    ("linux/riscv64", ["linux/riscv64"], ["linux/riscv", "linux/amd64"]),
    ("linux/ppc64le", ["linux/ppc64el"], ["linux/ppc64", "linux/ppc"]),
]  # fmt: skip


@pytest.mark.parametrize(("host", "runs", "rejects"), CONTAINERD_ONLY)
def test_platform_compatible_matches_containerd_only(
    host: str, runs: list[str], rejects: list[str]
) -> None:
    for candidate in runs:
        assert compatible(P(host), P(candidate)), f"{host} should run {candidate}"
    for candidate in rejects:
        assert not compatible(P(host), P(candidate)), f"{host} should not run {candidate}"


def test_platform_compatible_normalises_both_sides() -> None:
    assert compatible(Platform("Linux", "x86_64", "v1"), Platform("linux", "i386"))
    assert compatible(Platform("linux", "aarch64"), Platform("linux", "armhf"))


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", frozenset(), "linux/amd64"),
        ("x86_64", AMD64_V2 := frozenset(
            {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
        ), "linux/amd64/v2"),
        ("x86_64", AMD64_V3 := AMD64_V2 | {
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"
        }, "linux/amd64/v3"),
        ("x86_64", AMD64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
         "linux/amd64/v4"),
        # v4 flags without v3's: still v2, levels are cumulative
        ("x86_64", AMD64_V2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
         "linux/amd64/v2"),
        ("x86_64", AMD64_V2 - {"pni"}, "linux/amd64"),
        ("i686", frozenset(), "linux/386"),
        ("aarch64", frozenset({"asimd"}), "linux/arm64"),
        ("armv7l", frozenset(), "linux/arm/v7"),
        ("armv6l", frozenset(), "linux/arm/v6"),
        ("armv5tejl", frozenset(), "linux/arm/v5"),
        ("armv8l", frozenset(), "linux/arm/v8"),
        ("s390x", frozenset(), "linux/s390x"),
        ("ppc64le", frozenset(), "linux/ppc64le"),
        ("ppc64", frozenset(), "linux/ppc64"),
        ("riscv64", frozenset(), "linux/riscv64"),
        ("loongarch64", frozenset(), "linux/loong64"),
        ("mips64", frozenset(), "linux/mips64le"),
    ],
)  # fmt: skip
def test_platform_from_uname(machine: str, flags: frozenset[str], expected: str) -> None:
    assert str(platform_from_uname(machine, cpu_flags=flags)) == expected


def test_platform_from_uname_mips_big_endian() -> None:
    assert platform_from_uname("mips64", byteorder="big") == Platform("linux", "mips64")
    assert platform_from_uname("mips", byteorder="big") == Platform("linux", "mips")
    assert platform_from_uname("mips") == Platform("linux", "mipsle")


@pytest.mark.parametrize("machine", ["", "vax", "i86pc/x", "x86_64 "])
def test_platform_from_uname_rejects_unknown_machine(machine: str) -> None:
    with pytest.raises(UnsupportedPlatformError):
        platform_from_uname(machine)


def test_platform_amd64_level_empty_is_baseline() -> None:
    assert amd64_level(frozenset()) == 1


@pytest.mark.parametrize(
    ("name", "platform"),
    [
        ("amd64", "linux/amd64"),
        ("arm64", "linux/arm64"),
        ("armhf", "linux/arm/v7"),
        ("armel", "linux/arm/v5"),
        ("i386", "linux/386"),
        ("s390x", "linux/s390x"),
        ("ppc64el", "linux/ppc64le"),
        ("mips64el", "linux/mips64le"),
        ("riscv64", "linux/riscv64"),
        ("loong64", "linux/loong64"),
    ],
)
def test_platform_debian_names_both_ways(name: str, platform: str) -> None:
    assert str(platform_from_debian(name)) == platform
    assert debian_arch(P(platform)) == name


@pytest.mark.parametrize(
    ("platform", "name"),
    [("linux/arm/v6", "armel"), ("linux/arm/v8", "armhf"), ("linux/amd64/v3", None)],
)
def test_platform_debian_arch_of_variants(platform: str, name: str | None) -> None:
    if name is None:
        with pytest.raises(UnsupportedPlatformError):
            debian_arch(P(platform))
    else:
        assert debian_arch(P(platform)) == name


@pytest.mark.parametrize("platform", ["darwin/arm64", "linux/arm/v4", "linux/wasm"])
def test_platform_debian_arch_unsupported(platform: str) -> None:
    with pytest.raises(UnsupportedPlatformError):
        debian_arch(P(platform))


def test_platform_debian_every_name_round_trips() -> None:
    for name in DEBIAN_ARCHES:
        assert debian_arch(platform_from_debian(name)) == name


def test_platform_from_debian_unknown() -> None:
    with pytest.raises(UnsupportedPlatformError):
        platform_from_debian("armel64")


@pytest.mark.parametrize(
    ("platform", "expected"),
    [(Platform("linux", "arm64"), True), (Platform("Linux", "arm64"), True),
     (Platform("windows", "amd64"), False), (Platform("darwin", "arm64"), False)],
)  # fmt: skip
def test_platform_is_linux(platform: Platform, expected: bool) -> None:
    assert is_linux(platform) is expected


@pytest.mark.parametrize(
    ("os_name", "arch", "variant"),
    [("", "amd64", ""), ("linux", "", ""), ("linux", "a/b", ""), ("lin ux", "amd64", ""),
     ("linux", "arm", "v/7"), ("linux(1)", "amd64", "")],
)  # fmt: skip
def test_platform_constructor_rejects_unformattable_components(
    os_name: str, arch: str, variant: str
) -> None:
    with pytest.raises(PlatformError):
        Platform(os_name, arch, variant)


# --- hypothesis round trips ---------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
os_names = st.sampled_from(sorted(KNOWN_OS)) | st.text(_ALNUM + "_-", min_size=1, max_size=12)
arch_names = st.sampled_from(sorted(KNOWN_ARCHITECTURES | set(ARCH_ALIASES))) | st.text(
    _ALNUM + "_.-", min_size=1, max_size=12
)
variants = st.sampled_from(["", "v1", "v2", "v5", "v7", "v8", "v8.2", "v9", "7", "8"]) | st.text(
    _ALNUM + "_.-", min_size=1, max_size=8
)
platforms = st.builds(Platform, os_names, arch_names, variants)


@given(platforms)
def test_platform_format_parse_round_trip(platform: Platform) -> None:
    canonical = normalize(platform)
    assert P(format_platform(canonical)) == canonical
    assert format_platform(P(format_platform(canonical))) == format_platform(canonical)


@given(platforms)
def test_platform_parse_is_idempotent_and_matches_itself(platform: Platform) -> None:
    parsed = P(format_platform(platform))
    assert P(str(parsed)) == parsed
    assert normalize(parsed) == parsed
    assert compatible(parsed, parsed)


@given(st.text(max_size=40))
def test_platform_parse_arbitrary_text_returns_or_raises_platform_error(text: str) -> None:
    try:
        parsed = P(text)
    except PlatformError:
        return
    assert P(str(parsed)) == parsed
