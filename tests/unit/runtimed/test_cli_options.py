"""Unit: options several ``runtimectl`` command groups share are declared once."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from runtimed.cli import build_parser


def _commands(
    parser: argparse.ArgumentParser, name: str = "runtimectl"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


@pytest.mark.parametrize(
    ("option", "users"),
    [
        ("--state-dir", {"runtimectl run", "runtimectl snapshot import"}),
        ("--binfmt-misc", {"runtimectl run", "runtimectl check-binfmt"}),
    ],
)
def test_cli_options_shared_option_is_declared_once(option: str, users: set[str]) -> None:
    found: dict[str, tuple[object, ...]] = {}
    for name, parser in _commands(build_parser()):
        for action in parser._actions:
            if option in action.option_strings:
                found[name] = (action.help, action.default, action.metavar, action.type)
    assert users <= found.keys()
    assert len(set(found.values())) == 1, found
