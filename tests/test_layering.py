"""The layers of the package import only downwards.

The data plane (the C module, heap, channels, locks, errors) must stand on
its own so a C or Python program can use it without the kernel; the kernel
must not depend on the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import llmasos

PACKAGE = Path(llmasos.__file__).parent

DATA_PLANE = ["heap.py", "channel.py", "sync.py", "errors.py"]
FORBIDDEN_FOR_DATA_PLANE = {
    "llmasos.kernel",
    "llmasos.client",
    "llmasos.runtime",
    "llmasos.cli",
    "llmasos.commands",
    "llmasos.control",
    "llmasos.sched",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def offending(path: Path, forbidden: set[str]) -> set[str]:
    return {
        m
        for m in imported_modules(path)
        if any(m == f or m.startswith(f + ".") for f in forbidden)
    }


@pytest.mark.parametrize("name", DATA_PLANE)
def test_layering_data_plane_imports_no_upper_layer(name: str) -> None:
    assert offending(PACKAGE / name, FORBIDDEN_FOR_DATA_PLANE) == set()


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "kernel").glob("*.py")), ids=lambda p: p.name
)
def test_layering_kernel_does_not_import_the_cli(path: Path) -> None:
    assert offending(path, {"llmasos.cli", "llmasos.commands", "llmasos.demo"}) == set()


def test_layering_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from llmasos.kernel import boot\n")

    assert offending(bad, FORBIDDEN_FOR_DATA_PLANE) == {
        "llmasos.kernel",
        "llmasos.kernel.boot",
    }
