"""The import rules of ../shared/DESIGN.md and the one import namespace, read from the
source with ``ast``: a module that breaks them fails here, naming the file and line."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINKED = ("gateway", "mappers", "cloud", "deviceapi")  # linked into edgetwin/
IO_LIBRARIES = ("aiomqtt", "paho", "sqlite3", "sqlite_utils", "grpc", "pymodbus", "bleak", "bumble", "socket")


def _modules(*folders: str) -> Iterator[Path]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "proto" not in path.relative_to(ROOT).parts:
                yield path


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def _offenders(paths: Iterator[Path], bad: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in paths
        for line, name in _imports(path)
        if any(name == b or name.startswith(b + ".") for b in bad)
    ]


def test_everything_imports_through_the_edgetwin_namespace() -> None:
    """``import gateway`` would load a second copy of a module the rest of the process
    knows as ``edgetwin.gateway`` (two registries, two metric sets), and would not exist
    in the wheel at all."""
    paths = _modules(*LINKED, "edgetwin", "tests", "scripts")
    assert _offenders(paths, LINKED) == []


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("gateway", ("edgetwin.cloud",)),
        ("cloud", ("edgetwin.gateway",)),
        ("mappers", ("edgetwin.gateway", "edgetwin.cloud")),
        ("deviceapi", ("edgetwin.gateway", "edgetwin.cloud", "edgetwin.mappers")),
        ("gateway/twin", IO_LIBRARIES),
    ],
)
def test_the_design_import_rules_hold(folder: str, forbidden: tuple[str, ...]) -> None:
    """gateway/ and cloud/ never import each other; a mapper imports only the SDK side;
    the shared module imports neither; the twin engine imports no I/O library."""
    assert _offenders(_modules(folder), forbidden) == []


def test_the_gateway_service_loads_neither_sqlite_utils_nor_the_clouds_libraries() -> None:
    """What a gateway loads is resident for its whole life (scripts/bench/memory.py):
    sqlite-utils is for the commands that read a store; lightkube and grpc come only with
    the relay or an uplink."""
    import subprocess
    import sys

    code = (
        "import sys, edgetwin.gateway.service\n"
        "print(sorted(m for m in ('sqlite_utils', 'click', 'lightkube', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
