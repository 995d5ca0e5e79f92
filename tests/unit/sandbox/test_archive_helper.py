"""The layer helper's overlay options: top layer first through short symlink names, so even
127 layers fit in the page mount(2) takes; what overlayfs cannot parse is refused."""

from __future__ import annotations

import pytest

from runtimed.errors import InvalidParamsError
from sandbox.layerhelper import OVERLAY_OPTIONS, overlay_options


def test_overlay_options_list_the_top_layer_first() -> None:
    data = overlay_options(3, "../layer")
    assert data == f"lowerdir=l/2:l/1:l/0,upperdir=../layer,workdir=ovl,{OVERLAY_OPTIONS}"
    assert "userxattr" in data


def test_overlay_options_fit_127_layers_in_a_page() -> None:
    assert len(overlay_options(127, "../" + "x" * 200)) < 4096


@pytest.mark.parametrize("bad", ["../a,b", "../a:b", "../a\\b"])
def test_overlay_options_refuse_separators_in_the_upper_path(bad: str) -> None:
    with pytest.raises(InvalidParamsError):
        overlay_options(1, bad)


def test_overlay_options_refuse_more_than_a_page() -> None:
    with pytest.raises(InvalidParamsError, match="one page"):
        overlay_options(1000, "../layer")
