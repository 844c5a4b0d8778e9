"""The layout and the import rules of ../shared/DESIGN.md, read from the source with
``ast`` and from pyproject.toml: a module that breaks them fails here, naming the file
and line."""

from __future__ import annotations

import ast
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
# The top-level folders mapped onto edgetwin.* (edgetwin/ itself holds the CLI and sync).
MAPPED = tuple(folder for folder in PACKAGE_DIR.values() if folder != "edgetwin")
PRODUCT = ("gateway", "mappers", "cloud", "deviceapi", "runtime", "edgetwin", "deploy")
IO_LIBRARIES = ("aiomqtt", "paho", "sqlite3", "sqlite_utils", "grpc", "pymodbus", "bleak", "bumble", "socket")
MAX_LINES = 510  # "no product module over ~500 lines" (generated protobuf code aside)


def _modules(*folders: str) -> Iterator[Path]:
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                yield path


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    for package, folder in sorted(PACKAGE_DIR.items(), key=lambda kv: -len(kv[1])):
        if rel.parts[0] == folder and (package != "edgetwin" or folder == "edgetwin"):
            parts = [p for p in rel.with_suffix("").parts[1:] if p != "__init__"]
            return ".".join([package, *parts])
    return ".".join(p for p in rel.with_suffix("").parts if p != "__init__")  # tests/, scripts/


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every import of a module, type-checking-only ones included, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:  # "from edgetwin.x import y" may import module x.y
                yield node.lineno, f"{base}.{alias.name}"


def _offenders(paths: Iterator[Path], bad: tuple[str, ...]) -> list[str]:
    return sorted(
        {
            f"{path.relative_to(ROOT)}:{line} imports {name}"
            for path in paths
            for line, name in _imports(path)
            if any(name == b or name.startswith(b + ".") for b in bad)
        }
    )


def test_no_symbolic_link_is_tracked() -> None:
    """The namespace comes from pyproject's package-dir, not from links (a checkout
    without link support would break the package)."""
    listing = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    links = [line.split("\t", 1)[1] for line in listing.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_every_package_folder_is_listed_in_pyproject() -> None:
    """A folder with an __init__.py that pyproject.toml does not list is left out of the
    wheel (and of an editable install's mapping) without a word."""
    found = set()
    for package, folder in PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if package == "edgetwin" and rel.parts and f"edgetwin.{rel.parts[0]}" in PACKAGE_DIR:
                continue
            found.add(".".join([package, *rel.parts]))
    assert sorted(found) == sorted(SETUPTOOLS["packages"])


def test_everything_imports_through_the_edgetwin_namespace() -> None:
    """``import gateway`` would load a second copy of a module the rest of the process
    knows as ``edgetwin.gateway`` (two registries, two metric sets), and would not exist
    in the wheel at all."""
    paths = _modules(*MAPPED, "edgetwin", "tests", "scripts")
    assert _offenders(paths, tuple(f for f in MAPPED if f != "deploy")) == []


@pytest.mark.parametrize(
    "folder, forbidden",
    [
        ("gateway", ("edgetwin.cloud", "edgetwin.simulators", "tests")),
        ("cloud", ("edgetwin.gateway", "edgetwin.mappers", "edgetwin.simulators", "tests")),
        ("mappers", ("edgetwin.gateway", "edgetwin.cloud", "edgetwin.simulators", "tests")),
        ("deviceapi", ("edgetwin.gateway", "edgetwin.cloud", "edgetwin.mappers", "edgetwin.simulators")),
        ("runtime", ("edgetwin.gateway", "edgetwin.cloud", "edgetwin.mappers", "edgetwin.simulators")),
        ("edgetwin/sync", ("edgetwin.gateway", "edgetwin.cloud", "edgetwin.mappers", "edgetwin.simulators")),
        ("simulators", ("tests",)),
        ("gateway/twin", IO_LIBRARIES),
    ],
)
def test_the_design_import_rules_hold(folder: str, forbidden: tuple[str, ...]) -> None:
    """gateway/ and cloud/ never import each other; a mapper imports only the SDK side;
    the shared contracts import neither; product code never imports the stand-ins or the
    test harness; the twin engine imports no I/O library."""
    assert _offenders(_modules(folder), forbidden) == []


def test_only_the_cli_commands_of_the_stand_ins_import_them() -> None:
    """``edgetwin sim``, ``demo`` and ``cloud kube-emulator`` run the stand-ins; no other
    command module does."""
    others = [p for p in _modules("edgetwin") if p.name not in ("sim.py", "cloud.py")]
    assert _offenders(iter(others), ("edgetwin.simulators",)) == []


def test_no_product_module_is_over_about_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules(*PRODUCT, "simulators")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_each_product_module_opens_with_a_sentence_saying_its_job() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in _modules(*PRODUCT, "simulators")
        if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()
    ]
    assert missing == []


def test_no_import_cycle_among_product_modules() -> None:
    """Type-checking-only imports count too: a cycle there is still two modules that
    each need the other to be understood."""
    paths = {_module_name(p): p for p in _modules(*PRODUCT, "simulators")}
    graph = {name: {m for _, m in _imports(path) if m in paths and m != name} for name, path in paths.items()}
    # A package's __init__ is imported with its modules: only its own imports count.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_sys_path_edits_in_benches_tests_or_scripts() -> None:
    offenders = []
    for path in _modules("tests", "scripts"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("insert", "append", "extend")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "path"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "sys"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_gateway_service_loads_neither_the_store_reader_nor_the_clouds_libraries() -> None:
    """What a gateway loads is resident for its whole life (scripts/bench/memory.py):
    sqlite-utils and httpx (with click, rich, pygments when installed) are for the commands
    that read a store or a health endpoint; lightkube, grpc and protobuf's runtime only
    with the relay (the uplink speaks gRPC on h2, its Frame by hand); a mapper's protocol
    stack only with a device of its protocol. The import path is the one `edgetwin
    gateway run` takes with an uplink, serving a virtual device."""
    import sys

    heavy = (
        *("sqlite_utils", "click", "httpx", "rich", "lightkube", "grpc", "google.protobuf"),
        *("pymodbus", "bleak", "bumble"),
    )
    code = (
        "import sys, edgetwin.cli, edgetwin.cli.gateway, edgetwin.gateway.service\n"
        "import edgetwin.gateway.uplink\n"
        "from edgetwin.gateway.mapper_host import discover\n"
        "assert discover()['virtual'].__name__ == 'VirtualMapper'\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
