"""The layering of docs/ARCHITECTURE.md, enforced: which package may import which.

Rules, checked on the source (no import is executed):
- a package imports only the packages listed for it in ``MAY_IMPORT`` (and itself);
- the leaves (``errors``, ``config``, ``tasks``, ``log``, ``metrics``) import no other part of
  mcproxy except ``errors``;
- the sans-I/O core (``core/``, ``errors``, ``config``) imports no event loop, socket, database,
  logging or clock module, and ``upstreams/shared_router`` is held to the same rule;
- inside a package, modules do not import each other in a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mcproxy"

LEAVES = {"errors", "config", "tasks", "log", "metrics"}
PACKAGES = {"core", "upstreams", "engine", "fronts", "client", "ops", "examples"}
# Directories of data, no Python: the JS client package (served, shipped in the wheel, packed).
DATA_DIRS = {"web"}

# package -> the mcproxy packages (and leaves) it may import. Read top-down as the layer table.
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "tasks": {"errors"},
    "log": {"errors"},
    "metrics": {"errors"},
    "core": {"errors"},
    "upstreams": {"core", "errors", "config", "tasks"},
    "engine": {"core", "upstreams", "errors", "config", "tasks", "metrics"},
    "fronts": {"engine", "core", "errors", "config", "tasks", "metrics"},
    # The client is a separate product on the same wire contract: the core only.
    "client": {"core", "errors"},
    "ops": {"fronts", "engine", "upstreams", "core", "client", "errors", "config", "tasks",
            "log", "metrics"},
    "examples": set(),
}  # fmt: skip

# Modules that must stay sans-I/O: they never touch the loop, a socket, the database or the clock.
SANS_IO_PACKAGES = {"core"}
SANS_IO_MODULES = {"errors", "config", "upstreams.shared_router"}
FORBIDDEN_IN_CORE = {"asyncio", "aiohttp", "aiosqlite", "sqlite3", "structlog", "socket",
                     "prometheus_client", "time", "uvloop", "datetime", "subprocess",
                     "threading", "selectors"}  # fmt: skip


def modules() -> dict[str, Path]:
    """Dotted name below ``mcproxy`` -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.name in {"__init__", "__main__"}:
            continue
        found[".".join(rel.parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module name imported by the file (``from mcproxy.x import y`` gives ``mcproxy.x.y``
    too, since ``y`` may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def unit(dotted: str) -> str:
    """The layering unit of a module: its package, or the leaf module itself."""
    return dotted.split(".")[0]


def test_every_module_belongs_to_a_known_unit() -> None:
    for dotted in modules():
        assert unit(dotted) in MAY_IMPORT, dotted
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == (
        PACKAGES | DATA_DIRS
    )
    for data in DATA_DIRS:
        assert not list((PACKAGE / data).rglob("*.py")), data


@pytest.mark.parametrize("dotted", sorted(modules()))
def test_imports_follow_the_layers(dotted: str) -> None:
    path = modules()[dotted]
    mine = unit(dotted)
    for name in imports(path):
        if not name.startswith("mcproxy.") and name != "mcproxy":
            continue
        parts = name.split(".")
        if len(parts) == 1 or parts[1] == "__version__":
            continue  # the version, from the package root
        target = parts[1]
        if target == mine:
            continue
        assert target in MAY_IMPORT[mine], f"{dotted} imports {name}: {mine} may not use {target}"
    sans_io = mine in SANS_IO_PACKAGES or dotted in SANS_IO_MODULES
    if sans_io:
        roots = {name.split(".")[0] for name in imports(path)}
        assert not roots & FORBIDDEN_IN_CORE, (dotted, roots & FORBIDDEN_IN_CORE)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_cycles_inside_a_package(package: str) -> None:
    mods = {d: p for d, p in modules().items() if unit(d) == package}
    graph = {
        d: {
            n.removeprefix("mcproxy.")
            for n in imports(p)
            if n.removeprefix("mcproxy.") in mods and n.removeprefix("mcproxy.") != d
        }
        for d, p in mods.items()
    }
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"import cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for nxt in graph[node]:
            visit(nxt, (*path, node))
        done.add(node)

    for node in graph:
        visit(node, ())


def test_package_inits_hold_nothing() -> None:
    """No barrel re-exports: ``mcproxy/__init__.py`` holds the version only, and every
    subpackage's ``__init__.py`` at most a docstring."""
    root = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [n for n in root.body if isinstance(n, ast.Import | ast.ImportFrom)]
    for package in PACKAGES:
        tree = ast.parse((PACKAGE / package / "__init__.py").read_text())
        assert all(
            isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body
        ), package
