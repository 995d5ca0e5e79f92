"""The layer helper's overlay options: lowest layer last, paths relative to their common parent,
what overlayfs cannot parse refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtimed.errors import InvalidParamsError
from sandbox.layerhelper import OVERLAY_OPTIONS, overlay_options


def test_overlay_options_list_the_top_layer_first_relative_to_the_store() -> None:
    base, data = overlay_options(
        [Path("/s/layers/a"), Path("/s/layers/b")], Path("/s/tmp/x/layer"), Path("/s/tmp/x/ovl")
    )
    assert base == Path("/s")
    assert data == (
        f"lowerdir=layers/b:layers/a,upperdir=tmp/x/layer,workdir=tmp/x/ovl,{OVERLAY_OPTIONS}"
    )
    assert "userxattr" in data


@pytest.mark.parametrize("bad", ["/s/a,b", "/s/a:b", "/s/a\\b"])
def test_overlay_options_refuse_separators_in_paths(bad: str) -> None:
    with pytest.raises(InvalidParamsError):
        overlay_options([Path(bad)], Path("/s/u"), Path("/s/w"))


def test_overlay_options_refuse_more_than_a_page() -> None:
    parents = [Path(f"/s/layers/{i:064x}") for i in range(80)]
    with pytest.raises(InvalidParamsError, match="one page"):
        overlay_options(parents, Path("/s/u"), Path("/s/w"))
