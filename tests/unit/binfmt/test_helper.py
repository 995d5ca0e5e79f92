"""Unit tests of binfmt.helper's request parsing (its namespace work is in tests/kernel)."""

from __future__ import annotations

import base64
import json

import pytest

from binfmt.helper import MAX_IMAGE_BYTES, MAX_PROBES, Probe, main, read_probes


def _request(*probes: object) -> str:
    return json.dumps({"probes": list(probes)})


def test_helper_reads_probes() -> None:
    image = base64.b64encode(b"\x7fELF").decode()
    assert read_probes(_request({"name": "linux/arm64", "image": image})) == [
        Probe("linux/arm64", b"\x7fELF")
    ]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps({"probes": "x"}),
        _request(*[{"name": "p", "image": ""}] * (MAX_PROBES + 1)),
        _request("x"),
        _request({"name": "p"}),
        _request({"name": "p", "image": "!!!"}),
        _request({"name": "p", "image": base64.b64encode(bytes(MAX_IMAGE_BYTES + 1)).decode()}),
    ],
)
def test_helper_refuses_malformed_requests(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case raises its own message
        read_probes(text)


def test_helper_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "usage" in capsys.readouterr().err
