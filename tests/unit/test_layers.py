"""The import rules of STYLE.md §2, checked on the source of every module (AST, no imports run).

- A module whose docstring starts with "Pure." imports none of os, socket, subprocess, ctypes,
  trio, psutil, pyroute2, and no project module that is not itself pure (packages' __init__
  aside), directly or lazily inside a function.
- Modules of ``binfmt`` and ``sandbox`` import only ``runtimed.errors`` from ``runtimed``.
- The exec'd, single-threaded helpers (``sandbox/layerhelper.py``, its fork server
  ``sandbox/helperserver.py``, ``binfmt/helper.py``) import only the standard library and
  their own package (plus the leaf ``runtimed.errors``, which imports only the standard
  library); whatever project modules they pull in import only the standard library: no
  trio, no third-party package (nothing that may start a thread).

Modules are discovered afresh at collection, so files added later are checked too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGES: Final = ("runtimed", "binfmt", "sandbox")
BANNED_IN_PURE: Final = frozenset(
    {"os", "socket", "subprocess", "ctypes", "trio", "psutil", "pyroute2"}
)
ALLOWED_FROM_RUNTIMED: Final = frozenset({"runtimed.errors"})
HELPERS: Final = ("sandbox.layerhelper", "sandbox.helperserver", "binfmt.helper")
# zstd: the stdlib's compression.zstd from 3.14, its backport before (a codec, no threads).
STDLIB_TO_BE: Final = frozenset({"compression", "backports"})


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    tree: ast.Module
    is_package: bool

    @property
    def pure(self) -> bool:
        doc = ast.get_docstring(self.tree)
        return doc is not None and doc.startswith("Pure.")


def parse_module(name: str, source: str, *, is_package: bool = False) -> Module:
    return Module(name, ast.parse(source), is_package)


def discover(root: Path = ROOT) -> dict[str, Module]:
    found: dict[str, Module] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            found[name] = parse_module(name, path.read_text(), is_package=is_package)
    return found


def imported(module: Module, known: Mapping[str, Module]) -> Iterator[tuple[str, int]]:
    """(module name, line) of every import, relative ones resolved; ``from pkg import mod``
    names the submodule when it is a project module."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in known else base), node.lineno


def top(name: str) -> str:
    return name.partition(".")[0]


def pure_violations(module: Module, known: Mapping[str, Module]) -> list[str]:
    found: list[str] = []
    for name, line in imported(module, known):
        if top(name) in BANNED_IN_PURE:
            found.append(f"{module.name}:{line} imports {name}")
        elif name in known and not known[name].pure and not known[name].is_package:
            found.append(f"{module.name}:{line} imports the IO module {name}")
    return list(dict.fromkeys(found))


def runtimed_violations(module: Module, known: Mapping[str, Module]) -> list[str]:
    found = [
        f"{module.name}:{line} imports {name} (only runtimed.errors is allowed)"
        for name, line in imported(module, known)
        if top(name) == "runtimed" and name not in ALLOWED_FROM_RUNTIMED
    ]
    return list(dict.fromkeys(found))


def helper_violations(known: Mapping[str, Module], helper: str) -> list[str]:
    """Direct imports of the helper: stdlib or its own package. Everything reachable from it
    through project modules: stdlib or project only (no trio, no third-party)."""
    allowed = {top(helper)} | ALLOWED_FROM_RUNTIMED
    found = [
        f"{helper}:{line} imports {name} (only the standard library and {top(helper)})"
        for name, line in imported(known[helper], known)
        if top(name) not in sys.stdlib_module_names
        and top(name) not in allowed
        and name not in allowed
    ]
    seen, todo = set(), [helper]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name, line in imported(known[current], known):
            if name in known or top(name) in PACKAGES:
                todo.extend(n for n in (name, name.rpartition(".")[0]) if n in known)
            elif current != helper and top(name) not in sys.stdlib_module_names | STDLIB_TO_BE:
                found.append(f"{current}:{line} imports {name}, reached from {helper}")
    return list(dict.fromkeys(found))


