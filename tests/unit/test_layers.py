"""The layering of docs/ARCHITECTURE.md, enforced: who may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mcproxy"

# module -> layer; a module may import mcproxy modules of a lower layer (or leaf utilities).
LAYERS = {
    "errors": 0,
    "config": 1, "jsonrpc": 1, "framing": 1, "guard": 1, "auth": 1,
    "wsproto": 1,
    "session": 2,
    "tasks": 3, "log": 3, "upstream": 3, "sdnotify": 3, "metrics": 3, "reconnect": 3,
    "store": 4, "upstream_stdio": 4, "upstream_http": 4, "upstream_shared": 4, "client": 4,
    "runner": 5, "client_sdk": 5, "bridge": 5,
    "hub": 6,
    "ws": 7, "streamable": 7,
    "app": 8, "listener": 8,
    "daemon": 9, "admin": 9,
    "cli": 10,
}  # fmt: skip
SANS_IO = {"errors", "config", "jsonrpc", "framing", "guard", "auth", "session", "wsproto"}
FORBIDDEN_IN_CORE = {"asyncio", "aiohttp", "aiosqlite", "sqlite3", "structlog",
                     "prometheus_client", "time", "uvloop", "datetime"}  # fmt: skip


def imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "mcproxy":
                names.update(f"mcproxy.{alias.name}" for alias in node.names)
    return names


def test_every_module_has_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set(LAYERS)


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down(module: str) -> None:
    for name in imports(module):
        if name.startswith("mcproxy."):
            target = name.split(".")[1]
            if target in LAYERS:
                assert LAYERS[target] < LAYERS[module] or target == module, (module, target)
    if module in SANS_IO:
        roots = {name.split(".")[0] for name in imports(module)}
        assert not roots & FORBIDDEN_IN_CORE, (module, roots & FORBIDDEN_IN_CORE)


def test_init_holds_only_the_version() -> None:
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
