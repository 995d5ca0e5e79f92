"""Identity ID maps mirrored from the creating namespace's own map."""

from __future__ import annotations

import pytest

from runtimed.errors import SandboxError
from sandbox.idmap import identity_map


@pytest.mark.parametrize(
    ("own", "mirrored"),
    [
        ("         0          0 4294967295\n", "0 0 4294967295\n"),
        ("0 1000 1\n1 100000 65536\n", "0 0 1\n1 1 65536\n"),
    ],
)
def test_idmap_identity_map_mirrors_each_range(own: str, mirrored: str) -> None:
    assert identity_map(own) == mirrored


@pytest.mark.parametrize("own", ["", "0 0\n", "a b c\n"])
def test_idmap_identity_map_refuses_malformed(own: str) -> None:
    with pytest.raises(SandboxError):
        identity_map(own)