MODULES: Final = discover()


@pytest.mark.parametrize("name", sorted(n for n, m in MODULES.items() if m.pure))
def test_layers_pure_modules_do_no_io(name: str) -> None:
    assert pure_violations(MODULES[name], MODULES) == []


@pytest.mark.parametrize("name", sorted(n for n in MODULES if top(n) in ("binfmt", "sandbox")))
def test_layers_binfmt_and_sandbox_import_only_errors_from_runtimed(name: str) -> None:
    assert runtimed_violations(MODULES[name], MODULES) == []


@pytest.mark.parametrize("helper", HELPERS)
def test_layers_exec_helpers_import_only_stdlib_and_their_package(helper: str) -> None:
    assert helper in MODULES
    assert helper_violations(MODULES, helper) == []


def test_layers_the_project_has_pure_modules_to_check() -> None:
    assert {"runtimed.errors", "binfmt.platform", "binfmt.elf"} <= {
        n for n, m in MODULES.items() if m.pure
    }


# --- the checker itself catches what it should --------------------------------------------------

FAKE_IO = parse_module("binfmt.kernel", '"""IO: writes things."""\nimport os\n')
FAKE_PURE = parse_module("binfmt.platform", '"""Pure. Tables."""\n')
FAKE_PACKAGE = parse_module("binfmt", '"""The package."""\n', is_package=True)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os.path", ["binfmt.fake:2 imports os.path"]),
        ("from subprocess import run", ["binfmt.fake:2 imports subprocess"]),
        ("def f():\n    import trio", ["binfmt.fake:3 imports trio"]),
        ("from binfmt import kernel", ["binfmt.fake:2 imports the IO module binfmt.kernel"]),
        ("from . import kernel", ["binfmt.fake:2 imports the IO module binfmt.kernel"]),
        ("from .kernel import x", ["binfmt.fake:2 imports the IO module binfmt.kernel"]),
        ("from binfmt.platform import Platform", []),
        ("from . import platform", []),
        ("import binfmt", []),
        ("import re, enum", []),
        ("from os import path, sep", ["binfmt.fake:2 imports os"]),
    ],
)
def test_layers_pure_checker(source: str, expected: list[str]) -> None:
    fake = parse_module("binfmt.fake", '"""Pure. x"""\n' + source)
    known = {m.name: m for m in (FAKE_IO, FAKE_PURE, FAKE_PACKAGE, fake)}
    assert fake.pure
    assert pure_violations(fake, known) == expected


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from runtimed.errors import ElfError", False),
        ("from runtimed import errors", False),
        ("from runtimed.protocol import Frame", True),
        ("import runtimed.cli", True),
        ("import runtimed", True),
    ],
)
def test_layers_runtimed_checker(source: str, bad: bool) -> None:
    errors = parse_module("runtimed.errors", '"""Pure. e"""\n')
    fake = parse_module("sandbox.fake", source)
    assert bool(runtimed_violations(fake, {"runtimed.errors": errors})) is bad


def test_layers_helper_checker_follows_project_imports() -> None:
    known = {
        "sandbox.helper": parse_module("sandbox.helper", "import json\nfrom sandbox import plan"),
        "sandbox.plan": parse_module("sandbox.plan", "from sandbox.util import x"),
        "sandbox.util": parse_module("sandbox.util", "import trio"),
    }
    assert helper_violations(known, "sandbox.helper") == [
        "sandbox.util:1 imports trio, reached from sandbox.helper"
    ]
    known["sandbox.helper"] = parse_module(
        "sandbox.helper", "import psutil\nfrom runtimed.errors import A, B"
    )
    assert helper_violations(known, "sandbox.helper") == [
        "sandbox.helper:1 imports psutil (only the standard library and sandbox)"
    ]
